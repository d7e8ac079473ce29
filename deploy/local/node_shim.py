"""The node shim (plugin/shim/, Go) built here for the tests and the benchmark, and the checks
CI runs on its source: `go test`, `go vet`, `gofmt -l`.

`python -m deploy.local.node_shim build|check`.
"""

from __future__ import annotations

import argparse
import fcntl
import sys
from pathlib import Path

from deploy.local.commands import LocalToolError, run_command

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIM_SOURCE = REPO_ROOT / "plugin" / "shim"
BUILD_SCRIPT = SHIM_SOURCE / "build.sh"
#: build/ is ignored by git: the binary is never committed.
SHIM_BINARY = REPO_ROOT / "build" / "shim" / "pyabouts-shim"
GO_TIMEOUT_S = 600.0


def go_toolchain() -> str:
    """The `go` that plugin/shim/build.sh uses."""
    return run_command(["sh", str(BUILD_SCRIPT), "--which-go"], timeout=30).strip()


def built_shim() -> Path:
    """SHIM_BINARY, built from the current source (Go's build cache makes a rebuild of an
    unchanged source cost a fraction of a second); one build at a time across processes."""
    SHIM_BINARY.parent.mkdir(parents=True, exist_ok=True)
    with open(SHIM_BINARY.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run_command(["sh", str(BUILD_SCRIPT), str(SHIM_BINARY)], timeout=GO_TIMEOUT_S)
    return SHIM_BINARY


def check_source() -> list[str]:
    """The files `gofmt -l` would reformat; LocalToolError with its findings if `go vet` fails."""
    go = go_toolchain()
    run_command([go, "vet", "./..."], cwd=SHIM_SOURCE, timeout=GO_TIMEOUT_S)
    gofmt = str(Path(go).with_name("gofmt"))
    return run_command([gofmt, "-l", "."], cwd=SHIM_SOURCE, timeout=GO_TIMEOUT_S).split()


def run_go_tests() -> str:
    """`go test` of the shim's package, uncached; its verbose output."""
    go = go_toolchain()
    return run_command(
        [go, "test", "-count=1", "-v", "./..."], cwd=SHIM_SOURCE, timeout=GO_TIMEOUT_S
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.node_shim", description=__doc__)
    parser.add_argument("action", choices=["build", "check"])
    args = parser.parse_args(argv)
    try:
        if args.action == "build":
            print(built_shim())
            return
        findings = check_source()
    except LocalToolError as exc:
        sys.exit(str(exc))
    print("\n".join(f"not gofmt-formatted: {name}" for name in findings) or "plugin/shim: clean")
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
