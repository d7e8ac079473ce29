#!/usr/bin/env bash
# The whole test suite, on a fresh machine too: installs what it needs, then runs pytest.
# Extra arguments go to pytest (e.g. `bash tests/run.sh tests/unit -x`).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bash deploy/local/setup.sh
# shellcheck source=/dev/null
source deploy/local/testenv.sh
# Two workers: the machine has two cores. Tests that start hundreds of plugin processes share
# an xdist group, so they run one after another on one worker.
exec python -m pytest -n 2 --dist loadgroup -p no:cacheprovider --durations=15 "$@"
