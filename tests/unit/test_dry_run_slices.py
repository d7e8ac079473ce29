"""A reconciler dry run names the node slices a pass would give back: decided as the pass
decides, after the leaks it would free, on the snapshot, which it leaves as it was."""

import dataclasses

from pyabouts.controller.leaks import Leak, Reason
from pyabouts.controller.node_slices import slices_a_pass_would_free
from pyabouts.ipam import allocator
from pyabouts.ipam.pool import BlockKey, Owner, PoolId, PoolView
from pyabouts.ipam.ranges import build_range
from pyabouts.ipam.slices import SlicedRange, parse_slice_size, take_slice


def pod(n: int, node: str) -> Owner:
    return Owner(container_id=f"c{n}", ifname="net1", pod=f"default/pod-{n}", node=node)


def test_only_a_gone_nodes_slice_left_without_an_address_or_a_rest_would_go() -> None:
    rng = build_range(
        "10.0.0.0/24", range_start=None, range_end=None, exclude=[], pool=PoolId("net", 4)
    )
    cut = SlicedRange(rng, parse_slice_size("/26", rng))
    view = PoolView([])
    owners = {
        "gone-a": pod(1, "gone-a"),  # its pod is gone: the pass frees it, then the slice
        "gone-b": dataclasses.replace(pod(2, "gone-b"), cooldown=30),  # freed, but it rests
        "gone-c": pod(3, "gone-c"),  # its pod not deleted yet: no leak, the slice stays
        "alive": pod(4, "alive"),  # its node is there
    }
    given = {}
    for node, owner in owners.items():
        index = take_slice(view, cut, node)
        given[node] = allocator.assign_addresses(view, [cut.within(index)], owner, [])[0]
    snapshot = view.changed_blocks()
    leaks = [
        Leak(BlockKey.of(rng.pool, given[node]), given[node], owners[node], Reason.POD_GONE)
        for node in ("gone-a", "gone-b")
    ]

    would = slices_a_pass_would_free(snapshot, {"alive"}, leaks)

    gone_a_slice = str(cut.slice_network(take_slice(view, cut, "gone-a")))
    assert [(s.network, s.slice, s.node) for s in would] == [("net", gone_a_slice, "gone-a")]
    after = PoolView(snapshot)  # the snapshot still holds every address and slice
    assert all(after.owner(rng.pool, given[node]) == owner for node, owner in owners.items())
    assert len(list(after.entries(cut.registry, 0, 3))) == 4


def test_a_slice_its_node_took_under_its_host_name_s_capitals_stays() -> None:
    """An in-process call records the host name (Worker-1); the API lists the node as kubelet
    registers it (worker-1): the same node, whose slice stays."""
    rng = build_range(
        "10.0.0.0/24", range_start=None, range_end=None, exclude=[], pool=PoolId("net", 4)
    )
    cut = SlicedRange(rng, parse_slice_size("/26", rng))
    view = PoolView([])
    take_slice(view, cut, "Worker-1")
    assert slices_a_pass_would_free(view.changed_blocks(), {"worker-1"}, []) == []
    assert len(slices_a_pass_would_free(view.changed_blocks(), {"worker-2"}, [])) == 1
