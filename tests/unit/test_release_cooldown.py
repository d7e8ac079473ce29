"""release_cooldown: a released address rests, kept from every other pod until its cooldown
ends, while the pod interface that had it takes it straight back; every way of releasing
(DEL, GC, the reconciler) leaves it resting, and the config key is checked."""

import dataclasses
import time

import netaddr
import pytest

from pyabouts.controller.leaks import Leak, Policy, Reason, judge
from pyabouts.controller.reclaim import free_leaks
from pyabouts.ipam import allocator
from pyabouts.ipam.config import load_config
from pyabouts.ipam.errors import CniError, RangeExhaustedError, RequestedAddressUnavailableError
from pyabouts.ipam.pool import Owner, PoolId, PoolView
from pyabouts.ipam.ranges import build_range
from pyabouts.ipam.slices import SlicedRange, node_range
from tests.memory_store import MemoryStore

POOL = PoolId("rest", 4)
SMALL = build_range("10.5.0.0/29", range_start=None, range_end=None, exclude=[], pool=POOL)
T0 = 1_800_000_000  # "now", in Unix seconds
COOLDOWN = 30


def owner(n: int, container: str = "") -> Owner:
    return Owner(
        container_id=container or f"c{n}",
        ifname="net1",
        pod=f"default/pod-{n}",
        node="node-a",
        cni_network="net",
        cooldown=COOLDOWN,
    )


def full_range() -> tuple[PoolView, dict[int, int]]:
    """SMALL's six addresses given to pods 0-5: pod -> address."""
    view = PoolView([])
    given = {n: allocator.assign_address(view, SMALL, owner(n), [], now=T0) for n in range(6)}
    return view, given


def release(view: PoolView, n: int, now: int = T0) -> list[int]:
    return allocator.release_addresses(view, [SMALL], f"c{n}", "net1", now=now)


def rests_until(view: PoolView, address: int) -> int:
    entry = view.owner(POOL, address)
    assert entry is not None
    return entry.cooling_until


def test_a_released_address_rests_until_its_cooldown_ends() -> None:
    view, given = full_range()
    assert release(view, 2) == [given[2]]
    resting = view.owner(POOL, given[2])
    assert resting is not None and resting.cooling_until == T0 + COOLDOWN
    assert resting.container_id == ""  # held by no sandbox: DEL and CHECK do not find it
    assert allocator.find_addresses(view, [SMALL], "c2", "net1") == [[]]
    with pytest.raises(RangeExhaustedError, match="1 of them rest after their release"):
        allocator.assign_address(view, SMALL, owner(9), [], now=T0 + COOLDOWN - 1)
    assert allocator.count_free(view, SMALL, now=T0 + COOLDOWN - 1) == 0
    assert allocator.count_free(view, SMALL, now=T0 + COOLDOWN) == 1
    assert allocator.assign_address(view, SMALL, owner(9), [], now=T0 + COOLDOWN) == given[2]


def test_the_pod_interface_that_had_it_takes_it_back_at_once() -> None:
    """A pod re-created under the same name (a StatefulSet's): ADD is idempotent on the pod."""
    view, given = full_range()
    release(view, 4)
    again = dataclasses.replace(owner(4, container="c4-new"), pod_uid="new-uid")
    assert allocator.assign_address(view, SMALL, again, [], now=T0 + 1) == given[4]
    assert view.owner(POOL, given[4]) == again


def test_addresses_never_used_go_first_and_rested_ones_only_when_none_is_left() -> None:
    view = PoolView([])
    wide = build_range("10.5.1.0/24", range_start=None, range_end=None, exclude=[], pool=POOL)
    first = allocator.assign_address(view, wide, owner(0), [], now=T0)
    allocator.release_addresses(view, [wide], "c0", "net1", now=T0)
    later = T0 + COOLDOWN + 1
    assert allocator.assign_address(view, wide, owner(1), [], now=later) == first + 1


def test_a_requested_address_waits_for_its_rest_too() -> None:
    view, given = full_range()
    release(view, 1)
    wanted = [netaddr.IPAddress(given[1], 4)]
    with pytest.raises(RequestedAddressUnavailableError, match="rests until"):
        allocator.assign_address(view, SMALL, owner(7), wanted, now=T0 + 5)
    assert allocator.assign_address(view, SMALL, owner(7), wanted, now=T0 + COOLDOWN) == given[1]


def test_without_a_cooldown_release_frees_at_once() -> None:
    view = PoolView([])
    plain = dataclasses.replace(owner(0), cooldown=0)
    address = allocator.assign_address(view, SMALL, plain, [], now=T0)
    release(view, 0)
    assert view.owner(POOL, address) is None


def test_gc_rests_what_it_frees_and_never_frees_a_resting_address_again() -> None:
    view, given = full_range()
    release(view, 0)
    freed = allocator.collect_garbage(
        view, [SMALL], {("c1", "net1")}, node="node-a", cni_network="net", now=T0 + 10
    )
    assert freed == sorted(a for n, a in given.items() if n >= 2)
    assert all(rests_until(view, given[n]) == T0 + 10 + COOLDOWN for n in range(2, 6))
    assert rests_until(view, given[0]) == T0 + COOLDOWN  # its first rest, not restarted


def test_the_reconciler_leaves_a_resting_address_alone() -> None:
    view, given = full_range()
    release(view, 3)
    resting = view.owner(POOL, given[3])
    assert resting is not None
    policy = Policy(free_finished=True, pending_grace=300)
    assert judge(resting, "10.5.0.4", None, now=T0, policy=policy) is None


@pytest.mark.parametrize("value", [-1, 86401, "soon"])
def test_the_config_key_is_checked(value: object) -> None:
    conf = {
        "cniVersion": "1.0.0",
        "name": "net",
        "type": "macvlan",
        "ipam": {"type": "pyabouts", "range": "10.5.0.0/24", "release_cooldown": value},
    }
    with pytest.raises(CniError, match="release_cooldown"):
        load_config(conf)


def test_a_leak_the_reconciler_frees_rests_too() -> None:
    """It reads no NAD: the entry carries the cooldown its config had."""
    store = MemoryStore()
    view, given = full_range()
    store.write_blocks(view.changed_blocks())
    (block,) = store.read_blocks(POOL, SMALL.first, SMALL.last)
    leak = Leak(block.key, given[5], block.entries[given[5]], Reason.POD_GONE)
    before = int(time.time())
    assert free_leaks(store, [leak], deadline=time.monotonic() + 10) == [leak]
    (block,) = store.read_blocks(POOL, SMALL.first, SMALL.last)
    resting = block.entries[given[5]]
    assert resting.cooling and resting.container_id == ""
    assert before + COOLDOWN <= resting.cooling_until <= int(time.time()) + COOLDOWN


def test_only_the_rest_an_add_needs_is_ended() -> None:
    """Ending every ended rest of a range at once would rewrite every block holding one."""
    view, given = full_range()
    release(view, 1)
    release(view, 3)
    later = T0 + COOLDOWN
    assert allocator.assign_address(view, SMALL, owner(8), [], now=later) == given[1]
    still = view.owner(POOL, given[3])
    assert still is not None and still.cooling  # left as it was


def test_a_pod_moving_to_a_requested_address_leaves_its_old_one_resting() -> None:
    view, given = full_range()
    release(view, 0)
    allocator.release_addresses(view, [SMALL], "c5", "net1", now=T0)  # frees given[5]
    moved = allocator.assign_address(
        view, SMALL, owner(0, "c0-new"), [netaddr.IPAddress(given[5], 4)], now=T0 + COOLDOWN
    )
    assert moved == given[5]
    assert rests_until(view, given[0]) == T0 + COOLDOWN  # not dropped, not restarted


def test_a_pod_that_moves_to_another_nodes_slice_leaves_its_old_address_resting() -> None:
    sliced = SlicedRange(SMALL, 30)
    view = PoolView([])
    on_a = dataclasses.replace(owner(0), node="node-a")
    first = allocator.assign_address(view, node_range(view, sliced, on_a, now=T0), on_a, [])
    allocator.release_addresses(view, [SMALL], "c0", "net1", now=T0)
    on_b = dataclasses.replace(owner(0, "c0-b"), node="node-b")
    mine = node_range(view, sliced, on_b, now=T0 + 1)
    assert not mine.contains(first)
    assert rests_until(view, first) == T0 + COOLDOWN  # node-a's next pod does not get it yet


def test_the_reconciler_clears_rests_that_have_ended_and_only_those() -> None:
    view, given = full_range()
    release(view, 2)
    resting = view.owner(POOL, given[2])
    assert resting is not None
    policy = Policy(free_finished=True, pending_grace=300)
    assert judge(resting, "ip", None, now=T0 + COOLDOWN - 1, policy=policy) is None
    assert judge(resting, "ip", None, now=T0 + COOLDOWN, policy=policy) is Reason.REST_ENDED
