"""`pyabouts-install`: put the thin `pyabouts` plugin into a CNI bin directory.

The executable is plugin/thin_client.py's source behind a `#!<python3> -IS` line (isolated, no
site: no pip wrapper, no `site` import), with plugin/wire.py's text where it imports the wire
format, the agent's socket path and, for the fallback, the paths where this installation's
packages live. Written to a temporary file and renamed, so a
runtime executing the old plugin never sees half a file.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
from pathlib import Path

from pyabouts import plugin
from pyabouts.plugin import thin_client, wire
from pyabouts.plugin.cni import render_version

DEFAULT_SOCKET = thin_client.AGENT_SOCKET
SYSTEM_PYTHON = "/usr/bin/python3"
_SOCKET_LINE = f'AGENT_SOCKET = "{DEFAULT_SOCKET}"\n'
_FALLBACK_LINE = "FALLBACK_PATH: list[str] = []\n"
_VERSION_LINE = 'VERSION_REPLY = b""'
_WIRE_IMPORT_LINE = (
    "from pyabouts.plugin.wire import WireError, decode_reply, encode_request  # wire.py's text\n"
)


def thin_plugin_source(python: str, socket_path: str, fallback_path: list[str]) -> str:
    source = Path(thin_client.__file__).read_text()
    lines = (_SOCKET_LINE, _FALLBACK_LINE, _VERSION_LINE, _WIRE_IMPORT_LINE)
    if not all(line in source for line in lines):
        raise RuntimeError("plugin/thin_client.py lost the lines the installer sets")
    # The installed file imports nothing of the package: it carries the wire format's text.
    source = source.replace(_WIRE_IMPORT_LINE, Path(wire.__file__).read_text())
    source = source.replace(_SOCKET_LINE, f"AGENT_SOCKET = {socket_path!r}\n")
    source = source.replace(_FALLBACK_LINE, f"FALLBACK_PATH: list[str] = {fallback_path!r}\n")
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
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / name
    text = thin_plugin_source(
        python or default_python(fallback=fallback),
        socket_path,
        this_installation() if fallback else [],
    )
    partial = bin_dir / f".{name}.{os.getpid()}.tmp"
    partial.write_text(text)
    partial.chmod(0o755)
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pyabouts-install", description=__doc__)
    parser.add_argument("--cni-bin-dir", type=Path, default=Path("/opt/cni/bin"))
    parser.add_argument("--agent-socket", default=DEFAULT_SOCKET)
    parser.add_argument(
        "--python",
        help="the node's interpreter (default: this one; /usr/bin/python3 with --no-fallback)",
    )
    parser.add_argument(
        "--no-fallback",
        action="store_true",
        help="the node has no pyabouts package: without an agent, fail with code 11",
    )
    args = parser.parse_args(argv)
    target = install_thin_plugin(
        args.cni_bin_dir,
        socket_path=args.agent_socket,
        python=args.python,
        fallback=not args.no_fallback,
    )
    print(f"installed {target} (agent socket {args.agent_socket})")


if __name__ == "__main__":
    main()
