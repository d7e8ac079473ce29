"""A node-local queue per pool: plugin processes on one node take turns writing a pool.

Without it, N processes starting at once on a node all read the same block, all write, and all
but one conflict, round after round: O(N^2) work on a node that is already busy starting pods.
With it, a node sends one write at a time per pool (as host-local does with its lock file), and
only nodes contend with each other. It is an optimisation, not what makes allocation safe: that
is the compare-and-swap on the store. So a lock that cannot be taken is skipped, and a turn that
does not come within PATIENCE is not waited for: a holder starved of CPU must not stall the
whole node (seen with hundreds of plugin processes on two cores).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pyabouts.ipam.pool import PoolId

log = logging.getLogger(__name__)

PATIENCE = 5.0  # seconds to wait for this node's turn before writing anyway
POLL_FIRST = 0.002  # seconds between tries, doubling up to POLL_MAX: a queue of fifty
POLL_MAX = 0.05  # waiters must not wake a busy node thousands of times a second


@contextlib.contextmanager
def node_queue(run_dir: str, pools: Iterable[PoolId], *, deadline: float) -> Iterator[None]:
    """Wait for this node's turn at every pool in `pools` (in a fixed order, so no deadlock),
    until PATIENCE or `deadline` runs out; then go ahead without it."""
    give_up = min(deadline, time.monotonic() + PATIENCE)
    with contextlib.ExitStack() as held:
        for pool in sorted(set(pools)):
            descriptor = _open_lock(Path(run_dir) / "locks", pool)
            if descriptor is None:
                continue
            held.callback(os.close, descriptor)
            if not _wait_for(descriptor, give_up):
                log.info("node queue for %s still busy: writing without waiting", pool.network)
                break
        yield


def _open_lock(directory: Path, pool: PoolId) -> int | None:
    name = hashlib.sha256(f"{pool.network}\0{pool.family}".encode()).hexdigest()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return os.open(directory / f"{name[:32]}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log.warning("no node queue (%s): writing without it", exc)
        return None


def _wait_for(descriptor: int, give_up: float) -> bool:
    """True once the lock is ours; False if `give_up` came first."""
    pause = POLL_FIRST
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= give_up:
            return False
        time.sleep(pause)
        pause = min(POLL_MAX, pause * 2)
