"""A node-local queue per pool: plugin processes on one node take turns writing a pool.

Without it, N processes starting at once on a node all read the same block, all write, and all
but one conflict, round after round: O(N^2) work on a node that is already busy starting pods.
With it, a node sends one write at a time per pool (as host-local does with its lock file), and
only nodes contend with each other. It is an optimisation, not what makes allocation safe: that
is the compare-and-swap on the store. So a queue that cannot be joined is skipped.

Turns are taken in arrival order (a ticket per process), not by whoever polls first: with a
free-for-all lock the unluckiest of fifty waiters could wait for a minute. And a process waits
as long as the queue moves, not for a fixed time: on a starved node every turn is slow, and
writers that gave up waiting after 5 s raced each other round after round (seen: 300 DELs at 50
at once on two cores, one lost 20 races in a row and ran out of time, code 11). It goes ahead
without its turn only when the head of the queue has kept it for PATIENCE (stopped, or stuck on
a store that is down), or when two thirds of its time are gone, keeping a third for writing.

Layout: run_dir/queues/<pool digest>/ holds one file per waiting or writing process, named by
its ticket number and flock-ed by it while it lives, so that a killed process's ticket is seen
dead and skipped; `join.lock` makes taking the next number atomic.
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

PATIENCE = 10.0  # seconds the head of the queue may keep its turn before we write anyway
WAIT_SHARE = 2 / 3  # of the time left before the deadline, what may be spent waiting in line
POLL_NEXT = 0.005  # seconds between looks when only the current writer is ahead
POLL_BEHIND = 0.1  # further back, an occasional look: waiters must not load a busy node
_SUFFIX = ".ticket"
_DIGITS = 12


@contextlib.contextmanager
def node_queue(run_dir: str, pools: Iterable[PoolId], *, deadline: float) -> Iterator[None]:
    """Wait for this node's turn at every pool in `pools` (in a fixed order, so no deadlock);
    go ahead without it if the queue stands still for PATIENCE or the deadline draws near."""
    give_up = time.monotonic() + WAIT_SHARE * (deadline - time.monotonic())
    with contextlib.ExitStack() as held:
        for pool in sorted(set(pools)):
            ticket = _join(Path(run_dir) / "queues" / _digest(pool))
            if ticket is None:
                continue
            held.callback(ticket.leave)
            if not ticket.wait_for_turn(give_up):
                break
        yield


def _digest(pool: PoolId) -> str:
    return hashlib.sha256(f"{pool.network}\0{pool.family}".encode()).hexdigest()[:32]


class _Ticket:
    """This process's place in one pool's queue: a file it holds an flock on while it lives."""

    def __init__(self, queue: Path, number: int, descriptor: int) -> None:
        self.queue, self.number, self.descriptor = queue, number, descriptor

    def wait_for_turn(self, give_up: float) -> bool:
        """True once no live ticket is ahead of ours; False if we go ahead without the turn."""
        try:
            return self._wait(give_up)
        except OSError as exc:  # the queue directory went away, say
            log.warning("node queue failed (%s): writing without it", exc)
            return False

    def _wait(self, give_up: float) -> bool:
        started = time.monotonic()
        head, head_since = -1, started
        log.debug("node queue: in line, %.1f s to go ahead", give_up - started)
        while True:
            ahead = [n for n in _tickets(self.queue) if n < self.number]
            if not ahead:
                log.debug("node queue: our turn after %.2f s", time.monotonic() - started)
                return True
            if not _alive(self.queue, ahead[0]):
                continue  # a killed process's ticket, now removed: look again at once
            now = time.monotonic()
            if ahead[0] != head:
                head, head_since = ahead[0], now
            elif now - head_since >= PATIENCE:
                log.info("node queue stood still for %.0f s: writing without waiting", PATIENCE)
                return False
            if now >= give_up:
                log.info(
                    "node queue: %d ahead near the deadline: writing without waiting", len(ahead)
                )
                return False
            time.sleep(POLL_NEXT if len(ahead) == 1 else POLL_BEHIND)

    def leave(self) -> None:
        with contextlib.suppress(OSError):
            _path(self.queue, self.number).unlink()
        os.close(self.descriptor)  # unlinked first, so no waiter ever sees our ticket dead


def _join(queue: Path) -> _Ticket | None:
    """A ticket behind every ticket taken before, or None if the queue cannot be used."""
    try:
        queue.mkdir(parents=True, exist_ok=True)
        with _exclusive(queue / "join.lock"):
            number = max(_tickets(queue), default=0) + 1
            return _Ticket(queue, number, _create_held(queue, number))
    except OSError as exc:
        log.warning("no node queue (%s): writing without it", exc)
        return None


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an flock on `path`. Others hold it for microseconds, so it comes at once, unless
    its holder was stopped right then: then TimeoutError (an OSError) after PATIENCE."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        give_up = time.monotonic() + PATIENCE
        while not _try_lock(descriptor, fcntl.LOCK_EX):
            if time.monotonic() >= give_up:
                raise TimeoutError(f"{path} stayed locked for {PATIENCE:.0f} s")
            time.sleep(POLL_NEXT)
        yield
    finally:
        os.close(descriptor)


def _try_lock(descriptor: int, kind: int) -> bool:
    """Take an flock of `kind` without waiting; False if someone else holds one."""
    try:
        fcntl.flock(descriptor, kind | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _create_held(queue: Path, number: int) -> int:
    """Create ticket `number` already flock-ed: made under a temporary name and renamed, so
    that nobody sees it unlocked and takes it for dead."""
    temporary = queue / f".{number}.{os.getpid()}.new"
    descriptor = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        temporary.rename(_path(queue, number))
    except OSError:
        os.close(descriptor)
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    return descriptor


def _tickets(queue: Path) -> list[int]:
    """The ticket numbers in `queue`, lowest (first come) first."""
    names = (name for name in os.listdir(queue) if name.endswith(_SUFFIX))
    return sorted(int(name[: -len(_SUFFIX)]) for name in names if name[: -len(_SUFFIX)].isdigit())


def _path(queue: Path, number: int) -> Path:
    return queue / f"{number:0{_DIGITS}d}{_SUFFIX}"


def _alive(queue: Path, number: int) -> bool:
    """Whether ticket `number`'s process still holds it; a dead ticket is removed."""
    try:
        descriptor = os.open(_path(queue, number), os.O_RDONLY)
    except FileNotFoundError:
        return False  # it just left
    try:
        if not _try_lock(descriptor, fcntl.LOCK_SH):
            return True
    finally:
        os.close(descriptor)
    with contextlib.suppress(FileNotFoundError):
        _path(queue, number).unlink()
    return False
