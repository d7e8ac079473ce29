# shellcheck shell=bash
# Source this (after `bash deploy/local/setup.sh`) to run pyabouts' tests:
#   source deploy/local/testenv.sh
# It puts the project's virtualenv first on PATH.

_pyabouts_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

case ":${PATH}:" in
    ":${_pyabouts_repo}/.venv/bin:"*) ;;
    *) export PATH="${_pyabouts_repo}/.venv/bin:${PATH}" ;;
esac
unset _pyabouts_repo
