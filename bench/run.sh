#!/usr/bin/env bash
# Prepare the machine and the venv, then run a benchmark:
#   bash bench/run.sh [--calls N] [--concurrency C] [--nodes M] [--rounds R] [--out DIR]  # the plugins
#   bash bench/run.sh reconciler [--sizes 1000,5000,10000] [--datastores ...]  # the reconciler
#   bash bench/run.sh multus [--rounds 3] [--at-limits 20] [--raised 50]        # Multus thick
#   bash bench/run.sh writes [--writes 400] [--rounds 3] [--entries 0,64,128,255] \
#                            [--watchers 50,200]                            # one write's cost
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash deploy/local/setup.sh
if [[ "${1:-}" == reconciler ]]; then
    shift
    exec "$repo/.venv/bin/python" -m bench.reconcile_scale "$@"
fi
if [[ "${1:-}" == writes ]]; then
    shift
    exec "$repo/.venv/bin/python" -m bench.write_cost "$@"
fi
if [[ "${1:-}" == multus ]]; then
    shift
    exec "$repo/.venv/bin/python" -m bench.multus_scale "$@"
fi
# whereabouts v0.9.4 from its Go module (cached after the first build), to race against.
bash deploy/local/build_binaries.sh whereabouts
exec "$repo/.venv/bin/python" -m bench.run_benchmark "$@"
