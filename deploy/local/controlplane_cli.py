"""The local control plane's command line: ``python -m deploy.local.controlplane COMMAND``.

``up`` starts it in the background (its servers outlive the command), ``env`` prints the
``export KUBECONFIG=...`` line, ``status`` says what runs, ``down`` stops it and removes its state
directory (``--dir``, default ``~/.cache/pyabouts/run/controlplane``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from deploy.local.controlplane import (
    KUBE_VERSION,
    STATE_FILE,
    ControlPlane,
    ControlPlaneError,
    default_state_dir,
    start_control_plane,
)


def _export_line(kubeconfig: Path) -> str:
    return f"export KUBECONFIG={kubeconfig}"


def _cmd_up(state_dir: Path) -> int:
    if (state_dir / STATE_FILE).is_file():
        old = ControlPlane.load(state_dir)
        if old.running():
            print(f"[controlplane] already running: {old.server}", file=sys.stderr)
            print(_export_line(old.kubeconfig))
            return 0
        old.stop()  # whatever half of it is left
    t0 = time.monotonic()
    cp = start_control_plane(state_dir, die_with_parent=False)
    pids = ", ".join(f"{k} {v}" for k, v in cp.pids().items())
    print(
        f"[controlplane] kube-apiserver {KUBE_VERSION} ready at {cp.server} in "
        f"{time.monotonic() - t0:.1f} s (etcd {cp.etcd_endpoint}; pids: {pids}; "
        f"logs: {cp.logs_dir})",
        file=sys.stderr,
    )
    print(_export_line(cp.kubeconfig))
    return 0


def _cmd_down(state_dir: Path) -> int:
    if not state_dir.exists():
        print(f"[controlplane] nothing in {state_dir}", file=sys.stderr)
        return 0
    if not (state_dir / STATE_FILE).is_file():
        if any(state_dir.iterdir()) and not (state_dir / "pki").is_dir():
            print(
                f"[controlplane] {state_dir} holds no control plane state; not removing it",
                file=sys.stderr,
            )
            return 1
    else:
        ControlPlane.load(state_dir).stop()
    shutil.rmtree(state_dir)
    print(f"[controlplane] stopped; removed {state_dir}", file=sys.stderr)
    return 0


def _cmd_status(state_dir: Path) -> int:
    try:
        cp = ControlPlane.load(state_dir)
    except ControlPlaneError:
        print(f"not running (no state in {state_dir})")
        return 1
    processes = cp.processes()
    for name in ("etcd", "kube-apiserver"):
        proc = processes.get(name)
        print(f"{name}: {'not running (pid None)' if proc is None else proc.status()}")
    readyz = cp.readyz()
    print(readyz)
    print(f"etcd: {cp.etcd_endpoint}")
    print(f"kubeconfig: {cp.kubeconfig}")
    return 0 if cp.running() and readyz.endswith("HTTP 200 ok") else 1


def _cmd_env(state_dir: Path) -> int:
    cp = ControlPlane.load(state_dir)
    print(_export_line(cp.kubeconfig))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.controlplane",
        description="A local etcd + kube-apiserver on 127.0.0.1 (deploy/local/controlplane.py).",
    )
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument(
        "--dir",
        type=Path,
        default=default_state_dir(),
        help="state directory (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    state_dir: Path = args.dir.expanduser().resolve()
    commands = {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status, "env": _cmd_env}
    try:
        return commands[args.command](state_dir)
    except ControlPlaneError as exc:
        print(f"[controlplane] error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
