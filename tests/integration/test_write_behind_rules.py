"""Write-behind of a node's own slice blocks (ipam.stores.write_behind): what is answered is
what decisions see and what the journal keeps, the datastore gets it at the next flush, a
restarted agent takes up what was left, and nobody else's address is ever taken over.

Each rule runs on the in-memory store and on the real ones: IPPools on the local apiserver
(written block by block, a 409 for a stale resourceVersion) and etcd (one transaction). Where a
rule needs another writer at a given moment, a wrapper (Interposed) runs it around the real
store's own read or write."""

import contextlib
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import etcd3
import netaddr
import pytest

from deploy.local.etcd_server import EtcdServer
from deploy.local.pod_objects import create_namespace
from pyabouts.controller.leaks import Leak, Reason
from pyabouts.controller.reclaim import free_leaks
from pyabouts.ipam import operations, slices
from pyabouts.ipam.coalescing import CoalescingTransactions
from pyabouts.ipam.errors import TRY_AGAIN_LATER, StoreUnavailableError
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId
from pyabouts.ipam.ranges import build_range
from pyabouts.ipam.slices import SlicedRange, is_registry
from pyabouts.ipam.store import BlockRemoval, OnUnreadable, PoolStore, WriteOutcome
from pyabouts.ipam.stores.cached import CachedStore
from pyabouts.ipam.stores.etcd import KEY_PREFIX
from pyabouts.ipam.stores.kubeconfig import read_kubeconfig
from pyabouts.ipam.stores.kubernetes import KubernetesStore
from pyabouts.ipam.stores.write_behind import DeferringStore, PendingWrites
from pyabouts.ipam.transaction import DirectTransactions
from tests.integration.stored_state import STORE_TIMEOUT, etcd_store
from tests.memory_store import MemoryStore

pytestmark = pytest.mark.integration

# Networks of these tests alone: on etcd they are wiped before and after each test.
POOL = PoolId("wb-blue", 4)
RANGE = build_range("10.7.0.0/22", range_start=None, range_end=None, exclude=[], pool=POOL)
CUT = SlicedRange(RANGE, 24)  # a /24 slice per node: one block each
# A range of one block cut in four: four nodes' slices share a block.
QUARTERS = SlicedRange(
    build_range("10.9.0.0/24", range_start=None, range_end=None, exclude=[], pool=POOL), 26
)


def owner(n: int, node: str = "node-a") -> Owner:
    return Owner(f"c{n}", "net1", f"ns/p{n}", node=node)


def add(
    store: PoolStore,
    n: int,
    node: str = "node-a",
    *,
    deadline: float = 5,
    cut: SlicedRange = CUT,
    requested: int | None = None,
) -> int:
    """Pod `n`'s ADD on `node` through `store`: the address given (`requested`, if given)."""
    [address] = operations.allocate(
        DirectTransactions(store),
        [cut.range],
        owner(n, node),
        [] if requested is None else [netaddr.IPAddress(requested, POOL.family)],
        deadline=time.monotonic() + deadline,
        sliced=[cut],
    )
    return address


def delete(store: PoolStore, n: int, *, cut: SlicedRange = CUT) -> list[int]:
    return operations.release(
        DirectTransactions(store), [cut.range], f"c{n}", "net1", deadline=time.monotonic() + 5
    )


def stored(backing: PoolStore) -> dict[int, str]:
    """The addresses of POOL the datastore holds, with their containers."""
    return {
        address: o.container_id
        for block in backing.read_all_blocks()
        if block.key.pool == POOL
        for address, o in block.entries.items()
    }


def halves_of(key: BlockKey) -> SlicedRange:
    """Another config of the network: `key`'s /24 cut into halves."""
    block_range = build_range(
        f"{netaddr.IPAddress(key.base)}/24", range_start=None, range_end=None, exclude=[], pool=POOL
    )
    return SlicedRange(block_range, 25)


def in_node_b_half(key: BlockKey) -> int:
    """An address of the half of `key` that node_b_takes_half_of gives node-b (the one its name
    picks, slices.preferred_slice), not its first."""
    halves = halves_of(key)
    index = slices.preferred_slice(halves.registry_range(), "node-b")
    return int(halves.slice_network(index).first) + 20


def node_b_takes_half_of(
    key: BlockKey, backing: PoolStore, journal: Path
) -> tuple[SlicedRange, DeferringStore]:
    """Another config of the network cuts `key`'s /24 into halves (halves_of), and node-b (an
    agent of its own) gives pod 50 an address from one: the halves, and node-b's store."""
    halves = halves_of(key)
    node_b = DeferringStore(backing, PendingWrites(journal.with_name("b"), "node-b"))
    operations.allocate(
        DirectTransactions(node_b),
        [halves.range],
        owner(50, "node-b"),
        [],
        deadline=time.monotonic() + 5,
        sliced=[halves],
    )
    return halves, node_b


def agent(
    journal: Path, backing: PoolStore, node: str = "node-a"
) -> tuple[PendingWrites, DeferringStore]:
    """The pending writes of `node`'s agent (its journal beside `journal`, unless node-a's)
    and its store over `backing`; a clash fails the test."""
    if node != "node-a":
        journal = journal.with_name(f"{node}.journal")
    pending = PendingWrites(journal, node, on_clash=lambda: pytest.fail("a clash"))
    return pending, DeferringStore(backing, pending)


@contextlib.contextmanager
def flush_after(pending: PendingWrites, backing: PoolStore, seconds: float) -> Iterator[None]:
    """A flush of `pending` into `backing` `seconds` after entering, unless left first."""
    stop = threading.Event()
    flusher = threading.Thread(target=lambda: stop.wait(seconds) or pending.flush(backing))
    flusher.start()
    try:
        yield
    finally:
        stop.set()
        flusher.join()


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "pending-writes.journal"


@pytest.fixture(params=["memory", "etcd", "kubernetes"])
def backing(request: pytest.FixtureRequest) -> Iterator[PoolStore]:
    """The datastore the agent writes behind into, empty: the fake, real etcd, or IPPools in a
    namespace of the test's own on the local apiserver."""
    store: PoolStore
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "etcd":
        server = request.getfixturevalue("etcd_server")
        wipe_etcd_pools(server)
        store = etcd_store(server)
        try:
            yield store
        finally:
            store.close()
            wipe_etcd_pools(server)
        return
    cluster = request.getfixturevalue("pyabouts_cluster")
    namespace = f"write-behind-{uuid.uuid4().hex[:8]}"
    create_namespace(cluster, namespace)
    credentials = dataclasses.replace(read_kubeconfig(str(cluster.kubeconfig)), namespace=namespace)
    store = KubernetesStore.from_credentials(credentials, timeout=STORE_TIMEOUT)
    try:
        yield store
    finally:
        store.close()
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")


datastore = backing  # the same, for a test that wraps it and calls the wrapper `backing`


def wipe_etcd_pools(server: EtcdServer) -> None:
    """Deletes everything of these tests' networks (theirs and their slice registries') in
    the session's etcd."""
    client = etcd3.client(host=server.host, port=server.port)
    try:
        for network in ("wb-blue", "wb-green"):
            client.delete_prefix(f"{KEY_PREFIX}/4/{network}")
    finally:
        client.close()


class Interposed:
    """A PoolStore that hands every call to `inner`: the base of wrappers that run another
    writer's step, or a fault, around the real store's own read or write."""

    def __init__(self, inner: PoolStore) -> None:
        self.inner = inner

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        return self.inner.read_blocks(pool, first, last)

    def read_all_blocks(self, *, on_unreadable: OnUnreadable | None = None) -> list[Block]:
        return self.inner.read_all_blocks(on_unreadable=on_unreadable)

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        return self.inner.write_blocks(blocks)

    def close(self) -> None:
        self.inner.close()


class AnswerLost(Interposed):
    """Stores its first write, then answers it as a timeout would: the writer cannot know."""

    def __init__(self, inner: PoolStore) -> None:
        super().__init__(inner)
        self.lost = False

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        outcome = self.inner.write_blocks(blocks)
        if not self.lost:
            self.lost = True
            raise StoreUnavailableError("no answer in time")
        return outcome


def test_a_flush_stored_whose_answer_was_lost_is_no_clash_when_stored_again(
    backing: PoolStore, journal: Path
) -> None:
    """An address given, freed and given to another pod, all kept: stored by a flush that
    heard no answer, then stored again over itself. The first give finds the address held,
    by this node's own last change of it: its history, not another node's pod."""
    clashes: list[int] = []
    pending = PendingWrites(journal, "node-a", on_clash=lambda: clashes.append(1))
    node = DeferringStore(backing, pending)
    add(node, 1)  # takes the slice: stored before the answer
    second = add(node, 2)
    delete(node, 2)
    assert add(node, 3, requested=second) == second
    left = pending.flush(AnswerLost(backing)).left
    assert left == 3  # stored, but not known to be: kept
    outcome = pending.flush(backing)
    assert (outcome.stored, outcome.left, outcome.clashes) == (3, 0, 0)
    assert clashes == []
    assert stored(backing)[second] == "c3"


def test_writes_of_the_nodes_slice_are_answered_kept_and_stored_at_the_flush(
    backing: PoolStore,
    journal: Path,
) -> None:
    pending = PendingWrites(journal, "node-a")
    node = DeferringStore(backing, pending)
    first = add(node, 1)  # takes the slice: stored before the answer, as it must be
    assert stored(backing) == {first: "c1"}
    given = [add(node, n) for n in range(2, 6)]
    assert len({first, *given}) == 5
    mine = netaddr.IPNetwork(f"{netaddr.IPAddress(first)}/24")
    assert all(netaddr.IPAddress(a) in mine for a in given)  # the slice node-a took
    # Answered, seen by the node's next decisions, in the journal; not in the datastore yet.
    assert stored(backing) == {first: "c1"}
    assert pending.pending_count() == 4
    assert len(journal.read_text().splitlines()) == 1 + 4
    assert add(node, 3) == given[1]  # the same pod again: its address, from the view
    outcome = pending.flush(backing)
    assert (outcome.stored, outcome.left, outcome.clashes) == (4, 0, 0)
    assert stored(backing) == {a: f"c{n}" for n, a in enumerate([first, *given], start=1)}
    assert len(journal.read_text().splitlines()) == 1  # its head alone


def test_a_release_before_the_flush_leaves_nothing_stored(
    backing: PoolStore, journal: Path
) -> None:
    pending = PendingWrites(journal, "node-a")
    node = DeferringStore(backing, pending)
    add(node, 1)
    second = add(node, 2)
    assert delete(node, 2) == [second]
    assert add(node, 3) == second  # free again at once on the node
    pending.flush(backing)
    assert stored(backing)[second] == "c3"
    assert "c2" not in stored(backing).values()


def test_a_restarted_agent_takes_up_the_journal_before_it_gives_anything(
    backing: PoolStore, journal: Path
) -> None:
    crashed = PendingWrites(journal, "node-a")
    node = DeferringStore(backing, crashed)
    given = [add(node, n) for n in range(1, 5)]
    # The agent dies with three answers unstored; the next one reads them from the journal.
    restarted = PendingWrites(journal, "node-a")
    node = DeferringStore(backing, restarted)
    assert restarted.pending_count() == 3
    fifth = add(node, 5)
    assert fifth not in given
    assert add(node, 2) == given[1]
    restarted.flush(backing)
    assert sorted(stored(backing)) == sorted([*given, fifth])


def test_a_journal_cut_short_mid_line_loses_only_that_unanswered_line(
    backing: PoolStore, journal: Path
) -> None:
    node = DeferringStore(backing, PendingWrites(journal, "node-a"))
    given = [add(node, n) for n in range(1, 4)]
    with journal.open("a") as text:
        text.write('{"network":"blue","family":4,"base":')  # a crash mid-write
    restarted = PendingWrites(journal, "node-a")
    assert restarted.pending_count() == 2
    restarted.flush(backing)
    assert sorted(stored(backing)) == sorted(given)


def test_another_nodes_journal_is_refused_while_it_holds_changes(
    backing: PoolStore, journal: Path
) -> None:
    pending = PendingWrites(journal, "node-a")
    node = DeferringStore(backing, pending)
    add(node, 1)
    add(node, 2)
    with pytest.raises(ValueError, match=r"changes node 'node-a' answered .* node 'node-b'"):
        PendingWrites(journal, "node-b")
    pending.flush(backing)  # stored: the file holds nothing of node-a's any more
    assert PendingWrites(journal, "node-b").pending_count() == 0


def test_the_flush_keeps_what_the_reconciler_freed_and_never_takes_over_an_address(
    backing: PoolStore,
    journal: Path,
) -> None:
    clashes: list[int] = []
    pending = PendingWrites(journal, "node-a", on_clash=lambda: clashes.append(1))
    node = DeferringStore(backing, pending)
    first, second = add(node, 1), add(node, 2)
    pending.flush(backing)
    third = add(node, 3)  # kept, not stored
    # Meanwhile, in the datastore: the reconciler frees pod 1's address, and a process that
    # does not cut the range into slices gives pod 3's address to a pod on another node.
    key = BlockKey.of(POOL, first)
    block = backing.read_blocks(POOL, key.base, key.base)[0]
    block.pop(first)
    block.put(third, owner(99, "node-b"))
    assert not backing.write_blocks([block]).conflicts
    outcome = pending.flush(backing)
    assert (outcome.stored, outcome.clashes) == (1, 1)
    assert clashes == [1]
    assert stored(backing) == {second: "c2", third: "c99"}  # freed stays free; c99 keeps its own
    # The block is another node's too now: every write of it is stored before its answer.
    fourth = add(node, 4)
    assert stored(backing)[fourth] == "c4"
    assert pending.pending_count() == 0


def test_a_block_the_reconciler_deletes_under_kept_changes_is_stored_again_with_them(
    backing: PoolStore,
    journal: Path,
) -> None:
    """The reconciler deletes a block that holds nothing (controller.empty_blocks), on the
    revision it read: while the node keeps a change of it, and again while it keeps none. The
    flush creates the block with what the node kept, and nothing is lost or clashes."""
    pending, node = agent(journal, backing)
    first = add(node, 1)  # takes the slice: stored before the answer
    assert delete(node, 1) == [first]
    pending.flush(backing)
    key = BlockKey.of(POOL, first)
    [empty] = backing.read_blocks(POOL, key.base, key.base)
    assert empty.entries == {}
    second = add(node, 2)  # kept, not stored
    assert isinstance(backing, BlockRemoval) and backing.remove_block(empty)
    third = add(node, 3)  # decided on the view, which holds pod 2's: kept too
    assert third != second and pending.pending_count() == 2
    outcome = pending.flush(backing)
    assert (outcome.stored, outcome.left, outcome.clashes) == (2, 0, 0)
    assert stored(backing) == {second: "c2", third: "c3"}
    # Emptied and deleted with nothing kept: the next give is kept, and stored the same way.
    assert sorted(delete(node, 2) + delete(node, 3)) == sorted([second, third])
    pending.flush(backing)
    [empty] = backing.read_blocks(POOL, key.base, key.base)
    assert empty.entries == {} and backing.remove_block(empty)
    fourth = add(node, 4)
    pending.flush(backing)
    assert stored(backing) == {fourth: "c4"}


def test_blocks_outside_the_nodes_slices_are_written_before_the_answer(
    backing: PoolStore, journal: Path
) -> None:
    pending = PendingWrites(journal, "node-a")
    node = DeferringStore(backing, pending)
    add(node, 1)
    add(node, 2)  # in node-a's slice: kept
    assert pending.pending_count() == 1
    # A pool without slices, through the same agent: stored before the answer.
    unsliced = build_range(
        "10.8.0.0/24", range_start=None, range_end=None, exclude=[], pool=PoolId("wb-green", 4)
    )
    [address] = operations.allocate(
        DirectTransactions(node), [unsliced], owner(3), [], deadline=time.monotonic() + 5
    )
    assert backing.read_blocks(unsliced.pool, address, address)[0].entries[address] == owner(3)
    # Another node's slice: node-b's own agent keeps its writes, node-a's journal has none.
    other = PendingWrites(journal.with_name("b.journal"), "node-b")
    add(DeferringStore(backing, other), 4, "node-b")
    add(DeferringStore(backing, other), 5, "node-b")
    assert pending.pending_count() == 1 and other.pending_count() == 1


def test_nodes_whose_slices_share_a_block_each_keep_the_changes_of_their_own_slice(
    backing: PoolStore,
    journal: Path,
) -> None:
    """Slices of /26: four nodes' slices in one block. A node's first ADD takes its slice and is
    stored before its answer; its next ones are kept, and each node's flush stores its own over
    what the other's stored."""
    pending_a, node_a = agent(journal, backing)
    pending_b, node_b = agent(journal, backing, "node-b")
    first_a = add(node_a, 1, cut=QUARTERS)
    first_b = add(node_b, 11, "node-b", cut=QUARTERS)
    assert stored(backing) == {first_a: "c1", first_b: "c11"}
    kept_a = {add(node_a, n, cut=QUARTERS): f"c{n}" for n in (2, 3, 4)}
    kept_b = {add(node_b, n, "node-b", cut=QUARTERS): f"c{n}" for n in (12, 13)}
    assert (pending_a.pending_count(), pending_b.pending_count()) == (3, 2)
    assert stored(backing) == {first_a: "c1", first_b: "c11"}
    slice_a = netaddr.IPNetwork(f"{netaddr.IPAddress(first_a)}/26")
    slice_b = netaddr.IPNetwork(f"{netaddr.IPAddress(first_b)}/26")
    assert slice_a != slice_b
    assert all(netaddr.IPAddress(a) in slice_a for a in kept_a)
    assert all(netaddr.IPAddress(a) in slice_b for a in kept_b)
    assert pending_a.flush(backing).stored == 3
    assert pending_b.flush(backing).stored == 2  # over node-a's write of the block
    assert stored(backing) == {first_a: "c1", first_b: "c11", **kept_a, **kept_b}


def node_a_keeps_a_release_of_node_bs_pod(
    journal: Path, backing: PoolStore
) -> tuple[PendingWrites, PendingWrites, DeferringStore, int]:
    """node-a, with a change kept in a block of /26 slices, frees node-b's pod 11 there (its DEL
    reached node-a): node-a's and node-b's pending writes, node-b's store, and the address."""
    pending_a, node_a = agent(journal, backing)
    pending_b, node_b = agent(journal, backing, "node-b")
    add(node_a, 1, cut=QUARTERS)
    add(node_a, 2, cut=QUARTERS)  # kept
    theirs = add(node_b, 11, "node-b", cut=QUARTERS)
    assert delete(node_a, 11, cut=QUARTERS) == [theirs]
    return pending_a, pending_b, node_b, theirs


def test_a_release_of_another_nodes_address_in_a_block_with_changes_kept_is_kept_too(
    backing: PoolStore,
    journal: Path,
) -> None:
    """node-a frees node-b's pod's address (its DEL reached node-a) in a block where node-a has
    a change kept: kept too (it waited for the flush, and a stream of ADDs keeping the block's
    changes pending could hold it off until its deadline). node-b does not give the address
    again meanwhile, its view showing it held, and the flushes store both nodes' changes."""
    pending_a, pending_b, node_b, theirs = node_a_keeps_a_release_of_node_bs_pod(journal, backing)
    assert pending_a.pending_count() == 2 and stored(backing)[theirs] == "c11"
    again = add(node_b, 12, "node-b", cut=QUARTERS)
    assert again != theirs and pending_b.pending_count() == 1
    assert pending_a.flush(backing).stored == 2 and pending_b.flush(backing).stored == 1
    assert sorted(stored(backing).values()) == ["c1", "c12", "c2"]


def test_a_release_kept_of_an_address_changed_meanwhile_leaves_what_is_stored(
    backing: PoolStore,
    journal: Path,
) -> None:
    """node-a keeps the release of node-b's pod's address (its DEL reached node-a); before
    node-a's flush, node-b frees it too, gives it to a sticky pod and that pod's DEL reserves
    it for the pod. node-a's flush leaves the reservation (it freed it: the address could be
    given again while reserved), and it is no clash."""
    pending_a, pending_b, node_b, theirs = node_a_keeps_a_release_of_node_bs_pod(journal, backing)
    assert pending_a.pending_count() == 2  # kept, not stored
    assert delete(node_b, 11, cut=QUARTERS) == [theirs]
    sticky = dataclasses.replace(owner(20, "node-b"), sticky=True)
    deadline = time.monotonic() + 5
    given = operations.allocate(
        DirectTransactions(node_b),
        [QUARTERS.range],
        sticky,
        [],
        deadline=deadline,
        sliced=[QUARTERS],
    )
    assert given == [theirs]
    operations.release(
        DirectTransactions(node_b), [QUARTERS.range], "c20", "net1", deadline=deadline
    )
    assert pending_b.flush(backing).stored >= 1
    reserved = backing.read_blocks(POOL, theirs, theirs)[0].entries[theirs]
    assert reserved.reserved and reserved.pod == "ns/p20"
    outcome = pending_a.flush(backing)
    assert (outcome.stored, outcome.clashes) == (2, 0)
    assert backing.read_blocks(POOL, theirs, theirs)[0].entries[theirs] == reserved


def test_a_give_kept_over_a_rest_stored_meanwhile_records_the_pod_it_was_answered_to(
    backing: PoolStore,
    journal: Path,
) -> None:
    """node-a gives an address of its slice, kept; meanwhile a rest of another pod is stored
    there. The flush stores node-a's pod, which has the address: left resting, it would be
    given again when the rest ends. (A clash, as for a pod holding it, left it resting.)"""
    pending, node = agent(journal, backing)
    add(node, 1)
    second = add(node, 2)  # kept
    block = backing.read_blocks(POOL, second, second)[0]
    rest = dataclasses.replace(owner(99, "node-b"), container_id="", cooling_until=2**31)
    block.put(second, rest)
    assert not backing.write_blocks([block]).conflicts
    outcome = pending.flush(backing)
    assert (outcome.stored, outcome.clashes) == (1, 0)
    assert stored(backing)[second] == "c2"


def test_a_decision_on_a_block_whose_changes_wait_too_long_is_an_outage_not_a_conflict(
    backing: PoolStore,
    journal: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decision that would wait for the changes of its block kept before it (it gives in
    another config's slice there) gets code 11 once they have waited too long for the
    datastore: after the grace of an outage, not retried as a conflict until its deadline."""
    monkeypatch.setattr("pyabouts.ipam.transaction.OUTAGE_GRACE", 0.3)
    pending = PendingWrites(journal, "node-a", max_pending=0.1)
    node = DeferringStore(backing, pending)
    first = add(node, 1)
    add(node, 2)  # kept, and never stored
    key = BlockKey.of(POOL, first)
    halves, _ = node_b_takes_half_of(key, backing, journal)
    node.read_blocks(halves.registry, 0, 1 << 32)
    time.sleep(0.2)
    began = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="have waited") as refused:
        add(node, 3, requested=in_node_b_half(key), deadline=30)
    assert refused.value.code == TRY_AGAIN_LATER
    assert time.monotonic() - began < 5  # the grace (0.3 s), not the deadline


def test_a_flush_whose_write_another_node_came_before_stores_at_once_on_a_fresh_read(
    backing: PoolStore,
    journal: Path,
) -> None:
    """node-b stores a change of its slice of the block between node-a's flush reading the
    block and writing it: node-a's flush writes again at once, not a flush interval later."""
    pending_a, node_a = agent(journal, backing)
    pending_b, node_b = agent(journal, backing, "node-b")
    add(node_a, 1, cut=QUARTERS)
    add(node_b, 11, "node-b", cut=QUARTERS)
    kept = add(node_a, 2, cut=QUARTERS)
    theirs = add(node_b, 12, "node-b", cut=QUARTERS)

    class NodeBFirst(Interposed):
        def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
            if pending_b.pending_count():
                assert pending_b.flush(backing).stored == 1
            return backing.write_blocks(blocks)

    outcome = pending_a.flush(NodeBFirst(backing))
    assert (outcome.stored, outcome.left) == (1, 0)
    assert stored(backing)[kept] == "c2" and stored(backing)[theirs] == "c12"


def test_defer_false_stores_every_write_once_the_journal_is_taken_up(
    backing: PoolStore, journal: Path
) -> None:
    node = DeferringStore(backing, PendingWrites(journal, "node-a"))
    given = [add(node, n) for n in range(1, 3)]
    plain = PendingWrites(journal, "node-a", defer=False)
    node = DeferringStore(backing, plain)
    # The block still has changes pending: a write decided on them joins them.
    third = add(node, 3)
    assert third not in given and plain.pending_count() == 2
    plain.flush(backing)
    assert sorted(stored(backing)) == sorted([*given, third])
    fourth = add(node, 4)
    assert stored(backing)[fourth] == "c4" and plain.pending_count() == 0


def serve_with_flushers(
    nodes: Sequence[tuple[str, PendingWrites, DeferringStore, PoolStore]], cut: SlicedRange
) -> dict[int, int]:
    """120 pods' ADDs in `cut`, round robin over `nodes` (each its agent's batched decisions,
    and the store its flush writes through, as the agent's goes through its cache), a third of
    them DELed again at once, while each node flushes every 2 ms: every DEL finds its ADD's
    address. The addresses answered and not released, by pod, once every node's flush has
    stored what it kept."""
    stop = threading.Event()

    def flush_on(pending: PendingWrites, store: PoolStore) -> None:
        while not stop.wait(0.002):
            pending.flush(store)

    flushers = [threading.Thread(target=flush_on, args=(p, f)) for _, p, _, f in nodes]
    for flusher in flushers:
        flusher.start()
    batching = [CoalescingTransactions(store, lambda _: None) for _, _, store, _ in nodes]
    answers: dict[int, int] = {}
    lock = threading.Lock()

    def serve(n: int) -> None:
        transactions = batching[n % len(nodes)]
        [address] = operations.allocate(
            transactions,
            [cut.range],
            owner(n, nodes[n % len(nodes)][0]),
            [],
            deadline=time.monotonic() + 10,
            sliced=[cut],
        )
        if n % 3 == 0:  # a third of the pods go away again
            assert operations.release(
                transactions, [cut.range], f"c{n}", "net1", deadline=time.monotonic() + 10
            ) == [address]
            return
        with lock:
            answers[n] = address

    workers = [threading.Thread(target=serve, args=(n,)) for n in range(120)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    for flusher in flushers:
        flusher.join()
    for _, pending, _, store in nodes:
        while pending.flush(store).left:
            pass
    return answers


def test_concurrent_adds_and_dels_with_a_flusher_running_store_exactly_what_was_answered(
    backing: PoolStore,
    journal: Path,
) -> None:
    """Batched decisions (the agent's) on a node, ADDs and DELs at once, while the flusher
    stores: every answer is unique, and the datastore ends up holding exactly what was
    answered and not released. (Found reads that began before a flush's write undoing it in
    the view: a DEL that found nothing.)"""
    answers = serve_with_flushers([("node-a", *agent(journal, backing), backing)], CUT)
    assert len(set(answers.values())) == len(answers) == 80
    assert stored(backing) == {a: f"c{n}" for n, a in answers.items()}


@pytest.mark.parametrize("cached", [False, True], ids=["fresh-reads", "cached-reads"])
def test_nodes_sharing_a_block_batching_adds_and_dels_with_flushers_store_what_was_answered(
    backing: PoolStore, journal: Path, cached: bool
) -> None:
    """The same on two nodes whose slices of /26 lie in one block, each flushing its own, and
    reading through a cache of its own as the agent does (a copy of the block up to 50 ms
    old: the other node's writes show late): every answer is unique across the nodes, with no
    clash."""
    nodes: list[tuple[str, PendingWrites, DeferringStore, PoolStore]] = []
    for name in ("node-a", "node-b"):
        through: PoolStore = CachedStore(backing, max_age=0.05) if cached else backing
        nodes.append((name, *agent(journal, through, name), through))
    answers = serve_with_flushers(nodes, QUARTERS)
    assert len(set(answers.values())) == len(answers) == 80
    assert stored(backing) == {a: f"c{n}" for n, a in answers.items()}


def test_a_change_the_journal_cannot_take_is_refused_and_kept_nowhere(
    backing: PoolStore, journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pending = PendingWrites(journal, "node-a")
    node = DeferringStore(backing, pending)
    first = add(node, 1)

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(os, "write", disk_full)
        refused = r"journal .* (took no change|cannot be repaired)"  # the retry's answer
        with pytest.raises(StoreUnavailableError, match=refused):
            add(node, 2, deadline=0.2)
    # Not answered, so not kept; the next change first rewrites the journal whole, so that no
    # line runs on from one the full disk cut short.
    assert pending.pending_count() == 0
    second = add(node, 2)
    assert second != first and pending.pending_count() == 1
    assert PendingWrites(journal, "node-a").pending_count() == 1


def test_a_block_whose_changes_wait_too_long_takes_no_new_one_and_others_go_on(
    backing: PoolStore,
    journal: Path,
) -> None:
    """Measured per block, from its oldest change: a block another flush left changes in
    counts from that flush, and a block with nothing waiting is not held up by another."""
    pending = PendingWrites(journal, "node-a", max_pending=0.3)
    halves = SlicedRange(RANGE, 23)  # a /23 per node: two blocks each
    node = DeferringStore(backing, pending)

    def add_at(n: int, address: str, deadline: float = 5) -> None:
        operations.allocate(
            DirectTransactions(node),
            [RANGE],
            owner(n),
            [netaddr.IPAddress(address)],
            deadline=time.monotonic() + deadline,
            sliced=[halves],
        )

    add_at(1, "10.7.2.10")  # takes 10.7.2.0/23 (its name picks it), stored
    add_at(2, "10.7.2.11")  # kept, in the first block
    time.sleep(0.4)
    add_at(3, "10.7.3.10")  # the second block has nothing waiting: kept
    with pytest.raises(StoreUnavailableError, match=r"waited .* to be stored"):
        add_at(4, "10.7.2.12", deadline=0.2)
    pending.flush(backing)
    add_at(4, "10.7.2.12")  # stored: the first block takes changes again
    assert {"c1", "c2", "c3"} <= set(stored(backing).values())


def test_a_write_that_changes_no_address_leaves_nothing_pending(
    backing: PoolStore, journal: Path
) -> None:
    pending = PendingWrites(journal, "node-a")
    node = DeferringStore(backing, pending)
    add(node, 1)
    [block] = [b for b in node.read_blocks(POOL, RANGE.first, RANGE.last) if b.key.pool == POOL]
    unchanged = block.copy()
    assert not node.write_blocks([unchanged]).conflicts
    assert pending.pending_count() == 0
    assert len(journal.read_text().splitlines()) == 1


def test_a_slice_another_registry_gives_to_another_node_is_not_written_behind(
    backing: PoolStore,
    journal: Path,
) -> None:
    """Two configs of one network, another range cut into slices of another size: each has a
    registry of its own, so node-b may hold a slice over node-a's. Once node-a's agent has read
    both registries, it stores its writes of node-b's slice before answering, and keeps those
    of the rest of its own."""
    pending, node_a = agent(journal, backing)
    _, node_b = agent(journal, backing, "node-b")
    key = BlockKey.of(POOL, add(node_a, 1))
    halves = halves_of(key)
    add(node_b, 50, "node-b", cut=halves)  # node-b takes a /25 of node-a's /24
    add(node_a, 51, cut=halves)  # node-a reads that registry too (and takes the other /25)
    second = add(node_a, 2, requested=in_node_b_half(key))
    assert stored(backing)[second] == "c2" and pending.pending_count() == 0
    third = add(node_a, 3)
    assert third not in stored(backing) and pending.pending_count() == 1


class BlockByBlockStore(Interposed):
    """Writes block by block, as the IPPool store does, and holds the first write of an address
    block until `go` is set (`holding` tells when it waits)."""

    def __init__(self, inner: PoolStore) -> None:
        super().__init__(inner)
        self.holding = threading.Event()
        self.go = threading.Event()

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        outcome = WriteOutcome()
        for block in blocks:
            if not is_registry(block.key.pool) and not self.holding.is_set():
                self.holding.set()
                self.go.wait()
            one = self.inner.write_blocks([block])
            if one.conflicts:
                return WriteOutcome(conflicts=one.conflicts, revisions=outcome.revisions)
            outcome.revisions.update(one.revisions)
        return outcome


def test_a_decision_on_a_block_the_agent_is_storing_itself_is_never_kept_unchecked(
    datastore: PoolStore,
    journal: Path,
) -> None:
    """The node's first ADD (X) stores its slice, then its address, before its answer. Another
    batch (Y: another config of the network, or the next store client) decides while X's
    address is on its way: the registry already says the slice is the node's, the cache does
    not hold X's address yet. Y must not be kept on that state unchecked (it was: both got the
    same address, and the flush found the clash)."""
    backing = BlockByBlockStore(datastore)
    cache = CachedStore(backing)
    pending, node = agent(journal, cache)
    answers: dict[str, int] = {}
    first = threading.Thread(target=lambda: answers.update(X=add(node, 1)), daemon=True)
    first.start()
    try:
        assert backing.holding.wait(5)  # X's slice is stored, its address is not yet
        answers["Y"] = add(node, 2)
    finally:
        backing.go.set()
    first.join()
    assert answers["X"] != answers["Y"]
    third = add(node, 3)
    assert third not in answers.values()
    # Y was stored before its answer (beside X's write), X's retry and the third written
    # behind: decided on a view read after the node's last write of its own.
    assert stored(backing) == {answers["Y"]: "c2"}
    assert pending.pending_count() == 2
    pending.flush(cache)
    assert stored(backing) == {answers["X"]: "c1", answers["Y"]: "c2", third: "c3"}


def test_the_outcomes_of_two_own_writes_of_a_block_out_of_order_never_date_its_view(
    datastore: PoolStore,
    journal: Path,
) -> None:
    """Two writes of one block stored before their answers, Y then X: X's outcome comes back
    first, unknown (answered as a conflict, though stored), Y's success after. A decision (Z)
    on a read of the block as Y left it is then checked by the datastore, never kept on that
    older state (it was: Y's late outcome counted as the newest, and Z got X's address)."""
    backing = ResentWriteStore(datastore)
    cache = CachedStore(backing)
    pending, node = agent(journal, cache)
    key = BlockKey.of(POOL, add(node, 1))  # takes the slice, creates the block
    span = (key.base, key.base + 255)
    node.read_blocks(CUT.registry, 0, 1 << 32)  # as each decision does: the slice is node-a's

    def block_in(blocks: list[Block]) -> Block:
        return next(b for b in blocks if b.key == key).copy()

    y = block_in(cache.read_blocks(POOL, *span))  # decided before any read tracked it
    y.put(key.base + 10, owner(10))
    deferred, direct, order = pending.split([y])
    assert direct == [y] and not deferred
    y_outcome = cache.write_blocks(direct)  # stored; its thread stalls before written()
    read_by_z = cache.read_blocks(POOL, *span)  # the block as Y left it; Z stalls too
    x = block_in(node.read_blocks(POOL, *span))
    x.put(key.base + 20, owner(20))
    backing.resend_next = True
    assert node.write_blocks([x]).conflicts == [key]  # stored all the same
    pending.written(direct, order, y_outcome)  # Y's outcome, late
    z = block_in(pending.view(POOL, *span, read_by_z))
    assert key.base + 20 not in z.entries
    z.put(key.base + 20, owner(30))
    assert node.write_blocks([z]).conflicts == [key]  # checked by the datastore
    assert stored(backing)[key.base + 20] == "c20"


class ResentWriteStore(Interposed):
    """A store whose next write lands and is answered as a conflict, as when a request sent
    again (a kept-alive connection found closed, another etcd endpoint) meets its own first
    attempt."""

    resend_next = False

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        outcome = self.inner.write_blocks(blocks)
        if self.resend_next and outcome.revisions:
            self.resend_next = False
            return WriteOutcome(conflicts=list(outcome.revisions))
        return outcome


def test_an_own_write_answered_as_a_conflict_may_have_landed(
    datastore: PoolStore, journal: Path
) -> None:
    """X's write of a block, stored before its answer, lands and is answered as a conflict.
    A decision (Z) on the view X decided on is then checked by the datastore, never kept on
    it (it was: the conflict counted as nothing stored, and Z was given X's address)."""
    backing = ResentWriteStore(datastore)
    cache = CachedStore(backing)
    pending, node = agent(journal, cache)
    key = BlockKey.of(POOL, add(node, 1))
    span = (key.base, key.base + 255)
    node.read_blocks(CUT.registry, 0, 1 << 32)  # as each decision does: the slice is node-a's
    in_flight = next(b for b in cache.read_blocks(POOL, *span) if b.key == key).copy()
    deferred, direct, order = pending.split([in_flight])  # another write of it, on its way
    assert direct == [in_flight] and not deferred
    view = next(b for b in node.read_blocks(POOL, *span) if b.key == key)
    x, z = view.copy(), view.copy()
    x.put(key.base + 20, owner(20))
    z.put(key.base + 20, owner(30))
    backing.resend_next = True
    assert node.write_blocks([x]).conflicts == [key]  # stored all the same
    pending.written(direct, order, cache.write_blocks(direct))  # a real conflict
    assert node.write_blocks([z]).conflicts == [key]
    assert stored(backing)[key.base + 20] == "c20"
    assert pending.pending_count() == 0


def test_a_write_kept_while_the_agent_stores_the_same_block_itself_is_a_conflict(
    backing: PoolStore,
    journal: Path,
) -> None:
    """A (deferred) and B decide on one view of a block. Before A is kept, the agent reads a
    registry by which another node's slice overlaps half of the block, so B, which gives in
    that half, is split off to be stored before its answer. A, which gives in the other half,
    is then a conflict, decided again: while a write of the agent's own is on its way, the
    view the block's decisions see lacks it, and nothing decided on that view is kept."""
    pending = PendingWrites(journal, "node-a")
    node = DeferringStore(backing, pending)
    key = BlockKey.of(POOL, add(node, 1))
    span = (key.base, key.base + 255)
    node.read_blocks(CUT.registry, 0, 1 << 32)
    view = next(b for b in node.read_blocks(POOL, *span) if b.key == key)
    a, b = view.copy(), view.copy()
    a.put(in_node_b_half(key) ^ 0x80, owner(20))  # the half node-a keeps giving from alone
    b.put(in_node_b_half(key), owner(30))
    deferred_a, direct_a, _ = pending.split([a])
    assert deferred_a == [a] and not direct_a
    halves, _ = node_b_takes_half_of(key, backing, journal)
    node.read_blocks(halves.registry, 0, 1 << 32)  # node-b's half of node-a's block
    deferred_b, direct_b, order = pending.split([b])  # b's address is in that half
    assert direct_b == [b] and not deferred_b  # on its way to the datastore
    assert pending.keep(deferred_a).conflicts == [key]
    pending.written(direct_b, order, backing.write_blocks(direct_b))
    assert pending.pending_count() == 0


def test_a_read_older_than_one_seen_is_never_decided_on_when_the_block_is_held_again(
    backing: PoolStore,
    journal: Path,
) -> None:
    """A read (Z) of a block where node-a holds no slice yet begins; node-a takes a quarter of
    the block, storing its first address there, and then reads the registry, so the block is
    held. Z comes back: a decision on it, which lacks that first address, gives it again. It
    is checked by the datastore (a conflict), never kept on the state before node-a's write."""
    pending, node = agent(journal, backing)
    _, node_b = agent(journal, backing, "node-b")
    key = BlockKey.of(POOL, add(node_b, 11, "node-b", cut=QUARTERS))
    span = (key.base, key.base + 255)
    read_by_z = backing.read_blocks(POOL, *span)  # comes back late
    first = add(node, 1, cut=QUARTERS)  # node-a's quarter: stored before its answer
    node.read_blocks(QUARTERS.registry, 0, 1 << 32)  # held now
    z = next(b for b in pending.view(POOL, *span, read_by_z) if b.key == key).copy()
    assert first not in z.entries
    z.put(first, owner(30))
    assert node.write_blocks([z]).conflicts == [key]
    assert stored(backing)[first] == "c1" and pending.pending_count() == 0


def test_a_flush_never_takes_the_view_back_before_a_state_read_while_it_wrote(
    backing: PoolStore,
    journal: Path,
) -> None:
    """While a flush's write is on its way back, the reconciler frees the node's first address
    and a read tracks that. The flush's outcome then leaves the view on the later state: a
    decision on a read from before the reconciler is checked by the datastore, and the freed
    address is free on the node (it was: the view went back to the flush's state)."""
    pending, node = agent(journal, backing)
    first = add(node, 1)
    key = BlockKey.of(POOL, first)
    span = (key.base, key.base + 255)
    add(node, 2)  # written behind
    read_by_z: list[Block] = []

    class ReconcilerMeanwhile(Interposed):
        def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
            outcome = backing.write_blocks(blocks)
            read_by_z.extend(backing.read_blocks(POOL, *span))
            freed = backing.read_blocks(POOL, *span)[0]
            freed.pop(first)  # the reconciler: c1's pod is gone
            assert not backing.write_blocks([freed]).conflicts
            node.read_blocks(POOL, *span)  # a read tracks that
            return outcome

    assert pending.flush(ReconcilerMeanwhile(backing)).stored == 1
    z = next(b for b in pending.view(POOL, *span, read_by_z) if b.key == key).copy()
    z.put(key.base + 40, owner(40))
    assert node.write_blocks([z]).conflicts == [key]
    assert add(node, 3) == first


def test_a_block_found_holding_another_nodes_address_takes_no_change_kept_behind_later(
    backing: PoolStore,
    journal: Path,
) -> None:
    """A flush finds another node's pod on an address of the node's block: a clash, and one
    more change was kept while that flush wrote. The next decisions on the block wait for the
    next flush to store that change, and then are stored before their answers (they were
    kept behind, each one a clash to be)."""
    pending = PendingWrites(journal, "node-a", on_clash=lambda: None)
    node = DeferringStore(backing, pending)
    first = add(node, 1)
    taken = add(node, 2)  # kept; meanwhile another node's pod is stored at the same address
    key = BlockKey.of(POOL, first)
    span = (key.base, key.base + 255)
    decided = next(b for b in node.read_blocks(POOL, *span) if b.key == key).copy()
    decided.put(key.base + 30, owner(30))  # decided before the other pod was stored
    block = backing.read_blocks(POOL, *span)[0]
    block.put(taken, owner(99, "node-b"))
    assert not backing.write_blocks([block]).conflicts

    class KeepingMeanwhile(Interposed):
        def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
            outcome = backing.write_blocks(blocks)
            assert node.write_blocks([decided]).revisions  # kept while the flush wrote
            return outcome

    outcome = pending.flush(KeepingMeanwhile(backing))
    assert (outcome.clashes, outcome.left) == (1, 1)
    with flush_after(pending, backing, 0.2):
        fourth = add(node, 4)  # waits for that flush
    assert stored(backing)[fourth] == "c4" and pending.pending_count() == 0


def test_a_block_holding_another_nodes_address_in_the_nodes_slice_is_stored_before_answers(
    backing: PoolStore,
    journal: Path,
) -> None:
    pending, node = agent(journal, backing)
    first = add(node, 1)
    add(node, 2)  # kept
    key = BlockKey.of(POOL, first)
    block = backing.read_blocks(POOL, key.base, key.base)[0]
    block.put(key.base + 200, owner(99, "node-b"))  # another config's pod, no clash
    assert not backing.write_blocks([block]).conflicts
    assert pending.flush(backing).stored == 1
    third = add(node, 3)
    assert stored(backing)[third] == "c3"  # stored before its answer


@pytest.mark.parametrize("cooldown", [0, 30], ids=["freed", "resting"])
def test_releasing_an_address_somebody_else_holds_now_is_no_clash(
    backing: PoolStore, journal: Path, cooldown: int
) -> None:
    """An ADD and its DEL kept, and meanwhile another node's pod stored at that address: one
    clash (the ADD's), whether the release leaves nothing or an entry resting (cooldown)."""
    clashes: list[int] = []
    pending = PendingWrites(journal, "node-a", on_clash=lambda: clashes.append(1))
    node = DeferringStore(backing, pending)
    first = add(node, 1)
    [second] = operations.allocate(
        DirectTransactions(node),
        [RANGE],
        dataclasses.replace(owner(2), cooldown=cooldown),
        [],
        deadline=time.monotonic() + 5,
        sliced=[CUT],
    )
    released = operations.release(
        DirectTransactions(node), [RANGE], "c2", "net1", deadline=time.monotonic() + 5, now=1
    )
    assert released == [second]  # both kept
    key = BlockKey.of(POOL, first)
    block = backing.read_blocks(POOL, key.base, key.base)[0]
    block.put(second, owner(99, "node-b"))
    assert not backing.write_blocks([block]).conflicts
    assert pending.flush(backing).clashes == 1
    assert clashes == [1] and stored(backing)[second] == "c99"


def test_a_journal_a_flush_could_not_rewrite_is_rewritten_by_the_next_one(
    backing: PoolStore, journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Else a restart would store again what the datastore holds already, over what was freed
    since."""
    pending = PendingWrites(journal, "node-a", repair_every=0.0)
    node = DeferringStore(backing, pending)
    add(node, 1)
    add(node, 2)
    real_replace = os.replace

    def full(source: str, target: str) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="no space"):
        pending.flush(backing)
    # Not compacted: the stored change is still there, and the line saying it is stored.
    assert len(journal.read_text().splitlines()) == 3
    left_as_is = journal.read_text()
    monkeypatch.setattr(os, "replace", real_replace)
    restarted = journal.with_name("restarted.journal")  # an agent started on it meanwhile
    restarted.write_text(left_as_is)
    assert PendingWrites(restarted, "node-a").pending_count() == 0  # stores nothing again
    assert pending.pending_count() == 0 and pending.needs_flush()
    pending.flush(backing)
    assert len(journal.read_text().splitlines()) == 1 and not pending.needs_flush()


def test_a_broken_journal_waits_between_repairs_but_the_last_flush_tries_at_once(
    backing: PoolStore, journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pending = PendingWrites(journal, "node-a")
    node = DeferringStore(backing, pending)
    add(node, 1)
    add(node, 2)

    def full(source: str, target: str) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="no space"):
        pending.flush(backing)
    assert not pending.needs_flush()  # not at every flush: each would be a warning
    assert pending.needs_flush(repair_now=True)  # the agent's last one


def test_a_block_another_nodes_slice_overlaps_takes_no_change_kept_behind_while_changes_wait(
    backing: PoolStore,
    journal: Path,
) -> None:
    """node-a has a change kept in its block when it reads another config's registry by which
    node-b holds half of that block. A decision of node-a's that gives in that half waits for
    the flush of what was kept; meanwhile no change of node-a's own half is kept either (a
    stream of them would keep it waiting until its deadline), and for a while after the flush
    they are stored before their answers, so that it gets its turn. Then they are kept again."""
    pending = PendingWrites(
        journal, "node-a", on_clash=lambda: pytest.fail("a clash"), drain_seconds=2.0
    )
    node = DeferringStore(backing, pending)
    first = add(node, 1)
    add(node, 2)  # kept
    key = BlockKey.of(POOL, first)
    halves, node_b = node_b_takes_half_of(key, backing, journal)
    delete(node_b, 50)  # nothing of node-b's in the block: it is not shared
    node.read_blocks(halves.registry, 0, 1 << 32)
    with pytest.raises(StoreUnavailableError):  # waits for the flush, which does not come
        add(node, 3, requested=in_node_b_half(key), deadline=0.2)
    with pytest.raises(StoreUnavailableError):  # not kept past the change waiting
        add(node, 4, deadline=0.2)
    assert pending.pending_count() == 1 and pending.flush(backing).stored == 1
    fifth = add(node, 5)  # stored before its answer while the block drains
    third = add(node, 3, requested=in_node_b_half(key))
    assert stored(backing)[fifth] == "c5" and stored(backing)[third] == "c3"
    time.sleep(2.1)
    sixth = add(node, 6)  # kept again
    assert sixth not in stored(backing) and pending.pending_count() == 1


class Crashed(BaseException):
    """The agent process dies here."""


def add_in_halves(store: PoolStore, n: int, address: str) -> int:
    """Pod `n`'s ADD of `address` with slices of /23 (node-a's name picks 10.7.2.0/23: two
    blocks)."""
    [given] = operations.allocate(
        DirectTransactions(store),
        [RANGE],
        owner(n),
        [netaddr.IPAddress(address)],
        deadline=time.monotonic() + 5,
        sliced=[SlicedRange(RANGE, 23)],
    )
    return given


def reconciler_frees(backing: PoolStore, address: int, n: int) -> None:
    """The reconciler: pod `n` is gone, and its address freed."""
    key = BlockKey.of(POOL, address)
    leak = Leak(key, address, owner(n), Reason.POD_GONE)
    assert free_leaks(backing, [leak], deadline=time.monotonic() + 5) == [leak]


def test_a_restart_before_a_flush_rewrote_the_journal_stores_nothing_it_stored_again(
    backing: PoolStore, journal: Path
) -> None:
    """Changes pending in two blocks. The flush stores the first; while it writes the second,
    pod 2 is gone, the reconciler frees its address x, and the node gives x to pod 3; then the
    agent dies, before the flush rewrote the journal. The next agent must not store pod 2's
    give of x again (the journal still held it): x is pod 3's, and freeing pod 2's leak again
    would give it a second time. (Found by review: x ended up answered to pods 3 and 4.)"""
    clashes: list[int] = []
    pending = PendingWrites(journal, "node-a", on_clash=lambda: clashes.append(1))
    node = DeferringStore(backing, pending)
    add_in_halves(node, 1, "10.7.2.10")  # takes the slice: stored
    add_in_halves(node, 9, "10.7.3.10")  # creates the second block: stored
    x = add_in_halves(node, 2, "10.7.2.11")  # kept, in the block flushed first
    add_in_halves(node, 8, "10.7.3.11")  # kept, in the second
    assert pending.pending_count() == 2
    second = BlockKey.of(POOL, int(netaddr.IPAddress("10.7.3.0")))

    class DyingWhileItWritesTheSecond(Interposed):
        def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
            if blocks[0].key == second:
                reconciler_frees(backing, x, 2)
                node.read_blocks(POOL, x, x)
                assert add_in_halves(node, 3, "10.7.2.11") == x  # kept, answered to pod 3
                raise Crashed
            return self.inner.write_blocks(blocks)

    with pytest.raises(Crashed):
        pending.flush(DyingWhileItWritesTheSecond(backing))
    pending.close()
    restarted = PendingWrites(journal, "node-a", on_clash=lambda: clashes.append(1))
    assert restarted.pending_count() == 2  # pod 3's give of x, and pod 8's: not pod 2's
    restarted.flush(backing)
    assert stored(backing)[x] == "c3" and clashes == []


def test_a_write_sent_before_the_agent_started_never_lands_under_a_change_it_kept(
    backing: PoolStore, journal: Path
) -> None:
    """A plugin served in-process while no agent ran (or the agent that crashed) decided x
    for pod 2 on block K, and its write is still on its way when the agent starts and reads K.
    The agent's first write of K is stored before its answer, so that write can no longer
    land; it is refused, and x stays pod 3's. (Found by review: the old write landed after the
    agent had kept x for pod 3, which the datastore then named pod 2's.)"""
    clashes: list[int] = []
    pending = PendingWrites(journal, "node-a", on_clash=lambda: clashes.append(1))
    first = add(DeferringStore(backing, pending), 1)  # the slice and block K stored
    pending.close()  # the agent stops; a plugin serves in-process
    key = BlockKey.of(POOL, first)
    late = backing.read_blocks(POOL, key.base, key.base)[0]  # that plugin's read
    x = key.base + 77
    late.put(x, owner(2))  # its decision for pod 2; its write is on its way
    pending = PendingWrites(journal, "node-a", on_clash=lambda: clashes.append(1))
    assert add(DeferringStore(backing, pending), 3, requested=x) == x
    assert pending.pending_count() == 0  # stored before its answer: the agent's first of K
    assert backing.write_blocks([late]).conflicts == [key]  # the old write lands too late
    assert stored(backing)[x] == "c3" and clashes == []
