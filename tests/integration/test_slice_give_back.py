"""The reconciler gives back a gone node's slice in one transaction over the slice's addresses
and its registry entry; when a neighbour writes the block they share meanwhile, the write
conflicts and a retry completes it. Run on real etcd and a real kube-apiserver, and on the
fake that writes block by block as the Kubernetes store does."""

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

import pytest

from pyabouts.controller.node_slices import FreedSlice, free_slices_of_gone_nodes
from pyabouts.ipam import allocator
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId, PoolView
from pyabouts.ipam.ranges import build_range
from pyabouts.ipam.slices import SlicedRange, held_slice, take_slice
from pyabouts.ipam.store import OnUnreadable, PoolStore, WriteOutcome
from tests.integration.stored_state import etcd_store, kubernetes_store
from tests.memory_store import BlockByBlockStore

pytestmark = pytest.mark.integration


class NeighbourMeanwhile:
    """`store`, but before its next write another writer lands (what `meanwhile` holds), as
    between a read and a write on a busy node; counts the conflicts its writes met."""

    def __init__(self, store: PoolStore) -> None:
        self.store = store
        self.meanwhile: list[Callable[[], object]] = []
        self.conflicts: list[BlockKey] = []

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        return self.store.read_blocks(pool, first, last)

    def read_all_blocks(self, *, on_unreadable: OnUnreadable | None = None) -> list[Block]:
        return self.store.read_all_blocks(on_unreadable=on_unreadable)

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        while self.meanwhile:
            self.meanwhile.pop()()
        outcome = self.store.write_blocks(blocks)
        self.conflicts += outcome.conflicts
        return outcome

    def close(self) -> None:
        self.store.close()


@pytest.fixture(params=["block-by-block", "etcd", "kubernetes"])
def store(request: pytest.FixtureRequest) -> Iterator[PoolStore]:
    real: PoolStore
    if request.param == "block-by-block":
        real = BlockByBlockStore()
    elif request.param == "kubernetes":
        real = kubernetes_store(str(request.getfixturevalue("pyabouts_cluster").kubeconfig))
    else:
        real = etcd_store(request.getfixturevalue("etcd_server"))
    yield real
    real.close()


def pod(n: int, node: str) -> Owner:
    return Owner(container_id=f"c{n}", ifname="net1", pod=f"default/pod-{n}", node=node)


def test_a_gone_nodes_slice_goes_back_with_its_ended_rests_when_a_neighbour_writes_meanwhile(
    store: PoolStore,
) -> None:
    network = f"give-back-{uuid.uuid4().hex[:8]}"  # the servers are shared with other tests
    rng = build_range(
        "10.0.0.0/24", range_start=None, range_end=None, exclude=[], pool=PoolId(network, 4)
    )
    cut = SlicedRange(rng, 26)  # four slices in the one block of addresses
    view = PoolView([])
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

    interleaved = NeighbourMeanwhile(store)
    snapshot = [b for b in store.read_all_blocks() if b.key.pool in (rng.pool, cut.registry)]
    interleaved.meanwhile.append(alive_allocates_again)
    freed = free_slices_of_gone_nodes(
        interleaved, snapshot, {"alive"}, deadline=time.monotonic() + 10
    )

    assert interleaved.conflicts == [BlockKey.of(rng.pool, rng.first)]  # the race did happen
    assert freed == [FreedSlice(network, str(cut.slice_network(gone_slice)), "gone")]
    after = PoolView(store.read_all_blocks())
    assert held_slice(after, cut, "gone") is None
    assert after.owner(rng.pool, rested) is None  # the ended rest went with the slice
    assert held_slice(after, cut, "alive") == alive_slice
    assert len(list(after.entries(rng.pool, rng.first, rng.last))) == 2  # alive's two pods
