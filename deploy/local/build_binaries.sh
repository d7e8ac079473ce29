#!/usr/bin/env bash
# Build the upstream Go binaries that pyabouts' tests and benchmarks run against, from their
# Go modules (no registry ships them as binaries; see shared/notes/environment.md).
#
#   bash deploy/local/build_binaries.sh                    # kube-apiserver only (the default)
#   bash deploy/local/build_binaries.sh kube-apiserver multus whereabouts   # + its node-slice controller
#   bash deploy/local/build_binaries.sh kubernetes   # kube-apiserver, kubelet, kube-scheduler,
#                                                    # kube-controller-manager, kube-proxy
#
# Each binary is cached outside the repo, keyed by version:
#   ${PYABOUTS_CACHE:-~/.cache/pyabouts}/bin/<name>-<version>
# and a cached binary is reused without touching Go at all. The wrapper modules live in
#   ${PYABOUTS_CACHE:-~/.cache/pyabouts}/build/<name>-<version>/
# Never put Go code or binaries in the repo.
#
# Idempotent; concurrent runs wait for each other (flock) instead of building twice.
# Adding a binary: write a build_<name> function and add it to the `case` in main.

set -euo pipefail

KUBE_VERSION="${PYABOUTS_KUBE_VERSION:-v1.34.3}"
MULTUS_VERSION="${PYABOUTS_MULTUS_VERSION:-v4.2.3}"
WHEREABOUTS_VERSION="${PYABOUTS_WHEREABOUTS_VERSION:-v0.9.4}"

CACHE_DIR="${PYABOUTS_CACHE:-${HOME}/.cache/pyabouts}"
BIN_DIR="${CACHE_DIR}/bin"
BUILD_DIR="${CACHE_DIR}/build"

log() { echo "[build] $*"; }
die() {
    echo "[build] error: $*" >&2
    exit 1
}

find_go() {
    if [[ -n "${GO:-}" ]]; then
        echo "$GO"
    elif [[ -x /usr/local/go/bin/go ]]; then
        echo /usr/local/go/bin/go
    elif command -v go >/dev/null 2>&1; then
        command -v go
    else
        die "no Go toolchain (looked at \$GO, /usr/local/go/bin/go and PATH)"
    fi
}

# cached NAME VERSION: true (and prints the path) when the binary is already built.
cached() {
    local out="${BIN_DIR}/$1-$2"
    if [[ -x "$out" ]]; then
        log "$1 $2 cached: $out"
        return 0
    fi
    return 1
}

# with_lock NAME VERSION FUNC [ARGS...]: run FUNC ARGS under an exclusive lock for this binary, so that two
# setups started at once build it only once (the second one finds it cached afterwards).
with_lock() {
    local name="$1" version="$2" func="$3"
    shift 3
    mkdir -p "$BIN_DIR" "$BUILD_DIR"
    local lock="${BUILD_DIR}/.${name}-${version}.lock"
    exec {lock_fd}>"$lock"
    if ! flock -n "$lock_fd"; then
        log "another build of $name $version is running; waiting for it"
        flock "$lock_fd"
    fi
    if ! cached "$name" "$version"; then
        "$func" "$@"
    fi
    exec {lock_fd}>&-
}

# write_tools_go DIR PACKAGE...: a tools.go in the wrapper module DIR that imports each
# PACKAGE, so that `go mod tidy` keeps what they need.
write_tools_go() {
    local dir="$1" pkg
    shift
    {
        echo "//go:build tools"
        echo
        echo "package tools"
        echo
        echo "import ("
        for pkg in "$@"; do
            echo "	_ \"${pkg}\""
        done
        echo ")"
    } >"${dir}/tools.go"
}

# go_build_wrapper DIR OUT PKG [LDFLAGS]: tidy the wrapper module in DIR, build PKG into OUT
# (through a temporary file, so an interrupted build never leaves a half-written binary).
go_build_wrapper() {
    local dir="$1" out="$2" pkg="$3" ldflags="${4:-}"
    local go
    go="$(find_go)"
    log "go mod tidy -e in $dir"
    (cd "$dir" && "$go" mod tidy -e)
    log "go build $pkg (this takes minutes on 2 cores)"
    local t0=$SECONDS
    (cd "$dir" && "$go" build -ldflags "$ldflags" -o "${out}.tmp" "$pkg")
    mv -f "${out}.tmp" "$out"
    log "built $out in $((SECONDS - t0)) s ($(du -h "$out" | cut -f1))"
}

# --- Kubernetes: kube-apiserver, kubelet, kube-scheduler, kube-controller-manager, kube-proxy
# k8s.io/kubernetes replaces its k8s.io/* staging modules with local paths, so a wrapper
# module must replace each of them with the published v0.X.Y version. One wrapper module
# imports every command, so they share its module download and Go's build cache.
KUBE_COMMANDS=(kube-apiserver kubelet kube-scheduler kube-controller-manager kube-proxy)

# prepare_kube_module DIR: write the wrapper module into DIR and tidy it (under a lock of its
# own: the commands' builds may run at once, and only one may rewrite go.mod).
prepare_kube_module() {
    local dir="$1" version="$KUBE_VERSION"
    local staging_version="v0.${version#v1.}"
    local go
    go="$(find_go)"
    mkdir -p "$dir"
    exec {module_lock_fd}>"${dir}.lock"
    flock "$module_lock_fd"
    if [[ -f "${dir}/.prepared" ]]; then
        exec {module_lock_fd}>&-
        return 0
    fi
    log "go mod download k8s.io/kubernetes@$version"
    # Start from scratch: a go.mod left by an interrupted run must not get in the way.
    rm -f "${dir}/go.mod" "${dir}/go.sum"
    local info gomod
    info="$(cd "$dir" && "$go" mod download -json "k8s.io/kubernetes@${version}")"
    gomod="$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$info")"
    [[ -f "$gomod" ]] || die "go mod download did not report k8s.io/kubernetes' go.mod: $info"

    local replaces
    replaces="$(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/src/k8s\.io/.*$#\1#p' "$gomod")"
    [[ -n "$replaces" ]] || die "no staging replace lines in $gomod"
    log "$(wc -l <<<"$replaces") staging modules replaced with $staging_version"

    {
        echo "module local/kas"
        echo
        echo "go 1.24"
        echo
        echo "require k8s.io/kubernetes ${version}"
        echo
        echo "replace ("
        local m
        while read -r m; do
            echo "	${m} => ${m} ${staging_version}"
        done <<<"$replaces"
        echo ")"
    } >"${dir}/go.mod"
    write_tools_go "$dir" "${KUBE_COMMANDS[@]/#/k8s.io/kubernetes/cmd/}"
    log "go mod tidy -e in $dir"
    (cd "$dir" && "$go" mod tidy -e)
    touch "${dir}/.prepared"
    exec {module_lock_fd}>&-
}

# build_kube_command NAME: one of KUBE_COMMANDS, with the version stamped in (without the
# ldflags the binaries report v0.0.0-master, and kubectl and kubelet complain).
build_kube_command() {
    local name="$1" version="$KUBE_VERSION"
    local dir="${BUILD_DIR}/kubernetes-${version}"
    local out="${BIN_DIR}/${name}-${version}"
    local go
    go="$(find_go)"
    local t0=$SECONDS
    log "building $name $version in $dir"
    prepare_kube_module "$dir"
    local minor="${version#v1.}"
    minor="${minor%%.*}"
    local ldflags="-X k8s.io/component-base/version.gitVersion=${version}"
    ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
    ldflags+=" -X k8s.io/component-base/version.gitMinor=${minor}"
    ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
    log "go build $name (minutes on 2 cores)"
    (cd "$dir" && "$go" build -ldflags "$ldflags" -o "${out}.tmp" "k8s.io/kubernetes/cmd/${name}")
    mv -f "${out}.tmp" "$out"
    log "$name $version ready in $((SECONDS - t0)) s: $out ($(du -h "$out" | cut -f1))"
}

# --- Multus ---------------------------------------------------------------------------------
# The thin plugin (`multus`, which the harness runs as a node's runtime would) and what the
# Multus image built here holds for its own DaemonSets: the thin DaemonSet's entrypoint, its
# installer and the passthru plugin that installs, the thick DaemonSet's daemon and shim.
# Cached as multus-<version> (the plugin) and multus-<command>-<version>. One wrapper module imports them all, so they share its build cache.
# `go install ...@v4.2.3` fails here (the proxy refuses the module's version list).
MULTUS_MODULE="gopkg.in/k8snetworkplumbingwg/multus-cni.v4"
MULTUS_COMMANDS=(multus thin_entrypoint install_multus passthru-cni multus-daemon multus-shim)

multus_binary() {
    if [[ "$1" == multus ]]; then echo multus; else echo "multus-$1"; fi
}

build_multus() {
    local version="$MULTUS_VERSION"
    local dir="${BUILD_DIR}/multus-${version}"
    local t0=$SECONDS
    log "building multus $version (${MULTUS_COMMANDS[*]}) in $dir"
    mkdir -p "$dir"
    cat >"${dir}/go.mod" <<EOF
module local/multus

go 1.24

require ${MULTUS_MODULE} ${version}
EOF
    write_tools_go "$dir" "${MULTUS_COMMANDS[@]/#/${MULTUS_MODULE}/cmd/}"
    local c go out
    go="$(find_go)"
    log "go mod tidy -e in $dir"
    (cd "$dir" && "$go" mod tidy -e)
    for c in "${MULTUS_COMMANDS[@]}"; do
        out="${BIN_DIR}/$(multus_binary "$c")-${version}"
        [[ -x "$out" ]] && continue
        log "go build $c"
        # Static: the same binaries run on the host and in the Multus image.
        (cd "$dir" && CGO_ENABLED=0 "$go" build -o "${out}.tmp" "${MULTUS_MODULE}/cmd/${c}")
        mv -f "${out}.tmp" "$out"
    done
    log "multus $version ready in $((SECONDS - t0)) s"
}

multus_cached() {
    local c
    for c in "${MULTUS_COMMANDS[@]}"; do
        [[ -x "${BIN_DIR}/$(multus_binary "$c")-${MULTUS_VERSION}" ]] || return 1
    done
    log "multus $MULTUS_VERSION cached: ${BIN_DIR}/multus-*${MULTUS_VERSION}"
}

# Where Go keeps the source of module $2, as required by the wrapper module in BUILD_DIR/$1.
module_dir() {
    local go
    go="$(find_go)"
    (cd "${BUILD_DIR}/$1" && "$go" list -m -f '{{.Dir}}' "$2")
}

# The NetworkAttachmentDefinition CRD, from the Multus module's own deployment file (the first
# document of deployments/multus-daemonset.yml), next to the binary:
#   ${BIN_DIR}/multus-<version>-nad-crd.yaml
extract_multus_crd() {
    local version="$MULTUS_VERSION"
    local out="${BIN_DIR}/multus-${version}-nad-crd.yaml"
    [[ -f "$out" ]] && return 0
    local moddir
    moddir="$(module_dir "multus-${version}" gopkg.in/k8snetworkplumbingwg/multus-cni.v4)"
    local source="${moddir}/deployments/multus-daemonset.yml"
    [[ -f "$source" ]] || die "no $source in the Multus module"
    awk '/^---$/ { doc++; next } doc == 1' "$source" >"${out}.tmp"
    grep -q '^kind: CustomResourceDefinition$' "${out}.tmp" || die "no CRD first in $source"
    mv -f "${out}.tmp" "$out"
    log "NetworkAttachmentDefinition CRD: $out"
}

# Multus' own DaemonSet manifests (thin, and the thick one of the kind lab) and its LICENSE,
# unchanged, next to the binaries, for the local cluster's Multus image and install:
#   ${BIN_DIR}/multus-<version>-daemonset.yml, -daemonset-thick.yml, -LICENSE
extract_multus_manifests() {
    local version="$MULTUS_VERSION"
    local prefix="${BIN_DIR}/multus-${version}"
    [[ -f "${prefix}-daemonset.yml" && -f "${prefix}-daemonset-thick.yml" && -f "${prefix}-LICENSE" ]] && return 0
    local moddir
    moddir="$(module_dir "multus-${version}" "$MULTUS_MODULE")"
    cp "${moddir}/deployments/multus-daemonset.yml" "${prefix}-daemonset.yml.tmp"
    cp "${moddir}/deployments/multus-daemonset-thick.yml" "${prefix}-daemonset-thick.yml.tmp"
    cp "${moddir}/LICENSE" "${prefix}-LICENSE.tmp"
    local f
    for f in daemonset.yml daemonset-thick.yml LICENSE; do
        chmod 0644 "${prefix}-${f}.tmp"
        mv -f "${prefix}-${f}.tmp" "${prefix}-${f}"
    done
    log "Multus manifests: ${prefix}-daemonset.yml, ${prefix}-daemonset-thick.yml"
}

# --- whereabouts (for comparison runs) -----------------------------------------------------
build_whereabouts() {
    local version="$WHEREABOUTS_VERSION"
    local dir="${BUILD_DIR}/whereabouts-${version}"
    local out="${BIN_DIR}/whereabouts-${version}"
    local mod="github.com/k8snetworkplumbingwg/whereabouts"
    local t0=$SECONDS
    log "building whereabouts $version in $dir"
    mkdir -p "$dir"
    cat >"${dir}/go.mod" <<EOF
module local/whereabouts

go 1.25.5

require ${mod} ${version}

replace github.com/gogo/protobuf => github.com/gogo/protobuf v1.3.2
EOF
    cat >"${dir}/tools.go" <<EOF
//go:build tools

package tools

import _ "${mod}/cmd"
EOF
    go_build_wrapper "$dir" "$out" "${mod}/cmd"
    log "whereabouts $version ready in $((SECONDS - t0)) s: $out"
}

# Its node-slice controller (cmd/nodeslicecontroller): what cuts a range into the
# NodeSlicePools that node_slice_size reads, for the migration tests of node-slice pools. A
# wrapper module of its own, as it imports packages the plugin does not.
build_whereabouts_node_slice_controller() {
    local version="$WHEREABOUTS_VERSION"
    local dir="${BUILD_DIR}/whereabouts-node-slice-controller-${version}"
    local out="${BIN_DIR}/whereabouts-node-slice-controller-${version}"
    local mod="github.com/k8snetworkplumbingwg/whereabouts"
    mkdir -p "$dir"
    cat >"${dir}/go.mod" <<EOF
module local/whereabouts-node-slice-controller

go 1.25.5

require ${mod} ${version}

replace github.com/gogo/protobuf => github.com/gogo/protobuf v1.3.2
EOF
    write_tools_go "$dir" "${mod}/cmd/nodeslicecontroller"
    go_build_wrapper "$dir" "$out" "${mod}/cmd/nodeslicecontroller"
}

# Its CRDs and RBAC (ServiceAccount, ClusterRole and binding; not its DaemonSet), from the
# module's doc/crds/, next to the binary, for runs that call it as a node would:
#   ${BIN_DIR}/whereabouts-<version>-install.yaml
extract_whereabouts_manifests() {
    local version="$WHEREABOUTS_VERSION"
    local out="${BIN_DIR}/whereabouts-${version}-install.yaml"
    [[ -f "$out" ]] && return 0
    local moddir
    moddir="$(module_dir "whereabouts-${version}" github.com/k8snetworkplumbingwg/whereabouts)"
    local crds="${moddir}/doc/crds"
    [[ -f "${crds}/daemonset-install.yaml" ]] || die "no doc/crds in the whereabouts module"
    {
        for crd in ippools overlappingrangeipreservations nodeslicepools; do
            echo "---"
            cat "${crds}/whereabouts.cni.cncf.io_${crd}.yaml"
        done
        awk 'BEGIN { RS = "\n---\n" } !/\nkind: DaemonSet/ { print "---"; print }' \
            "${crds}/daemonset-install.yaml"
    } >"${out}.tmp"
    grep -q '^kind: ClusterRole$' "${out}.tmp" || die "no ClusterRole in ${crds}"
    mv -f "${out}.tmp" "$out"
    log "whereabouts CRDs and RBAC: $out"
}

main() {
    local targets=("$@")
    ((${#targets[@]})) || targets=(kube-apiserver)
    local t
    for t in "${targets[@]}"; do
        case "$t" in
        kube-apiserver | kubelet | kube-scheduler | kube-controller-manager | kube-proxy)
            cached "$t" "$KUBE_VERSION" || with_lock "$t" "$KUBE_VERSION" build_kube_command "$t"
            ;;
        kubernetes) main "${KUBE_COMMANDS[@]}" ;;
        multus)
            multus_cached || with_lock multus-commands "$MULTUS_VERSION" build_multus
            extract_multus_crd
            extract_multus_manifests
            ;;
        whereabouts)
            cached whereabouts "$WHEREABOUTS_VERSION" ||
                with_lock whereabouts "$WHEREABOUTS_VERSION" build_whereabouts
            cached whereabouts-node-slice-controller "$WHEREABOUTS_VERSION" ||
                with_lock whereabouts-node-slice-controller "$WHEREABOUTS_VERSION" \
                    build_whereabouts_node_slice_controller
            extract_whereabouts_manifests
            ;;
        all) main kubernetes multus whereabouts ;;
        -h | --help)
            sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
            return 0
            ;;
        *) die "unknown binary '$t' (known: ${KUBE_COMMANDS[*]} kubernetes multus whereabouts all)" ;;
        esac
    done
}

main "$@"
