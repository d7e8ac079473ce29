"""Running the local tools (openssl, etcdctl, kubectl...) with their output in the error."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path


class LocalToolError(RuntimeError):
    """A local tool is missing or failed; the message holds its output."""


def run_command(cmd: Sequence[str], *, cwd: Path | None = None, timeout: float = 60.0) -> str:
    """Run a command; raise with its output if it fails."""
    try:
        proc = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise LocalToolError(
            f"{cmd[0]!r} not found: run `bash deploy/local/setup.sh` to install it"
        ) from exc
    if proc.returncode != 0:
        raise LocalToolError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout
