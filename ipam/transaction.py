"""Optimistic concurrency: read, decide, write back if unchanged; on conflict, do it again.

No lock is taken anywhere. Writers of different pools never touch the same stored object, and
writers of one pool retry with jittered exponential backoff until a deadline.

A store that fails is retried too, in one of two ways. One that is busy (StoreBusyError: it
took the request but did not answer in time, or said to slow down) is up, and a burst is what
makes it slow: it is retried until the deadline, like a conflict, and not sooner than it asked
(Retry-After). One that cannot be reached
(any other StoreUnavailableError: connection refused, say) is retried for OUTAGE_GRACE, so that
an apiserver restart passes but a store that is down is reported (code 11) well within the
runtime's patience.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from pyabouts.ipam.errors import StoreBusyError, StoreUnavailableError
from pyabouts.ipam.pool import Block, BlockKey, PoolId, PoolView
from pyabouts.ipam.ranges import AddressRange
from pyabouts.ipam.slices import is_registry
from pyabouts.ipam.store import PoolStore

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_FIRST = 0.005  # seconds; doubles per conflict up to BACKOFF_MAX, with full jitter
BACKOFF_MAX = 0.4
# On etcd a write that lost a race is tried again sooner: a refused transaction costs etcd
# far less than a refused PUT costs kube-apiserver, which decodes the whole block it carries.
# With a pool filled to its last addresses from ten nodes at once, the longer waits made the
# last ADDs' wall time (in a quick benchmark run, 1.16x host-local's at 0.4 s, 0.99x at 0.05 s).
# The price is more retries on a contended pool: with N nodes writing one block, about N
# refused writes every 25 ms at worst.
ETCD_BACKOFF_MAX = 0.05
# A lost race for a node slice registry: another node took its slice, and each node takes one
# per range once, so the race ends by itself; a long wait would only delay a node's first pod.
# (A busy apiserver's 429s still back off to BACKOFF_MAX: a StoreBusyError, not a conflict.)
CLAIM_BACKOFF_MAX = 0.02
OUTAGE_GRACE = 15.0  # seconds a store may stay unreachable (an apiserver restart takes ~5)


@dataclass(frozen=True, slots=True)
class Clock:
    """How the retry loop reads the time and waits: the real clock, or a test's fake one (the
    loop's timing is then tested without a real sleep)."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


REAL_CLOCK = Clock()


class Transactions(Protocol):
    """Runs decisions as optimistic transactions: one at a time (DirectTransactions) or several
    in one write (ipam.coalescing.CoalescingTransactions, in the node agent)."""

    def run(
        self,
        ranges: Sequence[AddressRange],
        decide: Callable[[PoolView], T],
        *,
        deadline: float,
        watch_checked: bool = False,
    ) -> T:
        """Run `decide` until its changes are stored; its value. `watch_checked`: an answer
        that wrote nothing may rest on a cache as the store's watch checked it (behind the
        store by the watch's lag at most), for answers that lag cannot make wrong (nothing to
        free, free counts); else a cache reads what it rests on afresh first."""
        ...


class DirectTransactions:
    """Each decision in a transaction of its own, on `store`."""

    def __init__(
        self, store: PoolStore, clock: Clock = REAL_CLOCK, *, backoff_max: float = BACKOFF_MAX
    ) -> None:
        self.store = store
        self.clock = clock
        self.backoff_max = backoff_max

    def run(
        self,
        ranges: Sequence[AddressRange],
        decide: Callable[[PoolView], T],
        *,
        deadline: float,
        watch_checked: bool = False,  # every read here is afresh
    ) -> T:
        return run_transaction(
            self.store,
            ranges,
            decide,
            deadline=deadline,
            clock=self.clock,
            backoff_max=self.backoff_max,
        )


def run_transaction(
    store: PoolStore,
    ranges: Sequence[AddressRange],
    decide: Callable[[PoolView], T],
    *,
    deadline: float,
    clock: Clock = REAL_CLOCK,
    backoff_max: float = BACKOFF_MAX,
) -> T:
    """Let `decide` change a fresh view of `ranges`, and store what it changed, until it sticks.

    `decide` may raise (a CniError, say); then nothing is written. It must be idempotent over
    stored state: it runs again after a conflict, on state that may include its earlier work.
    `deadline` is a `clock.now()` value (time.monotonic() by default); when it passes,
    StoreUnavailableError (try again later). A busy store is retried until then, an unreachable
    one for OUTAGE_GRACE at most; a conflict waits up to `backoff_max` (conflict_backoff_max).
    """
    return run_span_transaction(
        store,
        [Span.of(rng) for rng in ranges],
        decide,
        deadline=deadline,
        before_write=lambda changed: describe_blocks(changed, ranges),
        clock=clock,
        backoff_max=backoff_max,
    )


@dataclass(frozen=True, slots=True)
class Span:
    """The addresses [first, last] of one pool: what a transaction reads."""

    pool: PoolId
    first: int
    last: int

    @staticmethod
    def of(rng: AddressRange) -> Span:
        """What a transaction over `rng` reads (see AddressRange.reach)."""
        return Span(rng.pool, *rng.reach)


def conflict_backoff_max(datastore: str) -> float:
    """The longest wait before a write that lost a race with another is tried again, for the
    datastore a config names."""
    return ETCD_BACKOFF_MAX if datastore == "etcd" else BACKOFF_MAX


def run_span_transaction(
    store: PoolStore,
    spans: Sequence[Span],
    decide: Callable[[PoolView], T],
    *,
    deadline: float | Callable[[], float],
    before_write: Callable[[list[Block]], None] | None = None,
    clock: Clock = REAL_CLOCK,
    backoff_max: float = BACKOFF_MAX,
) -> T:
    """run_transaction over the blocks of `spans`; `before_write` may annotate changed blocks.
    A callable `deadline` is asked again before each retry (a batch that requests join).
    `backoff_max`: see conflict_backoff_max."""
    deadline_now = deadline if callable(deadline) else lambda: deadline
    attempt = 0
    outage_since: float | None = None
    while True:
        try:
            view = PoolView(_read(store, spans))
            result = decide(view)
            changed = _in_span_order(view.changed_blocks(), spans)
            if not changed:
                return result
            if before_write is not None:
                before_write(changed)
            conflicts = store.write_blocks(changed).conflicts
        except StoreUnavailableError as exc:
            # A write that timed out may or may not have happened: deciding again on a fresh
            # read is right either way.
            attempt += 1
            if isinstance(exc, StoreBusyError):
                outage_since = None  # it answers, if slowly: not an outage
                why = f"store busy ({exc.msg})"
                _back_off(clock, attempt, deadline_now(), exc, why, at_least=exc.retry_after)
            else:
                outage_since = outage_since or clock.now()
                give_up = min(deadline_now(), outage_since + OUTAGE_GRACE)
                _back_off(clock, attempt, give_up, exc, f"store unavailable ({exc.msg})")
            continue
        outage_since = None
        if not conflicts:
            return result
        attempt += 1
        details = ", ".join(f"{k.pool.network or '-'}@{k.base}" for k in conflicts)
        busy = StoreUnavailableError(
            f"gave up after {attempt} conflicting writes: the pool is too busy, try again",
            details=details,
        )
        # The write's first conflicting block, in the write's order (_in_span_order: registries
        # first): Kubernetes stops there, and etcd, which writes a transaction's blocks all or
        # none, names each stale one of it.
        cap = CLAIM_BACKOFF_MAX if is_registry(conflicts[0].pool) else backoff_max
        why = f"conflict on {len(conflicts)} block(s)"
        _back_off(clock, attempt, deadline_now(), busy, why, cap=cap)


def _back_off(
    clock: Clock,
    attempt: int,
    deadline: float,
    error: StoreUnavailableError,
    why: str,
    *,
    cap: float = BACKOFF_MAX,
    at_least: float | None = None,
) -> None:
    """Sleep before the next attempt, or raise `error` when the deadline would pass first.
    `at_least`: what the store asked for (Retry-After), spread over a quarter more, so that the
    nodes it told the same thing do not all come back at once."""
    # The exponent bounded: a float cannot hold 2 ** 1024, and short waits reach that many.
    delay = random.uniform(0, min(cap, BACKOFF_FIRST * 2 ** min(attempt, 32)))
    if at_least is not None:
        delay = max(delay, at_least * random.uniform(1.0, 1.25))
    if deadline - clock.now() <= delay:
        raise error
    log.info("%s, retry %d in %.0f ms", why, attempt, delay * 1e3)
    clock.sleep(delay)


def describe_blocks(blocks: Sequence[Block], ranges: Sequence[AddressRange]) -> None:
    """Record on each block the range that writes it, how much of the block it may give, and
    how much in all."""
    for block in blocks:
        counts = [
            (rng.count_within(block.key.base, block.last), rng.text, rng.size)
            for rng in ranges
            if rng.pool == block.key.pool
        ]
        kept = (block.capacity, block.range_text, block.range_size)
        block.capacity, block.range_text, block.range_size = max(counts, default=kept)


def _in_span_order(blocks: list[Block], spans: Sequence[Span]) -> list[Block]:
    """`blocks` in the order of the spans of their pools: a caller lists first what must stick
    before the rest is written (a node slice registry), as a store that writes block by block
    stops at the first conflict."""
    rank: dict[PoolId, int] = {}
    for span in spans:
        rank.setdefault(span.pool, len(rank))
    return sorted(blocks, key=lambda block: rank.get(block.key.pool, len(rank)))


def _read(store: PoolStore, spans: Sequence[Span]) -> list[Block]:
    blocks: dict[BlockKey, Block] = {}
    for span in spans:
        for block in store.read_blocks(span.pool, span.first, span.last):
            blocks[block.key] = block
    return list(blocks.values())
