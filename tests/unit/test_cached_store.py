import time

import netaddr
import pytest

from pyabouts.ipam import operations
from pyabouts.ipam.errors import CORRUPT_BLOCK, CniError
from pyabouts.ipam.pool import BlockKey, Owner, PoolId
from pyabouts.ipam.ranges import build_range
from pyabouts.ipam.stores.cached import CachedStore
from pyabouts.ipam.stores.codec import block_from_document
from pyabouts.ipam.transaction import DirectTransactions
from tests.memory_store import MemoryStore

POOL = PoolId("cached", 4)
RANGE = build_range("10.0.0.0/22", range_start=None, range_end=None, exclude=[], pool=POOL)


def allocate(store: CachedStore, n: int) -> int:
    owner = Owner(f"c{n}", "net1", f"ns/p{n}")
    [address] = operations.allocate(
        DirectTransactions(store), [RANGE], owner, [], deadline=time.monotonic() + 5
    )
    return address


def test_a_lone_writer_reads_the_pool_once() -> None:
    backing = MemoryStore()
    store = CachedStore(backing)
    got = [allocate(store, n) for n in range(600)]
    assert got == [int(netaddr.IPAddress("10.0.0.1")) + n for n in range(600)]
    assert store.reads == 1
    assert backing.writes == 600


def test_two_cached_writers_on_one_pool_never_give_an_address_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Conflicts are certain here.
    monkeypatch.setattr("pyabouts.ipam.transaction.BACKOFF_MAX", 0.001)
    backing = MemoryStore()
    node_a, node_b = CachedStore(backing), CachedStore(backing)
    got = []
    for n in range(300):  # interleaved: each one's cache is stale every other time
        got.append(allocate(node_a, 2 * n))
        got.append(allocate(node_b, 2 * n + 1))
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
        ([], "allocations is not an object"),
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
