"""Concurrent decisions over the same ranges share one read and one optimistic write.

The node agent serves many CNI requests at once, and on a busy node most of them want the same
pool. Written one by one, each would read, write and (all but one) conflict; batched, the
requests that arrive while a write is in flight (or while the batch's own write backs off from
a conflict) are decided together, in arrival order, on one view, and stored with one write.
Every guarantee of a single transaction holds: the batch is decided afresh after a conflict,
and a decision that fails (range exhausted, requested address taken) is rolled back on the view
alone, so it neither writes nor spoils the others.

No thread of its own: the first request to find nobody writing leads the batch, and when its
batch is stored it hands the lead to the oldest waiting request, so no request answers late
because it kept serving others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from pyabouts.ipam.errors import StoreUnavailableError
from pyabouts.ipam.pool import PoolId, PoolView
from pyabouts.ipam.ranges import AddressRange
from pyabouts.ipam.store import PoolStore
from pyabouts.ipam.transaction import (
    BACKOFF_MAX,
    Span,
    describe_blocks,
    run_span_transaction,
)

T = TypeVar("T")

MAX_BATCH = 256  # decisions per write: one block's worth keeps a write's size bounded


@dataclass(eq=False)
class _Request:
    ranges: Sequence[AddressRange]
    decide: Callable[[PoolView], Any]
    deadline: float
    watch_checked: bool = False  # see Transactions.run
    # Put back in line after its decision wrote nothing, on a view then checked against the
    # store: its next decision is its answer (CoalescingTransactions._decide_batch).
    checked: bool = False
    wake: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # set, with wake, when this request is to lead the next batch
    done: bool = False
    value: Any = None
    error: BaseException | None = None

    def finish(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error, self.done = value, error, True
        self.wake.set()


@dataclass
class _Queue:
    """The requests waiting for one span set, and whether one of them is leading a batch."""

    waiting: list[_Request] = field(default_factory=list)
    leading: bool = False


def decide_each(
    view: PoolView, decisions: Sequence[Callable[[PoolView], Any]]
) -> list[tuple[Any, bool]]:
    """Apply `decisions` in order on `view`; per decision, its value or the exception it raised
    (its changes undone), and whether it changed the view."""
    outcomes: list[tuple[Any, bool]] = []
    for decide in decisions:
        mark = view.savepoint()
        try:
            outcomes.append((decide(view), view.savepoint() != mark))
        except Exception as exc:  # one request's failure is that request's answer only
            view.rollback(mark)
            outcomes.append((_Failed(exc), False))
    return outcomes


@dataclass(frozen=True, slots=True)
class _Failed:
    error: Exception


class _LeaderGone(Exception):  # noqa: N818 - an outcome, not an error
    """The request that leads a batch reached its deadline, and was answered."""


def _answer(request: _Request, outcome: Any) -> None:
    """Answer `request` with its decision's value, or the error it failed with (_Failed)."""
    if isinstance(outcome, _Failed):
        request.finish(error=outcome.error)
    else:
        request.finish(outcome)


def _ranges_of(batch: list[_Request]) -> list[AddressRange]:
    """The ranges of `batch`'s requests, each once (a network's requests share its objects)."""
    return list({id(rng): rng for request in batch for rng in request.ranges}.values())


def _answer_expired(batch: list[_Request]) -> None:
    """Answer the requests of `batch` whose deadline passed, and take them out of it (in
    place): they are not decided again. One whose decision a store that writes block by block
    stored in part is told it failed, and the runtime's DEL frees what it got."""
    now = time.monotonic()
    for request in batch:
        if request.deadline <= now:
            request.finish(error=StoreUnavailableError("timed out waiting for the pool"))
    batch[:] = [request for request in batch if not request.done]


class CoalescingTransactions:
    """Transactions on `store` in which concurrent callers over the same ranges share writes.

    On a cache (`recheck` given: check a pool against the store before its next use, afresh or
    by its watch, see CachedStore.recheck), a decision that wrote nothing rests on blocks no
    compare-and-swap checked: "exhausted" or "already holds .5" may come from a stale copy.
    Those decisions are taken again on a checked view before they are answered: a fresh read,
    unless every one of them is `watch_checked` (Transactions.run).
    """

    def __init__(
        self,
        store: PoolStore,
        on_batch: Callable[[int], None] | None = None,
        recheck: Callable[[PoolId, bool], None] | None = None,
        *,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.store = store
        self.backoff_max = backoff_max  # see ipam.transaction.conflict_backoff_max
        self._on_batch = on_batch
        self._recheck = recheck
        self._lock = threading.Lock()
        self._queues: dict[tuple[Span, ...], _Queue] = {}

    def run(
        self,
        ranges: Sequence[AddressRange],
        decide: Callable[[PoolView], T],
        *,
        deadline: float,
        watch_checked: bool = False,
    ) -> T:
        spans = tuple(Span.of(rng) for rng in ranges)
        request = _Request(ranges, decide, deadline, watch_checked)
        with self._lock:
            queue = self._queues.setdefault(spans, _Queue())
            queue.waiting.append(request)
            request.lead = not queue.leading
            queue.leading = True
        if not request.lead:
            self._wait_turn(queue, request)
        while not request.done:
            self._lead(spans, queue, request)
            if not request.done:  # put back in line by its own batch: answered, or to lead
                request.wake.wait()
        if request.error is not None:
            try:
                raise request.error
            finally:
                del request  # else error -> traceback -> this frame -> request -> error
        return cast(T, request.value)

    def _decide(
        self,
        spans: tuple[Span, ...],
        batch: list[_Request],
        joining: _Queue | None = None,
        leader: _Request | None = None,
    ) -> list[tuple[Any, bool]]:
        """Decide `batch` in one transaction. With `joining`, the requests that wait in it at
        each attempt join `batch` first: those that came while the view was read, or while a
        conflicting write backed off, are stored by this write rather than by one more. Those
        whose deadline passed leave `batch` (in place), answered (_LeaderGone when `leader` is
        one)."""

        def answer_expired() -> None:
            _answer_expired(batch)
            if leader is not None and leader.done:
                raise _LeaderGone  # its caller is answered: it leads no longer

        def decide(view: PoolView) -> list[tuple[Any, bool]]:
            if joining is not None:
                self._take_waiting(joining, batch)
            answer_expired()
            return decide_each(view, [r.decide for r in batch])

        def deadline() -> float:
            answer_expired()  # also while the store fails: asked before every pause
            return max((r.deadline for r in batch), default=0.0)

        try:
            return run_span_transaction(
                self.store,
                spans,
                decide,
                # The latest, as requests join: each one leaves the batch at its own deadline
                # (at the next attempt or pause), so one near its end cuts nobody else's short.
                deadline=deadline,
                # Each block as the ranges of the batch that cover it most (configs that share
                # a pool and CIDR share a queue, whatever their bounds).
                before_write=lambda changed: describe_blocks(changed, _ranges_of(batch)),
                backoff_max=self.backoff_max,
            )
        except _LeaderGone:
            raise
        except Exception as exc:  # the store failed the whole batch: everyone hears it
            return [(_Failed(exc), True)] * len(batch)

    def _take_waiting(self, queue: _Queue, batch: list[_Request]) -> None:
        with self._lock:
            taken = queue.waiting[: MAX_BATCH - len(batch)]
            del queue.waiting[: len(taken)]
        batch += taken

    def _wait_turn(self, queue: _Queue, request: _Request) -> None:
        """Until the request is answered or made leader. One never taken into a batch by its
        deadline is withdrawn (try again later); one in a batch waits for the batch, which
        answers it at its next attempt once its deadline passed (or puts it back in line, first,
        when the batch's leader leaves so)."""
        if request.wake.wait(max(0.0, request.deadline - time.monotonic())):
            return
        with self._lock:
            if request.lead:  # made leader just as its wait ran out: it must lead
                return
            if request in queue.waiting:
                queue.waiting.remove(request)
                request.finish(error=StoreUnavailableError("timed out waiting for the pool"))
                return
        request.wake.wait()

    def _lead(self, spans: tuple[Span, ...], queue: _Queue, leader: _Request) -> None:
        batch: list[_Request] = []
        outcomes: list[tuple[Any, bool]] = []
        try:
            self._take_waiting(queue, batch)
            if batch:
                outcomes = self._decide_batch(spans, batch, queue, leader)
        except _LeaderGone:  # the rest go on under the next leader, first in line
            with self._lock:
                queue.waiting[:0] = [request for request in batch if not request.done]
            batch = []
        finally:  # whatever escaped, the queue gets a leader and every request an answer
            self._hand_off(spans, queue)
            lost = _Failed(StoreUnavailableError("the batch failed: try again"))
            for i, request in enumerate(batch):
                if not request.done:  # a batch may have answered some before it failed
                    _answer(request, outcomes[i][0] if i < len(outcomes) else lost)

    def _decide_batch(
        self, spans: tuple[Span, ...], batch: list[_Request], queue: _Queue, leader: _Request
    ) -> list[tuple[Any, bool]]:
        outcomes = self._decide(spans, batch, joining=queue, leader=leader)
        if self._on_batch is not None:
            self._on_batch(len(batch))
        again = [
            not changed and not r.checked for r, (_, changed) in zip(batch, outcomes, strict=True)
        ]
        if not any(again) or self._recheck is None:
            return outcomes
        # What the write stored is answered now. The decisions that wrote nothing go back in
        # line, first, to be decided again by the next batch on a view checked against the
        # store, and answered as decided then: no answer waits for another's second decision.
        for request, (value, _), decide_again in zip(batch, outcomes, again, strict=True):
            if not decide_again:
                _answer(request, value)
        requeued = [
            request for request, decide_again in zip(batch, again, strict=True) if decide_again
        ]
        fresh = not all(request.watch_checked for request in requeued)
        for span in spans:
            self._recheck(span.pool, fresh)
        with self._lock:
            for request in requeued:
                request.checked, request.lead = True, False
                request.wake.clear()
            queue.waiting[:0] = requeued
        batch.clear()
        return []

    def _hand_off(self, spans: tuple[Span, ...], queue: _Queue) -> None:
        """The lead to the oldest waiting request, or the queue's end."""
        with self._lock:
            if queue.waiting:
                successor = queue.waiting[0]
                successor.lead = True
                successor.wake.set()
            else:
                queue.leading = False
                del self._queues[spans]
