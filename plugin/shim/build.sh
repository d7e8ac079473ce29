#!/bin/sh
# Build the node shim into $1 (or, with --which-go, print the Go toolchain it uses): static (CGO_ENABLED=0, no libc), reproducible paths
# (-trimpath), without symbol tables (-s -w). Used by deploy/local/setup.sh for the tests and
# by the Containerfile's build stage; any Go from 1.19 (Debian 12's golang-go) builds it, for
# Linux only (its socket calls are Linux's).
set -eu
out="$1"
go="${GO:-}"
if [ -z "$go" ]; then
    for candidate in /usr/local/go/bin/go "$(command -v go || true)" /usr/lib/go/bin/go; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            go="$candidate"
            break
        fi
    done
fi
[ -n "$go" ] || { echo "build.sh: no Go toolchain (\$GO, /usr/local/go/bin/go, PATH)" >&2; exit 1; }
if [ "$out" = --which-go ]; then
    echo "$go"
    exit 0
fi
cd "$(dirname "$0")"
mkdir -p "$(dirname "$out")"
CGO_ENABLED=0 "$go" build -trimpath -ldflags="-s -w" -o "$out.tmp" .
mv -f "$out.tmp" "$out"
