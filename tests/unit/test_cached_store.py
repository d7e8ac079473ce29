import time
from collections.abc import Callable

import netaddr
import pytest

from pyabouts.ipam import operations
from pyabouts.ipam.coalescing import CoalescingTransactions
from pyabouts.ipam.errors import CORRUPT_BLOCK, CniError, StoreUnavailableError
from pyabouts.ipam.pool import BLOCK_SIZE, Block, BlockKey, Owner, PoolId
from pyabouts.ipam.ranges import AddressRange, build_range
from pyabouts.ipam.stores.cached import CachedStore
from pyabouts.ipam.stores.codec import block_from_document
from pyabouts.ipam.transaction import BACKOFF_MAX, REAL_CLOCK, DirectTransactions
from tests.memory_store import BlockByBlockStore, MemoryStore

POOL = PoolId("cached", 4)
RANGE = build_range("10.0.0.0/22", range_start=None, range_end=None, exclude=[], pool=POOL)
WHOLE = (1 << 32) - 1  # every address of the family


def allocate(
    store: CachedStore, n: int, *, backoff_max: float = BACKOFF_MAX, rng: AddressRange = RANGE
) -> int:
    owner = Owner(f"c{n}", "net1", f"ns/p{n}")
    transactions = DirectTransactions(store, backoff_max=backoff_max)
    # The retry loop's own clock: the `clock` fixture stops the cache's, not the back-off's.
    deadline = REAL_CLOCK.now() + 5
    [address] = operations.allocate(transactions, [rng], owner, [], deadline=deadline)
    return address


def test_a_lone_writer_reads_the_pool_once() -> None:
    backing = MemoryStore()
    store = CachedStore(backing)
    got = [allocate(store, n) for n in range(600)]
    assert got == [int(netaddr.IPAddress("10.0.0.1")) + n for n in range(600)]
    assert store.reads == 1
    assert backing.writes == 600


def test_two_cached_writers_on_one_pool_never_give_an_address_twice() -> None:
    backing = MemoryStore()
    node_a, node_b = CachedStore(backing), CachedStore(backing)
    got = []
    for n in range(300):  # interleaved: each one's cache is stale every other time
        # Conflicts are certain here: tried again at once.
        got.append(allocate(node_a, 2 * n, backoff_max=0.001))
        got.append(allocate(node_b, 2 * n + 1, backoff_max=0.001))
    assert len(set(got)) == 600
    assert backing.conflicts > 0
    assert all(RANGE.can_give(netaddr.IPAddress(a)) for a in got)
    held = {a for block in backing.blocks.values() for a in block.entries}
    assert held == set(got)  # each one stored, none lost to a conflict


def test_after_a_conflict_the_pool_is_read_afresh() -> None:
    backing = MemoryStore()
    store, other = CachedStore(backing), CachedStore(backing)
    allocate(store, 1)
    allocate(other, 2)  # store's cached block is now stale
    assert allocate(store, 3) == int(netaddr.IPAddress("10.0.0.3"))
    assert store.reads == 2


@pytest.mark.parametrize(
    ("allocations", "reason"),
    [
        ([], "neither a table nor an object"),
        ({"300": {"containerID": "c", "ifname": "e"}}, "is not an offset"),
        ({"1": {"containerID": "c"}}, "lacks containerID or ifname"),
        ({"1": "c"}, "lacks containerID or ifname"),
    ],
)
def test_a_hand_edited_block_is_refused_with_code_104(allocations: object, reason: str) -> None:
    key = BlockKey(POOL, 0x0A000000)
    with pytest.raises(CniError) as refused:
        block_from_document(key, {"allocations": allocations}, "1")
    assert refused.value.code == CORRUPT_BLOCK
    assert "10.0.0.0/24" in refused.value.msg and reason in refused.value.msg


def test_a_pool_older_than_max_age_is_read_whole_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process gave pod 7 an address in a block this cache never writes: once the
    pool is older than max_age, ADD for pod 7 finds it instead of giving a second one."""
    clock = [100.0]
    monkeypatch.setattr("pyabouts.ipam.stores.cached.time.monotonic", lambda: clock[0])
    backing = MemoryStore()
    cached = CachedStore(backing, max_age=2.0)
    allocate(cached, 1)
    elsewhere = CachedStore(backing)
    far = build_range("10.0.3.0/24", range_start=None, range_end=None, exclude=[], pool=POOL)
    [theirs] = operations.allocate(
        DirectTransactions(elsewhere), [far], Owner("c7", "net1", "ns/p7"), [], deadline=1e9
    )
    clock[0] += 2.5
    assert allocate(cached, 7) == theirs
    assert cached.reads == 2


class ReadsAnOldCopy(MemoryStore):
    """Answers one whole read with what it held at hold(), after running `during`: a read that
    began before writes that ended while it was on its way."""

    def __init__(self) -> None:
        super().__init__()
        self.old: list[Block] | None = None
        self.during: list[Callable[[], object]] = []

    def hold(self) -> None:
        self.old = self.read_all_blocks()

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        if self.old is None:
            return super().read_blocks(pool, first, last)
        old, self.old = self.old, None
        for run in self.during:
            run()
        return [b for b in old if b.key.pool == pool]


def test_a_whole_read_that_ended_after_writes_keeps_what_they_wrote(clock: list[float]) -> None:
    backing = ReadsAnOldCopy()
    cached = CachedStore(backing, max_age=2.0)
    first = allocate(cached, 1)
    backing.hold()
    second = allocate(cached, 2)  # a newer revision of the block than the old copy has
    far = build_range("10.0.3.0/24", range_start=None, range_end=None, exclude=[], pool=POOL)
    owner = Owner("c9", "net1", "ns/p9")
    backing.during.append(  # a block this cache creates while the read is on its way
        lambda: operations.allocate(DirectTransactions(cached), [far], owner, [], deadline=1e9)
    )
    clock[0] += 2.5  # the next read is a whole one, answered with the old copy
    third = allocate(cached, 3)
    assert (first, second, third) == (first, first + 1, first + 2)
    assert backing.conflicts == 0  # decided on what it wrote, not on the old copy
    assert [b.key.base for b in cached.cached_blocks()] == [RANGE.first - 1, far.first - 1]


def test_a_whole_read_on_its_way_when_the_pool_is_forgotten_is_not_kept(clock: list[float]) -> None:
    # A decision that wrote nothing has its pool read afresh (recheck) while a whole read that
    # began before another writer changed the block is still on its way: kept, that older copy
    # would answer the recheck's decision.
    backing = ReadsAnOldCopy()
    cached = CachedStore(backing, max_age=2.0)
    mine = allocate(cached, 1)
    clock[0] += 2.5  # due: the next read is a whole one
    backing.hold()

    def freed_and_given_elsewhere() -> None:
        other = DirectTransactions(backing)
        operations.release(other, [RANGE], "c1", "net1", deadline=1e9, now=0)
        operations.allocate(other, [RANGE], Owner("c9", "net1", "ns/q"), [], deadline=1e9)
        cached.recheck(POOL)

    backing.during.append(freed_and_given_elsewhere)
    cached.read_blocks(POOL, 0, WHOLE)  # the read on its way across the change and the recheck
    (block,) = cached.read_blocks(POOL, 0, WHOLE)
    assert block.entries[mine].pod == "ns/q"


def test_a_whole_read_drops_a_cached_block_somebody_deleted(clock: list[float]) -> None:
    backing = MemoryStore()
    cached = CachedStore(backing, max_age=2.0)
    allocate(cached, 1)
    backing.blocks.clear()  # deleted by hand
    clock[0] += 2.5
    assert allocate(cached, 2) == int(netaddr.IPAddress("10.0.0.1"))  # not taken by a ghost


# -- fed by a BlockFeed: the cache knows which blocks others wrote -----------------------------


class Tags:
    """A feed's names for pools and blocks (the IPPool watch uses labels and object names)."""

    def pool_tag(self, pool: PoolId) -> str:
        return f"{pool.network}/{pool.family}"

    def block_tag(self, key: BlockKey) -> str:
        return str(key.base)

    def follow_changes(self, sink: object, stop: object) -> None:
        raise NotImplementedError  # the tests report to the cache themselves


def report_all(cache: CachedStore, backing: MemoryStore) -> None:
    """What a feed's listing of `backing` would report."""
    tags = Tags()
    cache.feed_listed(
        {
            (tags.pool_tag(k.pool), tags.block_tag(k)): str(b.revision)
            for k, b in backing.blocks.items()
        }
    )


def report(cache: CachedStore, backing: MemoryStore, key: BlockKey, deleted: bool = False) -> None:
    revision = str(backing.blocks[key].revision)
    cache.feed_changed(Tags().pool_tag(key.pool), Tags().block_tag(key), revision, deleted=deleted)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr("pyabouts.ipam.stores.cached.time.monotonic", lambda: now[0])
    return now


def fed_cache(backing: MemoryStore) -> CachedStore:
    return CachedStore(backing, max_age=2.0, feed=Tags(), max_age_fed=60.0)


def fed_with_one_block(backing: MemoryStore) -> tuple[CachedStore, BlockKey]:
    """A fed cache that gave pod 1 an address in a new block, and the feed's report of it."""
    cached = fed_cache(backing)
    report_all(cached, backing)
    allocate(cached, 1)
    [key] = backing.blocks
    report(cached, backing, key)
    return cached, key


def test_a_fed_pool_nobody_else_wrote_is_not_read_again_past_max_age(clock: list[float]) -> None:
    backing = MemoryStore()
    cached, _ = fed_with_one_block(backing)  # its own write, as the watch reports it
    clock[0] += 30.0
    allocate(cached, 2)
    assert cached.reads == 1  # the first one only
    clock[0] += 61.0  # past max_age_fed: a feed that silently stopped is not trusted for ever
    allocate(cached, 3)
    assert cached.reads == 2


class SpanRecordingStore(MemoryStore):
    """Records the address span of each read: a whole pool (a LIST) or one block (a GET); fails
    the next read when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[int] = []
        self.fail_next_read = False

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        self.spans.append(last - first + 1)
        if self.fail_next_read:
            self.fail_next_read = False
            raise StoreUnavailableError("the apiserver went away")
        return super().read_blocks(pool, first, last)


def test_past_max_age_a_block_another_node_wrote_is_read_again_alone_before_deciding(
    clock: list[float],
) -> None:
    backing = SpanRecordingStore()
    cached, key = fed_with_one_block(backing)
    other = CachedStore(backing)
    allocate(other, 2)  # the same block, written by another node
    report(cached, backing, key)
    clock[0] += 2.5
    assert allocate(cached, 3) == int(netaddr.IPAddress("10.0.0.3"))
    assert backing.conflicts == 0  # read before deciding, not after a conflict
    assert backing.spans[2:] == [BLOCK_SIZE]  # after each one's first LIST: that block alone


def pod_7_given_elsewhere(cached: CachedStore, backing: MemoryStore) -> int:
    """Another node gives pod 7 an address in a block `cached` never read; the feed reports
    it. Its address."""
    far = build_range("10.0.3.0/24", range_start=None, range_end=None, exclude=[], pool=POOL)
    [theirs] = operations.allocate(
        DirectTransactions(CachedStore(backing)),
        [far],
        Owner("c7", "net1", "ns/p7"),
        [],
        deadline=1e9,
    )
    for key in backing.blocks:
        report(cached, backing, key)
    return theirs


def test_a_block_another_writer_created_is_seen_past_max_age_as_without_a_feed(
    clock: list[float],
) -> None:
    """The max_age case above, with a feed: pod 7's address in a block this cache never read
    is found once the pool is as old as max_age."""
    backing = MemoryStore()
    cached, _ = fed_with_one_block(backing)
    theirs = pod_7_given_elsewhere(cached, backing)
    clock[0] += 2.5
    assert allocate(cached, 7) == theirs


def test_a_report_older_than_the_cached_block_reads_nothing(clock: list[float]) -> None:
    backing = MemoryStore()
    cached, _ = fed_with_one_block(backing)
    allocate(cached, 2)  # the watch has not reported this write yet: it knows an older one
    clock[0] += 2.5
    allocate(cached, 3)
    assert cached.reads == 1


def test_a_cached_block_the_feed_saw_deleted_is_dropped(clock: list[float]) -> None:
    backing = MemoryStore()
    cached, key = fed_with_one_block(backing)
    revision = str(int(str(backing.blocks[key].revision)) + 100)
    del backing.blocks[key]  # emptied and deleted by somebody else
    cached.feed_changed(Tags().pool_tag(POOL), Tags().block_tag(key), revision, deleted=True)
    clock[0] += 2.5
    assert allocate(cached, 1) == int(netaddr.IPAddress("10.0.0.1"))  # stored again, not assumed
    assert backing.blocks[key].entries


def test_once_the_feed_is_lost_max_age_applies_again(clock: list[float]) -> None:
    backing = MemoryStore()
    cached = fed_cache(backing)
    report_all(cached, backing)
    allocate(cached, 1)
    cached.feed_lost()
    clock[0] += 2.5
    allocate(cached, 2)
    assert cached.reads == 2


def test_a_whole_read_that_fails_leaves_the_pool_due_so_the_retry_reads_it(
    clock: list[float],
) -> None:
    """The feed said another node made a block of the pool; the LIST for it failed. The
    transaction's retry must read the pool again, not decide on the copy the feed said was
    out of date (pod 7 would get a second address)."""
    backing = SpanRecordingStore()
    cached, _ = fed_with_one_block(backing)
    theirs = pod_7_given_elsewhere(cached, backing)
    clock[0] += 2.5
    backing.fail_next_read = True
    with pytest.raises(StoreUnavailableError):
        cached.read_blocks(POOL, 0, WHOLE)
    blocks = cached.read_blocks(POOL, 0, WHOLE)
    assert theirs in {address for block in blocks for address in block.entries}


def test_a_del_that_freed_nothing_is_checked_against_the_feed_and_an_add_by_a_fresh_read(
    clock: list[float],
) -> None:
    # A repeated DEL finds nothing to free. With the feed live, checking that answer reads only
    # what the feed says others wrote: nothing here, then the one block another node wrote.
    # An ADD that finds its address is checked on a fresh read: the feed may lag a moment
    # behind a reconciler that freed it and a node that gave it again.
    backing = SpanRecordingStore()
    cached, key = fed_with_one_block(backing)
    transactions = CoalescingTransactions(cached, recheck=cached.recheck)

    def delete(container: str) -> list[int]:
        release = operations.release
        return release(transactions, [RANGE], container, "net1", deadline=time.monotonic() + 5)

    reads = len(backing.spans)
    assert delete("c-gone") == []
    assert len(backing.spans) == reads  # nobody else wrote: nothing read again
    theirs = allocate(CachedStore(backing), 2)  # another node, in the same block
    report(cached, backing, key)
    reads = len(backing.spans)
    assert delete("c2") == [theirs]  # their entry, as the store holds it
    assert backing.spans[reads:] == [BLOCK_SIZE]  # that block alone, read once

    reads = len(backing.spans)
    owner = Owner("c1", "net1", "ns/p1")
    again = operations.allocate(transactions, [RANGE], owner, [], deadline=time.monotonic() + 5)
    assert again == [int(netaddr.IPAddress("10.0.0.1"))]  # pod 1's, found
    assert backing.spans[reads:] == [1 << 128]  # the pool, read whole (the whole space)


class Overtaken:
    """Counts the blocks a cache did not send because its feed showed them overtaken."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, blocks: int) -> None:
        self.count += blocks


def counting_fed_cache(backing: MemoryStore) -> tuple[CachedStore, Overtaken]:
    overtaken = Overtaken()
    cache = CachedStore(backing, max_age=2.0, feed=Tags(), max_age_fed=60.0, on_overtaken=overtaken)
    report_all(cache, backing)
    return cache, overtaken


# In the tests below the clock stands still: every decision is taken within max_age, on the
# cached copy, as in a busy agent.


def test_a_write_the_feed_shows_overtaken_is_not_sent_and_the_block_is_read_again(
    clock: list[float],
) -> None:
    # The cached block, which the feed says another node wrote since: its compare-and-swap
    # could only be refused.
    backing = MemoryStore()
    cached, overtaken = counting_fed_cache(backing)
    allocate(cached, 1)
    [key] = backing.blocks
    report(cached, backing, key)  # its own write: nothing to hold back
    theirs = allocate(CachedStore(backing), 2)
    report(cached, backing, key)
    writes = backing.writes

    ours = allocate(cached, 3)
    assert ours == int(netaddr.IPAddress("10.0.0.3"))
    assert theirs == int(netaddr.IPAddress("10.0.0.2"))
    assert overtaken.count == 1
    assert backing.conflicts == 0  # nothing sent to be refused
    assert backing.writes == writes + 1  # the one decided on the block read again
    assert cached.reads == 2  # the first LIST, then that block


def test_without_the_feeds_report_the_same_write_is_sent_and_refused(clock: list[float]) -> None:
    backing = MemoryStore()
    cached, overtaken = counting_fed_cache(backing)
    allocate(cached, 1)
    [key] = backing.blocks
    report(cached, backing, key)
    allocate(CachedStore(backing), 2)  # not reported yet: the watch lags a write behind
    allocate(cached, 3)
    assert (overtaken.count, backing.conflicts) == (0, 1)


def test_a_block_the_feed_saw_created_elsewhere_is_not_created_again(clock: list[float]) -> None:
    # This cache read the pool before another node created the block: its create would be
    # refused (the object exists), so it is not sent either.
    backing = MemoryStore()
    cached, overtaken = counting_fed_cache(backing)
    cached.read_blocks(POOL, 0, WHOLE)  # empty
    theirs = allocate(CachedStore(backing), 2)
    [key] = backing.blocks
    report(cached, backing, key)
    ours = allocate(cached, 3)
    assert ours != theirs
    assert (overtaken.count, backing.conflicts) == (1, 0)


def test_a_block_the_feed_saw_deleted_is_created_anew_at_once(clock: list[float]) -> None:
    backing = MemoryStore()
    cached, overtaken = counting_fed_cache(backing)
    cached.read_blocks(POOL, 0, WHOLE)
    key = BlockKey.of(POOL, RANGE.first)
    cached.feed_changed(Tags().pool_tag(POOL), Tags().block_tag(key), "7", deleted=True)
    assert allocate(cached, 1) == int(netaddr.IPAddress("10.0.0.1"))
    assert (overtaken.count, backing.conflicts, backing.writes) == (0, 0, 1)


def test_a_block_held_back_and_read_again_as_it_was_is_sent_at_the_next_try(
    clock: list[float],
) -> None:
    # The feed still reports a block somebody has since deleted (its DELETED event is late, or
    # the watch hangs): read again, the block is absent, as this cache decided. Held back once,
    # the create is sent next and settles it, rather than waiting for the feed.
    backing = MemoryStore()
    cached, overtaken = counting_fed_cache(backing)
    one_block = build_range("10.0.0.0/24", range_start=None, range_end=None, exclude=[], pool=POOL)
    key = BlockKey.of(POOL, one_block.first)
    cached.feed_changed(Tags().pool_tag(POOL), Tags().block_tag(key), "7", deleted=False)
    given = allocate(cached, 1, backoff_max=0.001, rng=one_block)
    assert (overtaken.count, backing.conflicts, backing.writes) == (1, 0, 1)
    assert backing.blocks[key].entries.keys() == {given}


def test_a_write_of_two_blocks_sends_neither_when_the_feed_shows_one_overtaken(
    clock: list[float],
) -> None:
    backing = BlockByBlockStore()
    cached, overtaken = counting_fed_cache(backing)
    allocate(cached, 1)
    theirs = pod_7_given_elsewhere(cached, backing)  # the pool's second block, reported
    [first, second] = sorted(backing.blocks)
    assert theirs in backing.blocks[second].entries
    clock[0] += 2.5
    cached.read_blocks(POOL, 0, WHOLE)  # past max age: this cache reads both blocks
    allocate(CachedStore(backing), 8)  # then another node writes the first one again
    report(cached, backing, first)
    writes = [block.copy() for block in cached.read_blocks(POOL, 0, WHOLE)]
    for block, address in zip(writes, (RANGE.first + 9, second.base + 9), strict=True):
        block.put(address, Owner("c9", "net1", "ns/p9"))
    asked = len(backing.stored)
    outcome = cached.write_blocks(writes)
    assert outcome.conflicts == [first]
    assert len(backing.stored) == asked  # neither block sent, not even the second
    assert overtaken.count == 1


@pytest.mark.parametrize("backing", [MemoryStore, BlockByBlockStore])
def test_a_del_that_finds_a_pods_address_in_one_pool_and_not_the_other_looks_again(
    backing: Callable[[], MemoryStore],
) -> None:
    """A dual-stack pod was given its addresses by another writer (an in-process plugin while
    the agent restarted), and the agent's cache saw the IPv4 block again since (a conflict)
    but not the IPv6 one. Its DEL through the agent frees the IPv4 address, and looks at the
    IPv6 pool again, checked against the store, rather than answer on the stale copy: both
    are freed (the IPv6 one stayed held for nobody)."""
    v4 = build_range("10.0.0.0/24", range_start=None, range_end=None, exclude=[], pool=POOL)
    v6 = build_range(
        "fd00::/118", range_start=None, range_end=None, exclude=[], pool=PoolId("cached", 6)
    )
    store = backing()
    cache = CachedStore(store, max_age=60.0)
    agent = CoalescingTransactions(cache, recheck=cache.recheck)
    plugin = DirectTransactions(store)
    deadline = REAL_CLOCK.now() + 10

    def add(transactions: object, name: str) -> list[int]:
        owner = Owner(name, "net1", f"ns/{name}", node="n2")
        return operations.allocate(transactions, [v4, v6], owner, [], deadline=deadline)  # type: ignore[arg-type]

    add(agent, "a")  # both pools now in the agent's cache
    held = add(plugin, "c")  # stored, unknown to the cache
    add(agent, "b")  # conflicts on the IPv4 block, read again; the IPv6 block stays stale
    freed = operations.release(agent, [v4, v6], "c", "net1", deadline=deadline)
    assert sorted(freed) == sorted(held)
    assert not [
        o for b in store.read_all_blocks() for o in b.entries.values() if o.container_id == "c"
    ]
