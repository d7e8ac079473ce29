"""The reconciler gives back a gone node's slice in one transaction over the slice's addresses
and its registry entry, completed by a retry on a store that writes block by block."""

import dataclasses
import time

from pyabouts.controller.node_slices import FreedSlice, free_slices_of_gone_nodes
from pyabouts.ipam import allocator
from pyabouts.ipam.pool import Owner, PoolId, PoolView
from pyabouts.ipam.ranges import build_range
from pyabouts.ipam.slices import SlicedRange, held_slice, take_slice
from tests.memory_store import BlockByBlockStore


def pod(n: int, node: str) -> Owner:
    return Owner(container_id=f"c{n}", ifname="net1", pod=f"default/pod-{n}", node=node)


def test_a_gone_nodes_slice_goes_back_with_its_ended_rests_when_a_neighbour_writes_meanwhile() -> (
    None
):
    rng = build_range(
        "10.0.0.0/24", range_start=None, range_end=None, exclude=[], pool=PoolId("net", 4)
    )
    cut = SlicedRange(rng, 26)  # four slices in the one block of addresses
    store, view = BlockByBlockStore(), PoolView([])
    gone_slice = take_slice(view, cut, "gone")
    resting = dataclasses.replace(pod(1, "gone"), cooldown=30)
    rested = allocator.assign_addresses(view, [cut.within(gone_slice)], resting, [], now=1000)[0]
    allocator.release_addresses(view, [rng], "c1", "net1", now=1000)  # its rest ended long ago
    alive_slice = take_slice(view, cut, "alive")
    allocator.assign_addresses(view, [cut.within(alive_slice)], pod(2, "alive"), [])
    assert store.write_blocks(view.changed_blocks()).conflicts == []

    def alive_allocates_again() -> None:  # its node's write to the shared block of addresses
        fresh = PoolView(store.read_blocks(rng.pool, rng.first, rng.last))
        allocator.assign_addresses(fresh, [cut.within(alive_slice)], pod(3, "alive"), [])
        assert store.write_blocks(fresh.changed_blocks()).conflicts == []

    snapshot = store.read_all_blocks()
    store.meanwhile.append(alive_allocates_again)
    freed = free_slices_of_gone_nodes(store, snapshot, {"alive"}, deadline=time.monotonic() + 5)

    assert freed == [FreedSlice("net", str(cut.slice_network(gone_slice)), "gone")]
    after = PoolView(store.read_all_blocks())
    assert held_slice(after, cut, "gone") is None
    assert after.owner(rng.pool, rested) is None  # the ended rest went with the slice
    assert held_slice(after, cut, "alive") == alive_slice
    assert len(list(after.entries(rng.pool, rng.first, rng.last))) == 2  # alive's two pods
