"""A full reconcile pass deletes the stored blocks that hold nothing, but the lowest of each pool
and range, and only as its snapshot read them; a node that still holds a deleted block creates
it again. On the in-memory store; tests/integration/test_empty_blocks.py runs the deletes on
real etcd and IPPools."""

from __future__ import annotations

import logging

import netaddr
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyabouts.controller.empty_blocks import REMOVALS_PER_PASS, removable_blocks
from pyabouts.controller.leaks import PodState, Policy
from pyabouts.controller.metrics import ReconcilerMetrics
from pyabouts.controller.reconciler import reconcile
from pyabouts.ipam import operations
from pyabouts.ipam.errors import StoreRefusedError, StoreUnavailableError
from pyabouts.ipam.pool import BLOCK_SIZE, Block, BlockKey, Owner, PoolId
from pyabouts.ipam.pool_report import pool_usage
from pyabouts.ipam.ranges import build_range
from pyabouts.ipam.slices import SlicedRange, parse_slice_size
from pyabouts.ipam.stores.cached import CachedStore
from pyabouts.ipam.transaction import DirectTransactions
from tests.memory_store import MemoryStore

POOL = PoolId("wide", 6)
RANGE_TEXT = "fd00::/64"
BASE = int(netaddr.IPAddress("fd00::"))


def block(
    n: int,
    *owners: Owner,
    pool: PoolId = POOL,
    range_text: str = RANGE_TEXT,
    range_size: int = 1 << 64,
) -> Block:
    """The n-th block of the range, holding `owners` from its first address on."""
    key = BlockKey(pool, BASE + n * BLOCK_SIZE)
    stored = Block(key, {key.base + i: o for i, o in enumerate(owners)})
    stored.range_text, stored.capacity, stored.range_size = range_text, BLOCK_SIZE, range_size
    return stored


def pod(n: int) -> Owner:
    return Owner(f"c{n}", "net1", f"ns/p{n}", pod_uid=f"u{n}", node="node-a")


def stored(*blocks: Block) -> MemoryStore:
    store = MemoryStore()
    assert not store.write_blocks(blocks).conflicts
    return store


def pods_of(*numbers: int) -> dict[str, PodState]:
    """Running pods p<n> of namespace ns, on node-a."""
    return {
        f"ns/p{n}": PodState(
            "ns", f"p{n}", f"u{n}", "Running", 0.0, None, False, None, node="node-a"
        )
        for n in numbers
    }


def test_empty_blocks_go_but_the_lowest_of_each_pool_and_range() -> None:
    other_range = PoolId("wide", 6), "fd00::/64 (range_start fd00::1:0)"
    blocks = [
        block(3),  # the lowest of its pool and range: kept, though empty
        block(7, pod(1)),
        block(9),
        block(12),
        block(20, range_text=other_range[1]),  # the only block of that range: kept
        block(21, range_text=other_range[1]),
        block(5, pool=PoolId("other", 6)),  # the only block of its pool
        # A config of the same CIDR with range_end: another size, so another range; kept.
        block(30, range_size=4096),
        block(31, range_size=4096),
    ]
    removable = {b.key for b in removable_blocks(blocks)}
    assert removable == {blocks[2].key, blocks[3].key, blocks[5].key, blocks[8].key}


def test_a_block_holding_a_rest_or_a_reservation_stays() -> None:
    resting = Owner("", "net1", "ns/p1", cooling_until=2_000_000_000)
    reserved = Owner("", "net1", "ns/p2", reserved=True)
    blocks = [block(0, pod(0)), block(1, resting), block(2, reserved), block(3)]
    assert [b.key for b in removable_blocks(blocks)] == [blocks[3].key]


def test_a_node_slice_registry_is_never_deleted() -> None:
    rng = build_range(RANGE_TEXT, range_start=None, range_end=None, exclude=[], pool=POOL)
    registry = SlicedRange(rng, parse_slice_size("/120", rng)).registry
    blocks = [block(0, pool=registry), block(1, pool=registry), block(2, pod(0))]
    assert removable_blocks(blocks) == []


owners = st.builds(
    Owner,
    container_id=st.sampled_from(["", "c1", "c2"]),
    ifname=st.just("net1"),
    pod=st.sampled_from(["ns/a", "ns/b"]),
    cooling_until=st.sampled_from([0, 1, 2_000_000_000]),
    reserved=st.booleans(),
)
stored_blocks = st.lists(
    st.tuples(
        st.sampled_from([PoolId("a", 6), PoolId("b", 6)]),
        st.integers(0, 40),
        st.sampled_from(["fd00::/64", "fd00::/120", ""]),  # "": stored before it was recorded
        st.sampled_from([0, 100, 256, 1 << 64]),  # 0: not recorded, taken from the text
        st.lists(owners, max_size=3),
    ),
    unique_by=lambda t: (t[0], t[1]),
)


@given(stored_blocks)
def test_what_the_pools_report_is_the_same_after_the_deletes(
    drawn: list[tuple[PoolId, int, str, int, list[Owner]]],
) -> None:
    blocks = [
        block(n, *held, pool=p, range_text=text, range_size=size)
        for p, n, text, size, held in drawn
    ]
    removable = {b.key for b in removable_blocks(blocks)}
    left = [b for b in blocks if b.key not in removable]
    for before, after in zip(pool_usage(blocks, now=1), pool_usage(left, now=1), strict=True):
        assert after.blocks == before.blocks - sum(1 for k in removable if k.pool == before.pool)
        after.blocks = before.blocks
        assert after == before
    assert all(not b.entries for b in blocks if b.key in removable)


def test_a_full_pass_deletes_them_and_a_targeted_one_does_not() -> None:
    store = stored(block(0, pod(0)), block(1), block(2))
    targeted = reconcile(store, lambda: pods_of(0), Policy(), only_pods={"ns/p0"})
    assert targeted.blocks_removed == [] and len(store.blocks) == 3
    dry = reconcile(store, lambda: pods_of(0), Policy(), dry_run=True)
    assert len(dry.blocks_removed) == 2 and len(store.blocks) == 3
    assert "2 empty block(s) would be deleted" in dry.describe()
    full = reconcile(store, lambda: pods_of(0), Policy())
    assert sorted(full.blocks_removed) == [block(1).key, block(2).key]
    assert list(store.blocks) == [block(0).key]
    assert "2 empty block(s) deleted" in full.describe()
    metrics = ReconcilerMetrics()
    for summary in (targeted, dry, full):
        metrics.record_pass("full", summary)
    assert metrics.registry.get_sample_value("pyabouts_reconciler_empty_blocks_deleted_total") == 2


def test_a_block_written_after_the_snapshot_is_kept() -> None:
    store = stored(block(0), block(1))
    snapshot = store.read_all_blocks()

    class WritesAfterTheSnapshot(MemoryStore):
        """The pass gets `snapshot`, taken before a node gave an address in block 1."""

        def read_all_blocks(self, **kwargs: object) -> list[Block]:
            [later] = store.read_blocks(POOL, BASE + BLOCK_SIZE, BASE + 2 * BLOCK_SIZE - 1)
            later.put(later.key.base + 1, pod(9))
            assert not store.write_blocks([later]).conflicts
            return snapshot

        def remove_block(self, block: Block) -> bool:
            return store.remove_block(block)

    summary = reconcile(WritesAfterTheSnapshot(), lambda: pods_of(9), Policy())
    assert summary.blocks_removed == [] and summary.failed == []
    assert store.blocks[block(1).key].entries == {block(1).key.base + 1: pod(9)}


def test_a_refused_delete_ends_the_deletes_with_a_warning_and_the_pass_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = []

    class MayNotDelete(MemoryStore):
        def remove_block(self, block: Block) -> bool:
            calls.append(block.key)
            raise StoreRefusedError("Forbidden: may not delete ippools")

    store = MayNotDelete()
    assert not store.write_blocks([block(0), block(1), block(2)]).conflicts
    summary = reconcile(store, dict, Policy())
    assert summary.blocks_removed == [] and len(calls) == 1
    assert summary.failed == []  # housekeeping: the pass did its work (exit 0)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "needs `delete` on ippools" in warning.getMessage()
    assert "Forbidden: may not delete ippools" in warning.getMessage()


def test_an_outage_ends_the_deletes_and_is_a_failure() -> None:
    class Down(MemoryStore):
        def remove_block(self, block: Block) -> bool:
            raise StoreUnavailableError("etcd at 10.0.0.1:2379 did not answer")

    store = Down()
    assert not store.write_blocks([block(0), block(1), block(2)]).conflicts
    summary = reconcile(store, dict, Policy())
    assert summary.failed == ["etcd at 10.0.0.1:2379 did not answer"]


def test_a_pass_deletes_at_most_its_share_the_lowest_first() -> None:
    store = stored(*(block(n) for n in range(REMOVALS_PER_PASS + 51)))
    first = reconcile(store, dict, Policy())
    assert first.blocks_removed == [block(n).key for n in range(1, REMOVALS_PER_PASS + 1)]
    second = reconcile(store, dict, Policy())
    assert len(second.blocks_removed) == 50
    assert list(store.blocks) == [block(0).key]


def test_a_node_holding_a_deleted_block_creates_it_again() -> None:
    """The node's cache holds the block as it was before the delete: its write is refused,
    it reads the block as absent and creates it, with the address its decision gives."""
    rng = build_range(RANGE_TEXT, range_start=None, range_end=None, exclude=[], pool=POOL)
    # Block 0 records the range as the node's writes do: the lowest block of that range.
    backing = stored(block(0, pod(0), range_text=rng.text, range_size=rng.size))
    node = CachedStore(backing)

    def add(n: int) -> int:
        transactions = DirectTransactions(node, backoff_max=0.001)
        [address] = operations.allocate(
            transactions, [rng], pod(n), [], deadline=1e12, spread_nodes=True
        )
        return address

    def delete(n: int) -> None:
        transactions = DirectTransactions(node, backoff_max=0.001)
        assert operations.release(transactions, [rng], f"c{n}", "net1", deadline=1e12)

    given = add(1)  # the node (an agent) reads the pool, and creates the block its name picks
    mine = BlockKey.of(POOL, given)
    assert mine != block(0).key
    delete(1)  # the block is stored empty, and the node's cache keeps it so
    summary = reconcile(backing, lambda: pods_of(0), Policy())
    assert summary.blocks_removed == [mine]
    assert mine not in backing.blocks
    writes, conflicts = backing.writes, backing.conflicts
    assert add(2) == given  # decided on the cached copy, refused, decided again on none
    assert (backing.writes - writes, backing.conflicts - conflicts) == (1, 1)
    assert backing.blocks[mine].entries == {given: pod(2)}


def test_a_store_that_cannot_delete_keeps_them() -> None:
    class CannotDelete:
        """A PoolStore without BlockRemoval."""

        def __init__(self) -> None:
            self.inner = stored(block(0), block(1))

        def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
            return self.inner.read_blocks(pool, first, last)

        def read_all_blocks(self, **kwargs: object) -> list[Block]:
            return self.inner.read_all_blocks()

        def write_blocks(self, blocks: object) -> object:
            raise AssertionError("nothing to write")

        def close(self) -> None:
            pass

    store = CannotDelete()
    summary = reconcile(store, dict, Policy())  # type: ignore[arg-type]
    assert summary.blocks_removed == [] and len(store.inner.blocks) == 2
