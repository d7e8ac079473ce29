"""ipam.operations over an in-memory store: what a plugin process's retries do."""

import time
from collections.abc import Sequence

from pyabouts.ipam import operations
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId
from pyabouts.ipam.ranges import build_range
from pyabouts.ipam.store import WriteOutcome
from pyabouts.ipam.transaction import DirectTransactions
from tests.memory_store import MemoryStore

POOL = PoolId("spread", 4)
RANGE = build_range("10.0.0.0/22", range_start=None, range_end=None, exclude=[], pool=POOL)


class LosesFirstWrites(MemoryStore):
    """Every allocation's first write loses to somebody else's (who wrote nothing in the end)."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: set[int] = set()

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        fresh = [a for b in blocks for a in b.entries if a not in self._stored()]
        if any(a not in self.lost for a in fresh):
            self.lost.update(fresh)
            return WriteOutcome(conflicts=[b.key for b in blocks])
        return super().write_blocks(blocks)

    def _stored(self) -> set[int]:
        return {a for b in self.blocks.values() for a in b.entries}


def allocate(store: MemoryStore, n: int) -> int:
    owner = Owner(f"c{n}", "net1", f"ns/p{n}")
    [address] = operations.allocate(
        DirectTransactions(store), [RANGE], owner, [], deadline=time.monotonic() + 5
    )
    return address


def block_of(address: int) -> int:
    return BlockKey.of(POOL, address).base


def test_an_uncontended_process_gives_the_lowest_free_address() -> None:
    store = MemoryStore()
    assert [allocate(store, n) for n in range(3)] == [RANGE.first + n for n in range(3)]


def test_after_a_conflict_a_process_tries_another_block_than_the_lowest() -> None:
    # Processes that collided on the lowest block and all retried there would collide again:
    # their retries spread over the range's four blocks.
    store = LosesFirstWrites()
    got = [allocate(store, n) for n in range(40)]
    assert len(set(got)) == 40
    assert {block_of(a) for a in got} == {block_of(RANGE.first + 256 * i) for i in range(4)}
    assert {a for b in store.blocks.values() for a in b.entries} == set(got)


def test_del_and_gc_free_addresses_the_range_no_longer_reaches() -> None:
    """A NAD narrowed (a later range_start, an exclusion) after its pods got addresses below:
    their DEL, or the runtime's GC, still frees them, though no block of the narrowed range
    holds them."""
    pool = PoolId("narrowed", 4)
    wide = build_range("10.6.0.0/16", range_start=None, range_end=None, exclude=[], pool=pool)
    narrowed = [
        build_range("10.6.0.0/16", range_start="10.6.5.0", range_end=None, exclude=[], pool=pool),
        build_range(
            "10.6.0.0/16", range_start=None, range_end=None, exclude=["10.6.0.0/20"], pool=pool
        ),
    ]
    store = MemoryStore()
    transactions = DirectTransactions(store)
    deadline = time.monotonic() + 5
    owners = [Owner(f"c{n}", "net1", f"ns/p{n}", node="node-a", cni_network="net") for n in (1, 2)]
    for owner in owners:
        operations.allocate(transactions, [wide], owner, [], deadline=deadline)
    assert sum(len(b.entries) for b in store.blocks.values()) == 2

    freed = operations.release(transactions, [narrowed[0]], "c1", "net1", deadline=deadline)
    assert freed == [int(wide.network.first) + 1]
    freed = operations.release_stale(
        transactions, [narrowed[1]], set(), node="node-a", cni_network="net", deadline=deadline
    )
    assert freed == [int(wide.network.first) + 2]
    assert sum(len(b.entries) for b in store.blocks.values()) == 0
