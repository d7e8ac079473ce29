#!/usr/bin/env bash
# The pyabouts demo on this machine: the Multus quickstart on a real single-node cluster
# (deploy/local/cluster.sh), pyabouts installed with `kubectl apply -k deploy/`, Multus from its
# own DaemonSet manifest, pods annotated with a macvlan NAD whose IPAM is pyabouts. They talk
# over net1; a pod force-deleted while kubelet is down has its address reclaimed by
# pyabouts-reconciler. Needs root. Leaves nothing behind (a cluster already running stays).
#
#   bash deploy/local/demo.sh         # prepare the machine (setup.sh), then run the demo
#   bash deploy/local/demo.sh down    # remove leftovers of an interrupted run, cluster included
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"

python=.venv/bin/python
if [[ "${1:-run}" == down ]]; then
    # No setup for cleaning up; without the virtualenv no demo ever ran from this checkout.
    [[ -x "$python" ]] || {
        echo "nothing to clean up"
        exit 0
    }
else
    bash deploy/local/setup.sh
fi
exec "$python" -m deploy.local.demo "$@"
