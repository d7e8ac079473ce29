#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this host, for pyabouts' tests and demos:
#
#   eval "$(bash deploy/local/cluster.sh up)"   # starts it (a no-op when it runs); prints
#                                               # export KUBECONFIG=...
#   bash deploy/local/cluster.sh status         # what runs
#   bash deploy/local/cluster.sh down           # deletes the pods, stops everything, cleans up
#
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd, kubelet and
# kube-proxy; pods on the bridge cni0 (198.18.0.1/24). State in $PYABOUTS_CLUSTER_DIR
# (default /var/lib/pyabouts-cluster); see deploy/local/cluster.py. `up` runs setup.sh first
# (the Kubernetes binaries take about 10 minutes to build the first time, then are cached).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ "${1:-}" == up ]]; then
    # Its output to stderr: stdout is the export line alone.
    bash "$repo/deploy/local/setup.sh" >&2
fi
python="$repo/.venv/bin/python"
[[ -x "$python" ]] || python=python3
cd "$repo"
exec "$python" -m deploy.local.cluster_cli "$@"
