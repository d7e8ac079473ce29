"""Waiting for a condition in a test, with a bound and a reason for the failure."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, *, every: float = 0.2
) -> float:
    """Seconds until `condition` held, asked every `every` seconds; AssertionError naming
    `what` after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(every)
    return time.monotonic() - started
