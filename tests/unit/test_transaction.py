"""How the transaction loop retries a failing store: a busy one until the deadline, an
unreachable one for OUTAGE_GRACE. On a fake clock: each failed request "takes" REQUEST seconds."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from pyabouts.ipam.errors import StoreBusyError, StoreUnavailableError
from pyabouts.ipam.pool import Block, Owner, PoolId, PoolView
from pyabouts.ipam.store import WriteOutcome
from pyabouts.ipam.transaction import (
    BACKOFF_MAX,
    CLAIM_BACKOFF_MAX,
    ETCD_BACKOFF_MAX,
    OUTAGE_GRACE,
    Clock,
    Span,
    conflict_backoff_max,
    run_span_transaction,
)
from tests.memory_store import MemoryStore

POOL = PoolId("blue", 4)
SPANS = [Span(POOL, 0, 255)]
REQUEST = 5.0  # seconds a request that times out takes (the plugin's request timeout)
DEADLINE = 60.0


class FakeClock:
    """A clock for the retry loop that only moves when it sleeps or a request "takes" time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += 1

    def as_clock(self) -> Clock:
        return Clock(now=lambda: self.now, sleep=self.sleep)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class FailingStore(MemoryStore):
    """Fails its first reads with the errors `failures` makes, each after REQUEST seconds."""

    def __init__(self, clock: FakeClock, failures: list[StoreUnavailableError]) -> None:
        super().__init__()
        self.clock = clock
        self.failures = failures
        self.reads = 0

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        self.reads += 1
        if self.failures:
            self.clock.now += REQUEST
            raise self.failures.pop(0)
        return super().read_blocks(pool, first, last)


def busy() -> StoreBusyError:
    return StoreBusyError("Kubernetes API at https://api:6443 did not answer in time")


def refused() -> StoreUnavailableError:
    return StoreUnavailableError("Kubernetes API at https://api:6443 is unreachable")


def count_blocks(view: PoolView) -> int:
    return len(view.changed_blocks())  # a decision that writes nothing


def test_a_busy_store_is_retried_past_the_outage_grace(clock: FakeClock) -> None:
    slow_answers = int(OUTAGE_GRACE / REQUEST) + 4  # 35 s of timeouts: an outage would be over
    store = FailingStore(clock, [busy() for _ in range(slow_answers)])
    run_span_transaction(store, SPANS, count_blocks, deadline=DEADLINE, clock=clock.as_clock())
    assert store.reads == slow_answers + 1
    assert clock.now > OUTAGE_GRACE + REQUEST


def test_a_busy_store_is_retried_until_the_deadline_then_try_again_later(
    clock: FakeClock,
) -> None:
    store = FailingStore(clock, [busy() for _ in range(100)])
    with pytest.raises(StoreBusyError) as raised:
        run_span_transaction(store, SPANS, count_blocks, deadline=DEADLINE, clock=clock.as_clock())
    assert raised.value.code == 11
    assert "did not answer in time" in raised.value.msg
    assert DEADLINE - REQUEST <= clock.now <= DEADLINE + REQUEST


def test_a_busy_store_is_not_asked_again_before_it_said(clock: FakeClock) -> None:
    # An apiserver shutting down answers 429 with Retry-After: 5; nodes coming back at once
    # within 0.4 s, as the backoff alone would have them, is the load it asked to be spared.
    store = FailingStore(clock, [StoreBusyError("answered 429", retry_after=5.0)])
    run_span_transaction(store, SPANS, count_blocks, deadline=DEADLINE, clock=clock.as_clock())
    assert store.reads == 2
    assert REQUEST + 5.0 <= clock.now <= REQUEST + 5.0 * 1.25


def test_an_unreachable_store_is_given_up_after_the_outage_grace(clock: FakeClock) -> None:
    store = FailingStore(clock, [refused() for _ in range(100)])
    with pytest.raises(StoreUnavailableError) as raised:
        run_span_transaction(store, SPANS, count_blocks, deadline=DEADLINE, clock=clock.as_clock())
    assert not isinstance(raised.value, StoreBusyError)
    assert (raised.value.code, raised.value.msg) == (11, refused().msg)
    # The grace runs from the first failure's end, so the last request may end past it.
    assert clock.now <= REQUEST + OUTAGE_GRACE + REQUEST < DEADLINE


def test_a_busy_answer_ends_an_outage(clock: FakeClock) -> None:
    # Unreachable, then answering slowly (an apiserver coming back), then unreachable again:
    # the outage clock starts again, so 30 s of refusals in all are not one 15 s outage.
    failures = [refused(), refused(), refused(), busy(), refused(), refused(), refused()]
    store = FailingStore(clock, list(failures))
    run_span_transaction(store, SPANS, count_blocks, deadline=DEADLINE, clock=clock.as_clock())
    assert store.reads == len(failures) + 1


class AlwaysConflicting(MemoryStore):
    """Every write loses its race, as if another writer always came first."""

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        self.conflicts += 1
        return WriteOutcome(conflicts=[block.key for block in blocks])


def take_an_address(view: PoolView) -> None:
    view.assign(POOL, 7, Owner(container_id="c1", ifname="eth0"))


def test_conflicts_back_off_until_the_deadline_then_try_again_later(clock: FakeClock) -> None:
    store = AlwaysConflicting()
    with pytest.raises(StoreUnavailableError) as raised:
        run_span_transaction(
            store, SPANS, take_an_address, deadline=DEADLINE, clock=clock.as_clock()
        )
    assert raised.value.code == 11 and "conflicting writes" in raised.value.msg
    # Backing off, not spinning: at most BACKOFF_MAX apart once the backoff has grown, and the
    # whole deadline used on the fake clock alone.
    assert store.conflicts == clock.slept + 1
    assert DEADLINE - BACKOFF_MAX <= clock.now <= DEADLINE
    assert store.conflicts >= DEADLINE / BACKOFF_MAX


@pytest.mark.parametrize(
    ("datastore", "cap"), [("etcd", ETCD_BACKOFF_MAX), ("kubernetes", BACKOFF_MAX)]
)
def test_a_lost_race_waits_at_most_what_its_datastore_needs(
    clock: FakeClock, datastore: str, cap: float
) -> None:
    # etcd takes a compare-and-swap in well under a millisecond: a write that lost its race
    # there is tried again sooner than through kube-apiserver.
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.sleep(seconds)

    timed = Clock(now=lambda: clock.now, sleep=sleep)
    with pytest.raises(StoreUnavailableError):
        run_span_transaction(
            AlwaysConflicting(),
            SPANS,
            take_an_address,
            deadline=DEADLINE,
            clock=timed,
            backoff_max=conflict_backoff_max(datastore),
        )
    assert ETCD_BACKOFF_MAX < BACKOFF_MAX
    assert max(waits) <= cap
    assert max(waits) > cap / 2  # the backoff grew to its cap: hundreds of waits, jittered
    assert len(waits) >= DEADLINE / cap  # past 1024 for etcd: the backoff's exponent is bounded


REGISTRY = PoolId("blue#node-slices 10.0.0.0/24 /26", 4)


class RecordingWrites(MemoryStore):
    """Records the pools of each write's blocks, in the order the write gives them."""

    def __init__(self) -> None:
        super().__init__()
        self.orders: list[list[PoolId]] = []

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        self.orders.append([block.key.pool for block in blocks])
        return super().write_blocks(blocks)


def test_blocks_are_written_in_the_order_of_their_spans(clock: FakeClock) -> None:
    # A node slice's registry entry goes first, so that a store writing block by block stores
    # no address of a slice another node took first (it stops at the first conflict).
    def take_slice_and_address(view: PoolView) -> None:
        take_an_address(view)
        view.assign(REGISTRY, 0, Owner(container_id="10.0.0.0/26", ifname="slice"))

    store = RecordingWrites()
    spans = [Span(REGISTRY, 0, 3), *SPANS]
    run_span_transaction(
        store, spans, take_slice_and_address, deadline=DEADLINE, clock=clock.as_clock()
    )
    assert store.orders == [[REGISTRY, POOL]]  # sorted by key, POOL's block would come first


def test_a_lost_race_for_a_slice_registry_is_tried_again_soon(clock: FakeClock) -> None:
    class RegistryConflicts(MemoryStore):
        """Other nodes take their slices first, ten times over."""

        def __init__(self) -> None:
            super().__init__()
            self.lost = 0

        def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
            if self.lost < 10:
                self.lost += 1
                return WriteOutcome(conflicts=[blocks[0].key])
            return super().write_blocks(blocks)

    def take_slice(view: PoolView) -> None:
        view.assign(REGISTRY, 0, Owner(container_id="10.0.0.0/26", ifname="slice"))

    waits: list[float] = []
    timed = Clock(now=lambda: clock.now, sleep=waits.append)
    store = RegistryConflicts()
    run_span_transaction(store, [Span(REGISTRY, 0, 3)], take_slice, deadline=DEADLINE, clock=timed)
    # Each lost race is another node's slice taken, and a node takes one per range: the race
    # ends by itself, so its waits stay short where an address block's grow to BACKOFF_MAX.
    assert len(waits) == 10
    assert max(waits) <= CLAIM_BACKOFF_MAX < BACKOFF_MAX
