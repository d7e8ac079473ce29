"""sticky_statefulsets: a DEL keeps a sticky address reserved for its pod's name, which the
same name takes back and nobody else gets; the reconciler keeps it while a StatefulSet covers
the name and frees it once none does."""

import dataclasses

import netaddr
import pytest

from pyabouts.controller.leaks import PodState, Policy, Reason, in_statefulset, judge
from pyabouts.ipam import allocator
from pyabouts.ipam.errors import RequestedAddressUnavailableError
from pyabouts.ipam.pool import Owner, PoolId, PoolView
from pyabouts.ipam.ranges import build_range

POOL = PoolId("sticky", 4)
RANGE = build_range("10.6.0.0/24", range_start=None, range_end=None, exclude=[], pool=POOL)
POLICY = Policy(free_finished=True, pending_grace=300)
SETS = {"db/web": range(0, 3)}


def pod(name: str, container: str = "") -> Owner:
    return Owner(
        container_id=container or f"c-{name}",
        ifname="net1",
        pod=f"db/{name}",
        node="node-a",
        cni_network="net",
        sticky=True,
    )


def test_a_del_reserves_the_address_for_the_pods_name_only() -> None:
    view = PoolView([])
    first = allocator.assign_address(view, RANGE, pod("web-0"), [])
    assert allocator.release_addresses(view, [RANGE], "c-web-0", "net1") == [first]
    reserved = view.owner(POOL, first)
    assert reserved is not None and reserved.reserved and reserved.container_id == ""
    assert allocator.release_addresses(view, [RANGE], "c-web-0", "net1") == []  # done already
    # Nobody else: not the next pod, not a request for it.
    assert allocator.assign_address(view, RANGE, pod("other"), []) == first + 1
    wanted = [netaddr.IPAddress(first, 4)]
    with pytest.raises(RequestedAddressUnavailableError, match="reserved for the StatefulSet"):
        allocator.assign_address(view, RANGE, pod("another"), wanted)
    # The pod of that name, re-created (another sandbox and UID), takes it back.
    again = dataclasses.replace(pod("web-0", container="c-new"), pod_uid="uid-2")
    assert allocator.assign_address(view, RANGE, again, []) == first
    assert view.owner(POOL, first) == again


def test_gc_reserves_too_and_an_address_given_without_sticky_is_freed() -> None:
    view = PoolView([])
    sticky = allocator.assign_address(view, RANGE, pod("web-1"), [])
    plain = allocator.assign_address(view, RANGE, dataclasses.replace(pod("x"), sticky=False), [])
    allocator.collect_garbage(view, [RANGE], set(), node="node-a", cni_network="net")
    held = view.owner(POOL, sticky)
    assert held is not None and held.reserved
    assert view.owner(POOL, plain) is None


@pytest.mark.parametrize(
    ("name", "covered"),
    [("db/web-0", True), ("db/web-2", True), ("db/web-3", False), ("db/web", False),
     ("db/webx-1", False), ("other/web-1", False), ("db/web-01", False), ("db/web-\u00b2", False)],
)  # fmt: skip
def test_a_name_is_a_statefulsets_while_its_ordinal_is_among_the_replicas(
    name: str, covered: bool
) -> None:
    assert in_statefulset(name, SETS) is covered
    assert in_statefulset("db/web-5", {"db/web": range(4, 6)})  # spec.ordinals.start: 4


def test_the_reconciler_keeps_what_a_statefulset_covers_and_frees_the_rest() -> None:
    reserved = dataclasses.replace(pod("web-1", container=""), reserved=True)
    gone = None
    assert judge(reserved, "ip", gone, now=0, policy=POLICY, statefulsets=SETS) is None
    scaled = {"db/web": range(0, 1)}
    assert (
        judge(reserved, "ip", gone, now=0, policy=POLICY, statefulsets=scaled)
        is Reason.NOT_IN_STATEFULSET
    )
    assert judge(reserved, "ip", gone, now=0, policy=POLICY, statefulsets={}) is (
        Reason.NOT_IN_STATEFULSET
    )
    # Force-deleted without a DEL, still covered: kept; no longer covered: an ordinary leak.
    assert judge(pod("web-2"), "ip", gone, now=0, policy=POLICY, statefulsets=SETS) is None
    assert judge(pod("web-2"), "ip", gone, now=0, policy=POLICY, statefulsets=scaled) is (
        Reason.POD_GONE
    )
    # StatefulSets that could not be listed keep every sticky address, for now.
    assert judge(reserved, "ip", gone, now=0, policy=POLICY) is None
    assert judge(pod("web-2"), "ip", gone, now=0, policy=POLICY) is None


def state(
    phase: str, uid: str = "uid-1", *, created: float = 0, deleting: bool = False
) -> PodState:
    return PodState("db", "job-1", uid, phase, created, 0.0 if deleting else None, False, None)


@pytest.mark.parametrize(
    ("listed", "kept"),
    [
        (state("Running"), True),  # the same pod: its sandbox comes back, and takes it
        (state("Succeeded"), False),  # finished: no sandbox comes back
        (state("Failed"), False),
        (state("Running", deleting=True), False),
        (state("Pending", uid="uid-2", created=100), True),  # re-created, setting up
        (state("Pending", uid="uid-2", created=100 - 301), False),  # past the grace
        (state("Running", uid="uid-2", created=100), False),  # re-created, up without it
    ],
)
def test_a_reservation_no_statefulset_covers_lasts_while_its_pod_may_take_it_back(
    listed: PodState, kept: bool
) -> None:
    reserved = dataclasses.replace(pod("job-1", container=""), reserved=True, pod_uid="uid-1")
    reason = judge(reserved, "ip", listed, now=100, policy=POLICY, statefulsets=SETS)
    assert (reason is None) is kept
    assert reason in (None, Reason.NOT_IN_STATEFULSET)


def test_an_address_without_a_pod_name_is_never_reserved() -> None:
    """Nothing could take it back, nor tell when to free it."""
    view = PoolView([])
    podless = dataclasses.replace(pod("x"), pod="")
    given = allocator.assign_address(view, RANGE, podless, [])
    allocator.release_addresses(view, [RANGE], "c-x", "net1")
    assert view.owner(POOL, given) is None


def test_the_reconcilers_release_ends_a_reservation_into_the_cooldown() -> None:
    view = PoolView([])
    given = allocator.assign_address(
        view, RANGE, dataclasses.replace(pod("web-0"), cooldown=30), []
    )
    allocator.release_addresses(view, [RANGE], "c-web-0", "net1", now=100)
    allocator.release(view, POOL, given, now=200)  # the reconciler: no StatefulSet needs it
    rest = view.owner(POOL, given)
    assert rest is not None and not rest.reserved and rest.cooling_until == 230
