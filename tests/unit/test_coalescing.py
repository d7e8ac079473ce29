"""Several decisions in one view and one write: savepoints, and the batching of the agent."""

import threading
import time
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyabouts.ipam import allocator
from pyabouts.ipam.coalescing import CoalescingTransactions, decide_each
from pyabouts.ipam.errors import (
    RANGE_EXHAUSTED,
    AllocationError,
    CniError,
    RangeExhaustedError,
    RequestedAddressUnavailableError,
    StoreUnavailableError,
)
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId, PoolView
from pyabouts.ipam.ranges import AddressRange, build_range
from pyabouts.ipam.store import WriteOutcome
from pyabouts.ipam.stores.cached import CachedStore
from pyabouts.ipam.transaction import Span
from tests.memory_store import MemoryStore

POOL = PoolId("batch", 4)
SMALL = build_range("10.0.0.0/29", range_start=None, range_end=None, exclude=[], pool=POOL)


def owner(n: int) -> Owner:
    return Owner(f"c{n}", "net1", f"ns/p{n}")


def snapshot(view: PoolView) -> dict[int, Owner]:
    return dict(view.entries(POOL, 0, (1 << 32) - 1))


@given(
    before=st.dictionaries(st.integers(0, 600), st.integers(0, 5), max_size=20),
    changes=st.lists(st.tuples(st.booleans(), st.integers(0, 600), st.integers(0, 5)), max_size=30),
)
def test_rollback_restores_the_view_exactly(
    before: dict[int, int], changes: list[tuple[bool, int, int]]
) -> None:
    blocks: dict[BlockKey, Block] = {}
    for address, n in before.items():
        key = BlockKey.of(POOL, address)
        blocks.setdefault(key, Block(key)).put(address, owner(n))
    view = PoolView(blocks.values())
    original = snapshot(view)
    mark = view.savepoint()
    for assign, address, n in changes:
        if assign:
            view.assign(POOL, address, owner(n))
        else:
            view.unassign(POOL, address)
    view.rollback(mark)
    assert snapshot(view) == original
    assert view.changed_blocks() == []
    assert view.first_free(POOL, 0, 600) == min(set(range(601)) - set(before))
    assert {a for b in blocks.values() for a in b.entries} == set(before)  # given blocks untouched


def test_a_failed_decision_leaves_nothing_and_the_others_stand() -> None:
    view = PoolView([])
    taken = 167772161  # 10.0.0.1

    def take_two_then_fail(v: PoolView) -> None:
        allocator.assign_addresses(v, [SMALL], owner(90), [])
        raise RequestedAddressUnavailableError("no")

    outcomes = decide_each(
        view,
        [
            lambda v: allocator.assign_addresses(v, [SMALL], owner(1), []),
            take_two_then_fail,
            lambda v: allocator.assign_addresses(v, [SMALL], owner(2), []),
        ],
    )
    assert outcomes[0] == ([taken], True)
    assert outcomes[2] == ([taken + 1], True)  # the failed one's address went to the next one
    assert isinstance(getattr(outcomes[1][0], "error", None), RequestedAddressUnavailableError)
    assert outcomes[1][1] is False
    assert snapshot(view) == {taken: owner(1), taken + 1: owner(2)}


class SlowStore(MemoryStore):
    """A store whose writes take time, so that requests pile up behind one in flight."""

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        time.sleep(0.02)
        return super().write_blocks(blocks)


def run_threads(count: int, work: Callable[[int], object]) -> list[object]:
    results: list[object] = [None] * count

    def one(n: int) -> None:
        try:
            results[n] = work(n)
        except (CniError, AllocationError) as error:
            results[n] = error

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_requests_share_writes_and_exhaustion_fails_only_the_late() -> None:
    store = SlowStore()
    batches: list[int] = []
    transactions = CoalescingTransactions(store, on_batch=batches.append)

    def allocate(n: int) -> object:
        return transactions.run(
            [SMALL],
            lambda v: allocator.assign_addresses(v, [SMALL], owner(n), []),
            deadline=time.monotonic() + 30,
        )

    results = run_threads(20, allocate)
    given_out = [r[0] for r in results if isinstance(r, list)]
    refused = [r for r in results if isinstance(r, RangeExhaustedError)]
    assert len(given_out) == len(set(given_out)) == 6  # a /29 gives six addresses
    assert len(refused) == 14
    assert store.writes < 6 and sum(batches) == 20
    stored = {a for b in store.read_blocks(POOL, SMALL.first, SMALL.last) for a in b.entries}
    assert stored == set(given_out)


class ConflictsOnce(MemoryStore):
    """A store whose first write waits for `hold`, and then loses to another writer."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.hold = threading.Event()
        self.lost = 0

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        if not self.lost:
            self.writing.set()
            self.hold.wait(5)
            self.lost += 1
            return WriteOutcome(conflicts=[b.key for b in blocks])
        return super().write_blocks(blocks)


def test_requests_that_come_during_a_conflicting_write_join_its_retry() -> None:
    store = ConflictsOnce()
    batches: list[int] = []
    transactions = CoalescingTransactions(store, on_batch=batches.append)
    arrived = threading.Semaphore(0)

    def allocate(n: int) -> object:
        if n:  # the others come while the first one's write is on its way to a conflict
            store.writing.wait(5)
            arrived.release()
        return transactions.run(
            [SMALL],
            lambda v: allocator.assign_addresses(v, [SMALL], owner(n), []),
            deadline=time.monotonic() + 30,
        )

    def lose_the_write_once_they_wait() -> None:
        for _ in range(3):
            arrived.acquire(timeout=5)
        time.sleep(0.3)  # from arriving to waiting in the queue is a few lines of Python
        store.hold.set()

    loser = threading.Thread(target=lose_the_write_once_they_wait)
    loser.start()
    results = run_threads(4, allocate)
    loser.join()
    assert sorted(r[0] for r in results if isinstance(r, list)) == list(
        range(SMALL.first, SMALL.first + 4)
    )
    assert (store.lost, store.writes, batches) == (1, 1, [4])  # one retry stored all four


class ConflictsUntil(MemoryStore):
    """A store whose writes all lose to another writer until `until` (time.monotonic())."""

    def __init__(self, until: float) -> None:
        super().__init__()
        self.until = until
        self.writing = threading.Event()

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        self.writing.set()
        if time.monotonic() < self.until:
            return WriteOutcome(conflicts=[b.key for b in blocks])
        return super().write_blocks(blocks)


def test_a_request_whose_deadline_ends_in_a_retried_batch_leaves_it_and_the_rest_go_on() -> None:
    # The batch retries its conflicting write past the first request's deadline: that request,
    # which leads the batch, is told it timed out then, not when the batch ends, and the other,
    # with time left, goes on under a leader of its own and gets its address.
    started = time.monotonic()
    store = ConflictsUntil(started + 2.0)
    transactions = CoalescingTransactions(store)
    answered: dict[int, float] = {}

    def allocate(n: int) -> object:
        if n:  # joins the first one's batch at its next attempt
            store.writing.wait(5)
        try:
            return transactions.run(
                [SMALL],
                lambda v: allocator.assign_addresses(v, [SMALL], owner(n), []),
                deadline=started + (0.5 if n == 0 else 30),
            )
        finally:
            answered[n] = time.monotonic() - started

    first, second = run_threads(2, allocate)
    assert isinstance(first, CniError) and first.msg == "timed out waiting for the pool", first
    assert second == [SMALL.first]
    assert answered[0] < 2.0 <= answered[1]  # the first left before the conflicts ended


class FailsWhileTold(MemoryStore):
    """A store whose first write waits for `hold`, and whose reads fail while `down` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.hold, self.down, self.writing = threading.Event(), threading.Event(), threading.Event()

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        if self.down.is_set():
            raise StoreUnavailableError("the store is down")
        return super().read_blocks(pool, first, last)

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        self.writing.set()
        self.hold.wait(5)
        return super().write_blocks(blocks)


def test_a_leader_whose_deadline_ends_while_the_store_is_down_is_answered_then() -> None:
    started = time.monotonic()
    store = FailsWhileTold()
    transactions = CoalescingTransactions(store)
    answered: dict[int, float] = {}
    deadlines = {0: 30.0, 1: 1.0, 2: 30.0}  # 1 leads the second batch, 2 is in it

    def allocate(n: int) -> object:
        if n:  # queued, in this order, behind the first one's write
            store.writing.wait(5)
            time.sleep(0.1 * n)
        if n == 2:
            threading.Timer(0.2, store.down.set).start()  # down once both wait
            threading.Timer(0.3, store.hold.set).start()  # then the first write ends
            threading.Timer(2.5, store.down.clear).start()
        try:
            return transactions.run(
                [SMALL],
                lambda v: allocator.assign_addresses(v, [SMALL], owner(n), []),
                deadline=started + deadlines[n],
            )
        finally:
            answered[n] = time.monotonic() - started

    first, second, third = run_threads(3, allocate)
    assert first == [SMALL.first] and third == [SMALL.first + 1]
    assert isinstance(second, CniError) and second.msg == "timed out waiting for the pool"
    assert answered[1] < 2.5 <= answered[2]  # answered while the store was still down


def test_a_bug_in_a_batch_answers_its_requests_and_leaves_the_queue_working() -> None:
    calls: list[int] = []

    def on_batch(size: int) -> None:
        calls.append(size)
        if len(calls) == 1:
            raise RuntimeError("a bug")

    transactions = CoalescingTransactions(MemoryStore(), on_batch=on_batch)

    def allocate(n: int) -> list[int]:
        return transactions.run(
            [SMALL],
            lambda v: allocator.assign_addresses(v, [SMALL], owner(n), []),
            deadline=time.monotonic() + 5,
        )

    with pytest.raises(RuntimeError, match="a bug"):
        allocate(0)
    assert allocate(1) == [SMALL.first + 1]  # the first was stored before the bug struck
    assert calls == [1, 1]


def test_a_store_failure_reaches_every_request_of_the_batch() -> None:
    class DownStore(MemoryStore):
        def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
            raise CniError(RANGE_EXHAUSTED + 2, "refused")

    transactions = CoalescingTransactions(DownStore())
    results = run_threads(
        5,
        lambda n: transactions.run(
            [SMALL],
            lambda v: allocator.assign_addresses(v, [SMALL], owner(n), []),
            deadline=time.monotonic() + 5,
        ),
    )
    assert all(isinstance(r, CniError) and r.msg == "refused" for r in results)


@pytest.mark.parametrize("count", [1, 3])
def test_requests_after_a_batch_start_a_new_one(count: int) -> None:
    store = SlowStore()
    transactions = CoalescingTransactions(store)
    for n in range(count):
        transactions.run(
            [SMALL],
            lambda v, n=n: allocator.assign_addresses(v, [SMALL], owner(n), []),  # type: ignore[misc]
            deadline=time.monotonic() + 5,
        )
    assert store.writes == count


def test_an_answer_that_wrote_nothing_is_checked_on_a_fresh_read() -> None:
    """A cache that missed another writer's DEL says "exhausted"; before that is answered, the
    pool is read afresh and the address freed meanwhile is given."""
    backing = MemoryStore()
    cache = CachedStore(backing)
    transactions = CoalescingTransactions(cache, recheck=cache.recheck)

    def allocate(n: int) -> list[int]:
        return transactions.run(
            [SMALL],
            lambda v: allocator.assign_addresses(v, [SMALL], owner(n), []),
            deadline=time.monotonic() + 5,
        )

    given = [allocate(n)[0] for n in range(6)]  # the /29 is full, as the cache knows
    elsewhere = CachedStore(backing)
    freed = transactions_of(elsewhere).run(
        [SMALL],
        lambda v: allocator.release_addresses(v, [SMALL], "c3", "net1"),
        deadline=time.monotonic() + 5,
    )
    assert freed == [given[3]]
    assert allocate(99) == [given[3]]


def transactions_of(store: CachedStore) -> CoalescingTransactions:
    return CoalescingTransactions(store)


class SlowReadsConflictsUntil(ConflictsUntil):
    """ConflictsUntil whose reads take a moment: a request that comes meanwhile joins."""

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        time.sleep(0.2)
        return super().read_blocks(pool, first, last)


def allocation_of(n: int) -> Callable[[PoolView], list[int]]:
    """owner(n)'s decision: an address of SMALL."""
    return lambda view: allocator.assign_addresses(view, [SMALL], owner(n), [])


def stale_at_first(n: int) -> Callable[[PoolView], list[int]]:
    """owner(n)'s decision, failing the first time as on a stale copy (it writes nothing, so it
    is decided again on a checked view)."""
    decided = 0

    def decide(view: PoolView) -> list[int]:
        nonlocal decided
        decided += 1
        if decided == 1:
            raise RangeExhaustedError("exhausted, as a stale copy says")
        return allocation_of(n)(view)

    return decide


def test_a_request_decided_again_after_a_recheck_is_answered_at_its_own_deadline() -> None:
    """Two decisions that wrote nothing (an "exhausted" on a stale copy, say) are decided again
    on a checked view, in one transaction. When that one's write conflicts past the first's
    deadline, the first is answered then: it was held to the later one's, and stored after its
    plugin had told the runtime to try again."""
    started = time.monotonic()
    store = SlowReadsConflictsUntil(started + 2.0)
    transactions = CoalescingTransactions(store, recheck=lambda pool, fresh: None)
    answered: dict[int, float] = {}

    def allocate(n: int) -> object:
        time.sleep(0.05 * n)  # the second joins while the first's view is read
        decide = stale_at_first(n)
        try:
            return transactions.run([SMALL], decide, deadline=started + (0.7 if n == 0 else 30))
        finally:
            answered[n] = time.monotonic() - started

    first, second = run_threads(2, allocate)
    assert isinstance(first, CniError) and first.msg == "timed out waiting for the pool", first
    assert second == [SMALL.first]
    assert answered[0] < 2.0 <= answered[1]
    stored = store.blocks[BlockKey.of(POOL, SMALL.first)].entries.values()
    assert [o.container_id for o in stored] == ["c1"]


def test_a_leader_gone_during_a_recheck_answers_what_its_batch_stored() -> None:
    """The leader's own decision wrote nothing and is checked again; its deadline passes
    meanwhile (a slow fresh read). The other request's change, stored by the first write, is
    answered then: put back in line, it was decided again, and could be told to try again
    although its address was stored."""
    started = time.monotonic()
    store = SlowReadsConflictsUntil(started)  # reads take 0.2 s, no conflict
    transactions = CoalescingTransactions(store, recheck=lambda pool, fresh: time.sleep(0.6))
    decided = {0: 0, 1: 0}

    def allocate(n: int) -> object:
        time.sleep(0.05 * n)  # the second joins while the first's view is read

        def decide(view: PoolView) -> list[int]:
            decided[n] += 1
            if n == 0:  # as on a stale copy: nothing written, so checked again
                raise RangeExhaustedError("exhausted, as a stale copy says")
            return allocator.assign_addresses(view, [SMALL], owner(n), [])

        return transactions.run([SMALL], decide, deadline=started + (0.5 if n == 0 else 30))

    first, second = run_threads(2, allocate)
    assert isinstance(first, CniError) and first.msg == "timed out waiting for the pool", first
    assert second == [SMALL.first] and decided[1] == 1


class StoresFirstThenBusy(SlowReadsConflictsUntil):
    """Stores the first write; each later one loses to another writer until `until`."""

    def __init__(self, until: float) -> None:
        super().__init__(until)
        self.stored_first = False

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        if not self.stored_first:
            self.stored_first = True
            return MemoryStore.write_blocks(self, blocks)
        return super().write_blocks(blocks)


@pytest.mark.parametrize("stored_leads", [True, False])
def test_a_stored_decision_is_answered_at_once_not_after_the_others_second_decision(
    stored_leads: bool,
) -> None:
    """One decision of a batch is stored by its write; the other wrote nothing (an "exhausted"
    on a stale copy) and is decided again, on a pool so busy that its writes lose for 2 s.
    The stored one is answered as soon as it is stored, whether it led the batch or not: held
    until the other's second decision, it could be answered after its plugin gave up, and the
    runtime's DEL would free the address its pod got."""
    started = time.monotonic()
    store = StoresFirstThenBusy(started + 2.0)
    transactions = CoalescingTransactions(store, recheck=lambda pool, fresh: None)
    stored_one = 0 if stored_leads else 1
    answered: dict[int, float] = {}

    def allocate(n: int) -> object:
        time.sleep(0.05 * n)  # the second joins while the first's view is read
        decide = stale_at_first(n) if n != stored_one else allocation_of(n)
        try:
            return transactions.run([SMALL], decide, deadline=started + 30)
        finally:
            answered[n] = time.monotonic() - started

    results = run_threads(2, allocate)
    assert results[stored_one] == [SMALL.first]
    assert answered[stored_one] < 1.0, answered
    assert answered[1 - stored_one] >= 2.0, answered
    assert results[1 - stored_one] == [SMALL.first + 1]


def test_each_block_a_batch_writes_is_described_by_the_ranges_of_the_batch_that_cover_it() -> None:
    """Two configs of one pool and CIDR with other bounds share a queue: a block the second
    one's decision wrote is described by its range, not by the first request's."""
    pool = PoolId("described", 4)

    def bounded(start: str, end: str) -> AddressRange:
        return build_range("10.0.0.0/16", range_start=start, range_end=end, exclude=[], pool=pool)

    first, second = bounded("10.0.0.10", "10.0.0.200"), bounded("10.0.1.10", "10.0.1.200")
    assert Span.of(first) == Span.of(second)
    store = SlowReadsConflictsUntil(time.monotonic())
    transactions = CoalescingTransactions(store)
    ranges = [first, second]

    def allocate(n: int) -> object:
        time.sleep(0.05 * n)  # the second joins while the first's view is read
        rng = ranges[n]
        return transactions.run(
            [rng],
            lambda v: allocator.assign_addresses(v, [rng], owner(n), []),
            deadline=time.monotonic() + 5,
        )

    assert run_threads(2, allocate) == [[first.first], [second.first]]
    assert store.writes == 1  # one batch
    block = store.blocks[BlockKey.of(pool, second.first)]
    assert (block.capacity, block.range_text) == (second.size, second.text)
