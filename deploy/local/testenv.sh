# shellcheck shell=bash
# Source this (after `bash deploy/local/setup.sh`) to run pyabouts' tests:
#   source deploy/local/testenv.sh
# testcontainers talks to podman's Docker-compatible API; see shared/notes/environment.md.

_pyabouts_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

export DOCKER_HOST=unix:///run/podman/podman.sock
# The ryuk reaper image cannot be pulled here; the fixtures stop their own containers.
export TESTCONTAINERS_RYUK_DISABLED=true
# The machine has a /.dockerenv: without these two, testcontainers believes it runs inside a
# container and fails with KeyError 'HostConfig'.
export TESTCONTAINERS_CONNECTION_MODE=docker_host
export TESTCONTAINERS_HOST_OVERRIDE=127.0.0.1
export PYABOUTS_ETCD_IMAGE="${PYABOUTS_ETCD_IMAGE:-localhost/pyabouts-etcd:3.4}"

case ":${PATH}:" in
    ":${_pyabouts_repo}/.venv/bin:"*) ;;
    *) export PATH="${_pyabouts_repo}/.venv/bin:${PATH}" ;;
esac
unset _pyabouts_repo
