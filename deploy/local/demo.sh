#!/usr/bin/env bash
# The pyabouts demo on this machine: a local Kubernetes API (etcd + kube-apiserver), pyabouts
# installed with `kubectl apply -k deploy/`, and network-namespace "pods" that get addresses
# through the real Multus thin plugin and macvlan with pyabouts as IPAM. They talk over net1; a
# crashed pod's address is reclaimed by pyabouts-reconciler. Needs root. Leaves nothing behind.
#
#   bash deploy/local/demo.sh         # prepare the machine (setup.sh), then run the demo
#   bash deploy/local/demo.sh down    # remove leftovers of an interrupted run
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

python=.venv/bin/python
if [[ "${1:-run}" == down ]]; then
    # Cleaning up needs only the standard library: no setup, any python3 will do.
    [[ -x "$python" ]] || python=python3
else
    bash deploy/local/setup.sh
fi
exec "$python" -m deploy.local.demo "$@"
