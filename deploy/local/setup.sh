#!/usr/bin/env bash
# Prepare this machine for pyabouts' tests: Debian packages, the project virtualenv in
# $REPO/.venv, and the Kubernetes binaries (kube-apiserver, kubelet, kube-scheduler,
# kube-controller-manager, kube-proxy) and Multus built from their Go modules (cached in
# ~/.cache/pyabouts/bin by deploy/local/build_binaries.sh).
#
# Idempotent and quick when everything is already in place. Run it as
#   bash deploy/local/setup.sh
# (sourcing it also works: it then runs in a subshell and leaves the caller's shell options
# alone). See shared/notes/environment.md for why each step is needed.

_pyabouts_setup_main() {
    set -euo pipefail

    local repo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    local t0=$SECONDS

    log() { echo "[setup] $*"; }

    # --- Debian packages ------------------------------------------------------------------
    # containerd, conntrack, iptables and gcc (the pause image) for the local cluster;
    # debootstrap (the project image's base) and busybox-static (the test image) for its images.
    local pkgs=(etcd-server etcd-client containernetworking-plugins podman runc iputils-ping
        openssl curl iproute2 python3-venv time containerd conntrack iptables gcc libc6-dev
        debootstrap busybox-static)
    local missing=() p
    for p in "${pkgs[@]}"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
            missing+=("$p")
        fi
    done
    if ((${#missing[@]})); then
        log "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        log "Debian packages present"
    fi

    # --- podman: runc, no default ulimits -------------------------------------------------
    local conf=/etc/containers/containers.conf
    local want_conf
    want_conf='[containers]
default_ulimits = []
[engine]
runtime = "runc"'
    if [[ "$(cat "$conf" 2>/dev/null || true)" != "$want_conf" ]]; then
        log "writing $conf"
        mkdir -p /etc/containers
        printf '%s\n' "$want_conf" >"$conf"
    fi

    # --- virtualenv -----------------------------------------------------------------------
    local venv="$repo/.venv"
    local stamp="$venv/.pyabouts-installed"
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating virtualenv $venv"
        python3 -m venv "$venv"
    fi
    local constraints="$repo/constraints.txt"
    if [[ ! -f "$stamp" || "$repo/pyproject.toml" -nt "$stamp" || "$constraints" -nt "$stamp" ]]
    then
        log "pip install -e '${repo}[dev]' -c '$constraints'"
        # At the versions constraints.txt pins, those the image is built with. compat: a plain
        # path entry (the repo root, where pyabouts/ links the package directories); the
        # default editable finder costs ~60 ms on every call.
        "$venv/bin/python" -m pip install -q --disable-pip-version-check \
            -e "${repo}[dev]" -c "$constraints" --config-settings editable_mode=compat
        touch "$stamp"
    else
        log "virtualenv up to date"
    fi
    # An editable install leaves the project's own modules uncompiled, and with
    # PYTHONDONTWRITEBYTECODE set (as in some CI shells) every plugin process would compile them
    # again: ~0.1 s of CPU per call. Python ignores a .pyc whose source changed since.
    "$venv/bin/python" -m compileall -q -j 0 "$repo/ipam" "$repo/plugin" "$repo/controller" "$repo/serving" \
        "$repo/deploy/local" "$repo/bench" >/dev/null

    # --- upstream Go binaries (Kubernetes, Multus, whereabouts) ---------------------------
    # Cached in ~/.cache/pyabouts/bin: a no-op after the first build (about 15 minutes).
    # whereabouts: the migration tests migrate what the real one allocated.
    bash "$repo/deploy/local/build_binaries.sh" kubernetes multus whereabouts

    log "done in $((SECONDS - t0)) s"
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # Sourced: run in a subshell so that set -euo pipefail does not leak into the caller.
    (_pyabouts_setup_main "$@")
    _pyabouts_setup_rc=$?
    unset -f _pyabouts_setup_main
    return "$_pyabouts_setup_rc"
else
    _pyabouts_setup_main "$@"
fi
