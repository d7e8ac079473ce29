"""The local cluster's command line: ``python -m deploy.local.cluster_cli up|status|down``.

``up`` prints ``export KUBECONFIG=...`` on stdout (the rest goes to stderr), so
``eval "$(bash deploy/local/cluster.sh up)"`` points kubectl at it. ``--dir`` chooses the state
directory (default ``$PYABOUTS_CLUSTER_DIR`` or ``/var/lib/pyabouts-cluster``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deploy.local.cluster import Cluster, default_state_dir, down, status_lines, up
from deploy.local.commands import LocalToolError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bash deploy/local/cluster.sh",
        description="A real single-node Kubernetes cluster on this host (deploy/local/cluster.py).",
    )
    parser.add_argument("command", choices=["up", "status", "down"])
    parser.add_argument(
        "--dir", type=Path, default=default_state_dir(), help="state directory (%(default)s)"
    )
    args = parser.parse_args(argv)
    state_dir: Path = args.dir.expanduser().resolve()
    try:
        if args.command == "up":
            print(f"export KUBECONFIG={up(state_dir).kubeconfig}")
        elif args.command == "down":
            down(state_dir)
            print(f"[cluster] down; logs and certificates stay in {state_dir}", file=sys.stderr)
        else:
            cluster = Cluster.load(state_dir)
            print("\n".join(status_lines(cluster)))
            return 0 if cluster is not None and cluster.running() else 1
    except LocalToolError as exc:
        print(f"[cluster] error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
