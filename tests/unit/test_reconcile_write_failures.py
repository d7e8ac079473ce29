"""A pass whose writes fail for some blocks: a block the store refuses (an admission policy, a
permission) is named and the other blocks' leaks are freed; a store gone stops the freeing.
Either way the pass reports what it freed, and gives back no node slice meanwhile; a slice
refused is named too. And the CronJob's summary of a pass and its second look.
(tests/integration/test_reconciler_once.py refuses a block with a real admission policy.)"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import netaddr
import pytest

from pyabouts.controller.leaks import Leak, PodState, Policy, Reason
from pyabouts.controller.node_slices import FreedSlice
from pyabouts.controller.reconciler import PassSummary, reconcile
from pyabouts.ipam import allocator
from pyabouts.ipam.errors import CniError, StoreRefusedError, StoreUnavailableError
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId, PoolView
from pyabouts.ipam.ranges import build_range
from pyabouts.ipam.slices import SlicedRange, held_slice, parse_slice_size, take_slice
from pyabouts.ipam.store import WriteOutcome
from tests.memory_store import MemoryStore

POOL = PoolId("net", 4)
RANGE = build_range("10.0.0.0/22", range_start=None, range_end=None, exclude=[], pool=POOL)
CUT = SlicedRange(RANGE, parse_slice_size("/24", RANGE))


class FailingOn(MemoryStore):
    """Fails every write of the blocks in `failing` with `failure` (none until it is set)."""

    def __init__(self, failure: CniError) -> None:
        super().__init__()
        self.failing: set[BlockKey] = set()
        self.failure = failure

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        if any(b.key in self.failing for b in blocks):
            raise self.failure
        return super().write_blocks(blocks)


def leaked_in_three_blocks(store: MemoryStore) -> list[int]:
    """Pods of a gone node, one in each of three blocks: the addresses. The node holds the
    slice 10.0.1.0/24 (its name picks it), the second address's."""
    view = PoolView([])
    assert take_slice(view, CUT, "gone-node") == 1  # before its addresses are given
    addresses = []
    for n, block in enumerate(("10.0.0.0", "10.0.1.0", "10.0.2.0")):
        owner = Owner(f"c{n}", "net1", f"default/gone-{n}", node="gone-node")
        address = int(netaddr.IPAddress(block)) + 5
        allocator.assign_addresses(view, [RANGE], owner, [netaddr.IPAddress(address)])
        addresses.append(address)
    assert not store.write_blocks(view.changed_blocks()).conflicts
    return addresses


def no_pods() -> dict[str, PodState]:
    return {}


def test_a_block_refused_is_named_and_the_others_freed_and_no_slice_given_back() -> None:
    refused = StoreRefusedError("IPPool net-10.0.2.0-24: admission webhook denied the update")
    store = FailingOn(refused)
    addresses = leaked_in_three_blocks(store)
    store.failing = {BlockKey.of(POOL, 0x0A000200)}
    summary = reconcile(store, no_pods, Policy(), list_nodes=lambda: {"other-node"})
    assert sorted(leak.address for leak in summary.freed) == addresses[:2]
    assert summary.failed == [refused.msg]
    assert "1 not freed (changed meanwhile, or failed); 1 failure(s)" in summary.describe()
    after = PoolView(store.read_all_blocks())
    assert after.owner(POOL, addresses[2]) is not None
    # Its slice's addresses are free, but not every leak of the pass was freed.
    assert (held_slice(after, CUT, "gone-node"), summary.slices_freed) == (1, [])


def test_a_store_gone_ends_the_freeing_and_what_was_freed_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pyabouts.ipam.transaction.OUTAGE_GRACE", 0.2)  # then given up
    down = StoreUnavailableError("Kubernetes API: connection refused")
    store = FailingOn(down)
    addresses = leaked_in_three_blocks(store)
    store.failing = {BlockKey.of(POOL, 0x0A000100)}
    summary = reconcile(store, no_pods, Policy(), list_nodes=lambda: {"other-node"})
    # The blocks in order: the first freed, the second failed, the third not tried.
    assert [leak.address for leak in summary.freed] == [addresses[0]]
    assert summary.failed == [down.msg]
    after = PoolView(store.read_all_blocks())
    assert after.owner(POOL, addresses[2]) is not None


def test_with_every_leak_freed_the_gone_nodes_slice_is_given_back() -> None:
    store = MemoryStore()
    leaked_in_three_blocks(store)
    summary = reconcile(store, no_pods, Policy(), list_nodes=lambda: {"other-node"})
    assert (len(summary.freed), summary.failed, len(summary.slices_freed)) == (3, [], 1)


@pytest.mark.parametrize(
    "network",
    [
        "net#node-slices",
        "net#node-slices 10.0.0.0/22",
        "net#node-slices 10.0.0.0/22 24",
        "net#node-slices nonsense /24",
    ],
)
def test_a_slice_registry_whose_name_says_no_range_and_size_is_unreadable(network: str) -> None:
    from pyabouts.ipam.stores.codec import block_from_document  # noqa: PLC0415

    good = CUT.registry
    assert good.network == "net#node-slices 10.0.0.0/22 /24"
    document = {"allocations": {}, "range": "10.0.0.0/22 in /24 slices"}
    block_from_document(BlockKey(good, 0), document, "1")  # read
    with pytest.raises(CniError, match="names no range"):
        block_from_document(BlockKey(PoolId(network, 4), 0), document, "1")


def test_a_slice_give_back_refused_is_named_and_the_leaks_stay_freed() -> None:
    refused = StoreRefusedError("IPPool net-a1b2c3d4e5-0.0.0.0-24: denied")
    store = FailingOn(refused)
    addresses = leaked_in_three_blocks(store)
    store.failing = {BlockKey(CUT.registry, 0)}
    summary = reconcile(store, no_pods, Policy(), list_nodes=lambda: {"other-node"})
    assert sorted(leak.address for leak in summary.freed) == addresses
    assert (summary.slices_freed, summary.failed) == ([], [refused.msg])
    assert held_slice(PoolView(store.read_all_blocks()), CUT, "gone-node") == 1


def leak(n: int, reason: Reason = Reason.POD_GONE) -> Leak:
    owner = Owner(f"c{n}", "net1", f"default/p{n}")
    return Leak(BlockKey.of(POOL, 0x0A000000), 0x0A000000 + n, owner, reason)


def test_a_pass_followed_by_its_second_look_counts_what_both_freed() -> None:
    """The CronJob's summary: what the first pass checked, what both freed (the first's
    deferred leak freed by the second), and what the second left."""
    a, b, c, d = leak(1), leak(2, Reason.NOT_IN_STATEFULSET), leak(3), leak(4)
    gone = FreedSlice("net", "10.0.1.0/24", "gone-node")
    first = PassSummary(3, 5, leaks=[a, b], freed=[a, b], dry_run=False, seconds=0.5)
    first = dataclasses.replace(first, deferred=[c])
    second = PassSummary(1, 4, leaks=[c], freed=[c], dry_run=False, seconds=0.25)
    second = dataclasses.replace(second, deferred=[d], slices_freed=[gone], unreadable=["u"])
    both = first.followed_by(second)
    assert (both.allocations, both.pods, both.seconds) == (3, 5, 0.75)
    assert (both.leaks, both.freed, both.deferred) == ([a, b, c], [a, b, c], [d])
    assert (both.slices_freed, both.unreadable, both.failed) == ([gone], ["u"], [])
    assert both.describe() == (
        "checked 3 allocation(s) against 5 pod(s) in 0.75 s: freed 3 (1 not-in-statefulset, "
        "2 pod-gone); 0 changed meanwhile; node slices freed: 1; 1 unreadable block(s) left "
        "out; 1 left to judge again later"
    )
