"""`pyabouts-install`: put the node's `pyabouts` plugin into a CNI bin directory, and the node's
flat file and kubeconfig into its CNI config directory (plugin/node_config.py).

The plugin is one of two. With `--shim`, the static Go shim of plugin/shim/ (built into the
image): it needs nothing on the node and only hands calls to the agent. Without, the thin
Python plugin, for hosts where pyabouts is pip-installed: it hands calls to the agent too, and
serves them in-process when no agent answers.

The thin plugin is plugin/thin_client.py's source behind a `#!<python3> -IS` line (isolated, no
site: no pip wrapper, no `site` import), with plugin/wire.py's text where it imports the wire
format, the agent's socket path and, for the fallback, the paths where this installation's
packages live. Written to a temporary file and renamed, so a
runtime executing the old plugin never sees half a file.

In the agent's DaemonSet it runs as a sidecar (`--keep-current`): it installs, then keeps the
kubeconfig in step with the rotating service account token until it is stopped. `--uninstall`
removes what it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import site
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from pyabouts import plugin
from pyabouts.ipam.errors import CniError
from pyabouts.ipam.stores.kubeconfig import SERVICE_ACCOUNT_DIR
from pyabouts.plugin import thin_client, wire
from pyabouts.plugin.cni import render_version
from pyabouts.plugin.named_files import others_may_change
from pyabouts.plugin.node_config import (
    NodeConfig,
    OwnDaemonSet,
    keep_node_config_current,
    write_file_atomically,
)
from pyabouts.serving.listen import check_unix_socket_path, unix_socket_argument

DEFAULT_SOCKET = thin_client.AGENT_SOCKET
#: plugin/shim/main.go's socketSlot: the marker, then the socket path padded with NULs.
SHIM_SLOT_MARKER = b"PYABOUTS-AGENT-SOCKET-SLOT:"
SHIM_SLOT_SIZE = 512
SYSTEM_PYTHON = "/usr/bin/python3"
_SOCKET_LINE = f'AGENT_SOCKET = "{DEFAULT_SOCKET}"\n'
_FALLBACK_LINE = 'FALLBACK_PATH: "list[str]" = []\n'
_VERSION_LINE = 'VERSION_REPLY = b""'
_WIRE_IMPORT_LINE = (
    "from pyabouts.plugin.wire import (  # wire.py's text\n"
    "    DEADLINE_KEY,\n"
    "    JOURNAL_LOCK,\n"
    "    PENDING_JOURNAL,\n"
    "    WireError,\n"
    "    decode_reply,\n"
    "    encode_request,\n"
    ")\n"
)


def thin_plugin_source(python: str, socket_path: str, fallback_path: list[str]) -> str:
    source = Path(thin_client.__file__).read_text()
    lines = (_SOCKET_LINE, _FALLBACK_LINE, _VERSION_LINE, _WIRE_IMPORT_LINE)
    if not all(line in source for line in lines):
        raise RuntimeError("plugin/thin_client.py lost the lines the installer sets")
    # The installed file imports nothing of the package: it carries the wire format's text.
    source = source.replace(_WIRE_IMPORT_LINE, Path(wire.__file__).read_text())
    source = source.replace(_SOCKET_LINE, f"AGENT_SOCKET = {socket_path!r}\n")
    source = source.replace(_FALLBACK_LINE, f"FALLBACK_PATH = {fallback_path!r}\n")
    version = json.dumps(render_version()).encode()
    source = source.replace(_VERSION_LINE, f"VERSION_REPLY = {version!r}", 1)
    return f"#!{python} -IS\n{source}"


def this_installation() -> list[str]:
    """Where `import pyabouts.plugin` and its dependencies resolve in this interpreter.

    The directory that holds `pyabouts/` as imported, symlinks kept (pyabouts/plugin/ links to
    the repo's plugin/ in a development install, and the repo root has no pyabouts/ of its own
    to resolve to).
    """
    root = str(Path(plugin.__file__).absolute().parents[2])
    return list(dict.fromkeys([root, *site.getsitepackages()]))


def default_python(*, fallback: bool) -> str:
    """A real interpreter binary, never a shim or wrapper script: the node's /usr/bin/python3
    (distributions build it with PGO; here it starts 2-3 ms sooner than a pyenv build). With the
    fallback, only if it is this interpreter's version, since the installation's compiled
    extensions must match it; else this one. (Without the fallback an installer in a container
    cannot look at the host's interpreter, so it is not checked.)"""
    if not fallback or _same_version(SYSTEM_PYTHON):
        return SYSTEM_PYTHON
    return str(Path(sys.executable).resolve())


def _same_version(python: str) -> bool:
    try:
        done = subprocess.run(
            [python, "-IS", "-c", "import sys; print(sys.implementation.cache_tag)"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return False
    return done.stdout.strip() == sys.implementation.cache_tag


def install_thin_plugin(
    bin_dir: Path,
    *,
    socket_path: str = DEFAULT_SOCKET,
    python: str | None = None,
    fallback: bool = True,
    name: str = "pyabouts",
) -> Path:
    """Write the thin plugin to `bin_dir`/`name`; `fallback` bakes in this installation's
    paths so that it can serve in-process when no agent answers."""
    target = bin_dir / name
    if python is not None and not os.path.isabs(python):  # the kernel would read it from the
        raise ValueError(f"--python {python!r} is not an absolute path")  # runtime's directory
    interpreter = python or default_python(fallback=fallback)
    fallback_path = this_installation() if fallback else []
    # What the fallback imports and runs as root: only root may change it. (Without it, an
    # installer in a container cannot look at the host's interpreter.)
    for path in [interpreter, *fallback_path] if fallback else []:
        if why := _not_roots_alone(Path(path)):
            raise ValueError(
                f"the plugin runs as root, and would run or import {path}, but {why}: install "
                f"from an installation only root can change (or --no-fallback)"
            )
    text = thin_plugin_source(interpreter, socket_path, fallback_path)
    write_file_atomically(target, text, 0o755)
    return target


def _not_roots_alone(path: Path) -> str | None:
    """Why someone other than root could change what `path` holds, or None: it, a link on its
    way, its target or one of their directories is another user's, or others may write it
    (a directory's sticky bit keeps them from replacing root's entries). The path as given is
    looked at as well as resolved: a link another user owns could be pointed elsewhere."""
    given = Path(os.path.abspath(path))
    real = path.resolve()
    for part, look in [
        *((p, os.lstat) for p in [given, *given.parents]),
        *((p, os.stat) for p in [real, *real.parents]),
    ]:
        try:
            status = look(part)
        except FileNotFoundError:
            continue  # (a site directory not made): who could make it is asked of its parent
        except OSError as exc:
            return f"{part} cannot be looked at ({exc.strerror})"
        if status.st_uid != 0:
            return f"{part} belongs to uid {status.st_uid}"
        if others_may_change(status):
            return f"{part} is writable by others (mode {stat.S_IMODE(status.st_mode):o})"
    return None


def shim_with_socket(binary: bytes, socket_path: str) -> bytes:
    """The shim `binary` with `socket_path` written into its socket slot."""
    path = socket_path.encode()
    if not path or b"\0" in path or len(path) >= SHIM_SLOT_SIZE:
        raise ValueError(f"the agent socket {socket_path!r} does not fit the shim's slot")
    check_unix_socket_path(socket_path)
    start = binary.find(SHIM_SLOT_MARKER) + len(SHIM_SLOT_MARKER)
    unique = start >= len(SHIM_SLOT_MARKER) and binary.find(SHIM_SLOT_MARKER, start) < 0
    if not unique or len(binary) < start + SHIM_SLOT_SIZE:
        raise ValueError("not a pyabouts shim: its socket slot is missing or not unique")
    return binary[:start] + path.ljust(SHIM_SLOT_SIZE, b"\0") + binary[start + SHIM_SLOT_SIZE :]


def install_shim(
    bin_dir: Path, shim: Path, *, socket_path: str = DEFAULT_SOCKET, name: str = "pyabouts"
) -> Path:
    """Write the static `shim`, set to call the agent at `socket_path`, to `bin_dir`/`name`."""
    target = bin_dir / name
    write_file_atomically(target, shim_with_socket(shim.read_bytes(), socket_path), 0o755)
    return target


def uninstall(bin_dir: Path, node_config: NodeConfig | None) -> None:
    """Remove the plugin from `bin_dir` and the node's files; print what went."""
    plugin_file = bin_dir / "pyabouts"
    removed = [plugin_file] if plugin_file.exists() else []
    plugin_file.unlink(missing_ok=True)
    removed += node_config.remove() if node_config else []
    print("removed " + (", ".join(map(str, removed)) or "nothing: nothing was installed"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pyabouts-install", description=__doc__)
    parser.add_argument("--cni-bin-dir", type=Path, default=Path("/opt/cni/bin"))
    parser.add_argument("--agent-socket", default=DEFAULT_SOCKET, type=unix_socket_argument)
    parser.add_argument(
        "--shim",
        type=Path,
        help="install this static shim (plugin/shim/, in the image) instead of the thin plugin",
    )
    parser.add_argument(
        "--python",
        help="the node's interpreter (default: this one; /usr/bin/python3 with --no-fallback)",
    )
    parser.add_argument(
        "--no-fallback",
        action="store_true",
        help="the node has no pyabouts package: without an agent, fail with code 11",
    )
    parser.add_argument(
        "--node-config-dir",
        type=Path,
        help="also write the flat file and a kubeconfig of this pod's service account here",
    )
    parser.add_argument(
        "--host-node-config-dir",
        type=Path,
        help="--node-config-dir as the node sees it (default: the same path)",
    )
    parser.add_argument(
        "--keep-current",
        action="store_true",
        help="stay, and rewrite the kubeconfig when the token rotates, until SIGTERM",
    )
    parser.add_argument(
        "--service-account-dir", type=Path, default=SERVICE_ACCOUNT_DIR, help="(%(default)s)"
    )
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between checks")
    parser.add_argument("--uninstall", action="store_true", help="remove what an install wrote")
    parser.add_argument(
        "--uninstall-with",
        metavar="DAEMONSET",
        help="with --keep-current: when stopped, uninstall if this DaemonSet was deleted",
    )
    args = parser.parse_args(argv)
    node_config = (
        NodeConfig(args.node_config_dir, args.host_node_config_dir or args.node_config_dir)
        if args.node_config_dir
        else None
    )
    if args.uninstall:
        uninstall(args.cni_bin_dir, node_config)
        return

    def install() -> Path:
        if args.shim:
            return install_shim(args.cni_bin_dir, args.shim, socket_path=args.agent_socket)
        return install_thin_plugin(
            args.cni_bin_dir,
            socket_path=args.agent_socket,
            python=args.python,
            fallback=not args.no_fallback,
        )

    try:
        target = install()
    except (OSError, ValueError) as exc:
        sys.exit(f"pyabouts-install: {exc}")
    print(f"installed {target} (agent socket {args.agent_socket})", flush=True)
    if node_config is None:
        return
    if not args.keep_current:
        try:
            node_config.write(os.environ, args.service_account_dir)
        except CniError as exc:
            sys.exit(f"pyabouts-install: {exc.msg}")
        print(f"wrote {node_config.kubeconfig} and {node_config.flat_file}")
        return
    keep_current(args, node_config, install)


def keep_current(
    args: argparse.Namespace, node_config: NodeConfig, install: Callable[[], Path]
) -> None:
    """--keep-current: keep the node's files and the plugin as they should be until SIGTERM,
    then uninstall if the DaemonSet (--uninstall-with) was deleted."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()  # the files stay: the plugin and the node keep working through an update

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    own = (
        OwnDaemonSet(args.uninstall_with, os.environ, args.service_account_dir)
        if args.uninstall_with
        else None
    )

    def on_tick() -> None:
        # The plugin too, as it should be: the pod this one replaced may have removed it (one
        # force-deleted stops after its replacement started, and finds its own token refused).
        # Not once the node is another installer's: its image may bring another plugin.
        if not node_config.written_by_another():
            try:
                install()  # unchanged: nothing written
            except OSError as exc:
                print(f"the plugin not written, trying again: {exc}", flush=True)
        if own is not None:
            own.read()

    keep_node_config_current(
        node_config,
        os.environ,
        interval=args.interval,
        stop=stop,
        account_dir=args.service_account_dir,
        on_tick=on_tick,
    )
    if own and own.deleted():
        if node_config.written_by_another():
            print(
                f"daemonset {args.uninstall_with} reads as deleted, and the node's files are "
                "another installer's now (the pod that replaced this one): left in place",
                flush=True,
            )
            return
        print(f"daemonset {args.uninstall_with} was deleted: uninstalling", flush=True)
        uninstall(args.cni_bin_dir, node_config)


if __name__ == "__main__":
    main()
