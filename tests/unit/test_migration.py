"""Bringing holdings over: stored as held, present when already there, all-or-nothing on
conflicts; and what pyabouts' ADD then does with them."""

from dataclasses import replace

import netaddr
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyabouts.ipam import allocator
from pyabouts.ipam.migration import Holding, MigrationConflictError, Result, bring_over
from pyabouts.ipam.pool import Owner, PoolId, PoolView
from pyabouts.ipam.ranges import AddressRange, build_range
from pyabouts.ipam.slices import SlicedRange, slice_holder, take_slice

POOL = PoolId("blue", 4)
RANGE = build_range("10.1.0.0/24", range_start=None, range_end=None, exclude=[], pool=POOL)
BASE = int(netaddr.IPAddress("10.1.0.0"))


def holding(offset: int, pod: str, container: str = "", source: str = "IPPool w") -> Holding:
    owner = Owner(container_id=container or f"c-{pod}", ifname="net1", pod=f"default/{pod}")
    return Holding(POOL, BASE + offset, owner, RANGE, source)


def slice_holding(sliced: SlicedRange, index: int, node: str) -> Holding:
    registry = sliced.registry_range()
    return Holding(
        registry.pool, index, slice_holder(sliced, index, node), registry, "NodeSlicePool w", sliced
    )


def test_holdings_are_stored_as_held() -> None:
    view = PoolView([])
    results = bring_over(view, [holding(1, "a"), holding(2, "b")], dry_run=False)
    assert [r for _, r in results] == [Result.ADDED, Result.ADDED]
    assert view.owner(POOL, BASE + 2) == holding(2, "b").owner


def test_a_dry_run_decides_the_same_and_changes_nothing() -> None:
    view = PoolView([])
    results = bring_over(view, [holding(1, "a")], dry_run=True)
    assert [r for _, r in results] == [Result.ADDED]
    assert view.changed_blocks() == []


def test_what_pyabouts_stores_for_the_same_pod_interface_is_present_and_kept() -> None:
    """Its sandbox may have changed since, by an ADD pyabouts served: that entry is newer."""
    view = PoolView([])
    newer = Owner(container_id="c-new", ifname="net1", pod="default/a", pod_uid="u1")
    view.assign(POOL, BASE + 1, newer)
    results = bring_over(view, [holding(1, "a", container="c-old")], dry_run=False)
    assert [r for _, r in results] == [Result.PRESENT]
    assert view.owner(POOL, BASE + 1) == newer


def test_conflicts_change_nothing_and_are_all_named() -> None:
    view = PoolView([])
    view.assign(POOL, BASE + 1, Owner(container_id="x", ifname="net1", pod="default/other"))
    mark = view.savepoint()
    holdings = [
        holding(3, "ok"),
        holding(1, "a"),
        holding(4, "b"),
        holding(4, "c", source="IPPool v"),
    ]
    with pytest.raises(MigrationConflictError) as refused:
        bring_over(view, holdings, dry_run=False)
    conflicts = refused.value.conflicts
    assert [(c.holding.owner.pod, c.holder.pod, c.held_in) for c in conflicts] == [
        ("default/a", "default/other", "pyabouts"),
        ("default/c", "default/b", "IPPool w"),
    ]
    assert view.savepoint() == mark  # nothing assigned, not even the holding without conflict
    assert view.owner(POOL, BASE + 3) is None


def test_a_gone_pods_holding_is_left_out_even_where_pyabouts_gave_its_address_again() -> None:
    view = PoolView([])
    view.assign(POOL, BASE + 1, Owner(container_id="x", ifname="net1", pod="default/new"))
    holdings = [holding(1, "gone"), holding(2, "alive"), holding(3, "also-gone")]
    results = bring_over(view, holdings, dry_run=False, live_pods={"default/alive": "n1"})
    assert [(h.owner.pod, r) for h, r in results] == [
        ("default/gone", Result.POD_GONE),
        ("default/alive", Result.ADDED),
        ("default/also-gone", Result.POD_GONE),
    ]
    assert view.owner(POOL, BASE + 3) is None
    assert view.owner(POOL, BASE + 1) == Owner(container_id="x", ifname="net1", pod="default/new")


def test_a_holding_in_a_nodes_slice_for_a_pod_that_now_runs_elsewhere_is_left_out() -> None:
    """A StatefulSet's pod made again on another node, the DEL on its first node missed: the
    first node's slice still names it. Brought over, no reconciler would free it (the pod
    exists, and whereabouts kept no pod UID)."""
    view = PoolView([])
    moved, stays, plain = holding(1, "web-0"), holding(2, "web-1"), holding(3, "web-0")
    in_slice = [replace(h, owner=replace(h.owner, node="Node-A")) for h in (moved, stays)]
    live = {"default/web-0": "node-b", "default/web-1": "node-a"}
    results = bring_over(view, [*in_slice, plain], dry_run=False, live_pods=live)
    assert [r for _, r in results] == [Result.POD_ELSEWHERE, Result.ADDED, Result.ADDED]
    assert view.owner(POOL, BASE + 1) is None
    assert view.owner(POOL, BASE + 2) is not None  # node names compare case-blind
    assert view.owner(POOL, BASE + 3) is not None  # a whole range's pool names no node


def test_a_node_keeps_its_slice_and_one_holding_another_is_a_conflict() -> None:
    sliced = SlicedRange(RANGE, 26)
    view = PoolView([])
    assert [r for _, r in bring_over(view, [slice_holding(sliced, 2, "n1")], dry_run=False)] == [
        Result.ADDED
    ]
    assert take_slice(view, sliced, "n1") == 2  # the node's ADDs use the slice it had
    again = bring_over(view, [slice_holding(sliced, 2, "n1")], dry_run=False)
    assert [r for _, r in again] == [Result.PRESENT]
    with pytest.raises(MigrationConflictError) as refused:
        bring_over(view, [slice_holding(sliced, 3, "n1")], dry_run=False)
    (conflict,) = refused.value.conflicts
    assert conflict.holder.container_id == "10.1.0.128/26"


def assign(view: PoolView, rng: AddressRange, pod: str) -> int:
    owner = Owner(container_id=f"new-sandbox-{pod}", ifname="net1", pod=f"default/{pod}")
    return allocator.assign_address(view, rng, owner, [])


@given(
    held=st.dictionaries(st.integers(1, 254), st.sampled_from("abcdefgh"), max_size=40),
    newcomers=st.integers(1, 10),
)
def test_after_bringing_over_each_pod_keeps_its_address_and_new_pods_get_others(
    held: dict[int, str], newcomers: int
) -> None:
    # whereabouts gives one address per pod interface; keep the first of each pod.
    first: dict[str, int] = {}
    for offset, pod in sorted(held.items()):
        first.setdefault(pod, offset)
    view = PoolView([])
    bring_over(view, [holding(o, p) for p, o in first.items()], dry_run=False)
    for pod, offset in first.items():
        assert assign(view, RANGE, pod) == BASE + offset
    taken = {BASE + o for o in first.values()}
    for i in range(newcomers):
        address = assign(view, RANGE, f"new-{i}")
        assert address not in taken
        taken.add(address)


def test_a_rest_or_the_pods_own_reservation_gives_way_to_a_live_holding() -> None:
    """whereabouts says the pod uses it: pyabouts' entry must say so too, or the address would
    be given again once the rest ends."""
    view = PoolView([])
    resting = Owner(container_id="", ifname="net1", pod="default/a", cooling_until=10)
    view.assign(POOL, BASE + 1, resting)
    reserved = Owner(container_id="", ifname="net1", pod="default/b", reserved=True)
    view.assign(POOL, BASE + 2, reserved)
    results = bring_over(view, [holding(1, "a"), holding(2, "b")], dry_run=False)
    assert [r for _, r in results] == [Result.ADDED, Result.ADDED]
    assert view.owner(POOL, BASE + 1) == holding(1, "a").owner
    assert view.owner(POOL, BASE + 2) == holding(2, "b").owner


def test_a_reservation_for_another_pod_is_a_conflict() -> None:
    view = PoolView([])
    view.assign(POOL, BASE + 1, Owner("", "net1", "default/db-0", reserved=True))
    with pytest.raises(MigrationConflictError):
        bring_over(view, [holding(1, "a")], dry_run=False)
