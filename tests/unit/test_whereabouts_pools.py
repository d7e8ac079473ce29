"""Reading whereabouts' IPPools and NodeSlicePools as whereabouts v0.9.4 writes them: names
made of network_name, node and range; allocations keyed by offset."""

from typing import Any

import netaddr
import pytest

from pyabouts.controller import whereabouts_pools
from pyabouts.controller.migrate import store_holdings
from pyabouts.controller.whereabouts_pools import (
    NodeSlicePool,
    WhereaboutsPool,
    WhereaboutsPoolError,
    holdings_of,
    normalize_range,
    pool_identity,
)
from pyabouts.ipam.errors import CniError, StoreRefusedError
from pyabouts.ipam.pool import Owner, PoolId
from pyabouts.ipam.slices import SLICE_IFNAME
from tests.memory_store import BlockByBlockStore

WEB = {"id": "c0ffee", "podref": "default/web-0", "ifname": "net1"}


def pool(
    name: str, rng: str, allocations: dict[str, dict[str, str]] | None = None
) -> WhereaboutsPool:
    return WhereaboutsPool("kube-system", name, rng, allocations or {})


def slices(name: str, holders: dict[str, str], rng: str = "10.9.0.0/24") -> NodeSlicePool:
    return NodeSlicePool("kube-system", name, rng, "/26", holders)


def test_a_range_is_written_into_names_as_whereabouts_does() -> None:
    assert normalize_range("10.1.0.0/24") == "10.1.0.0-24"
    assert normalize_range("fd00:1::/64") == "fd00-1---64"


def test_plain_pools_name_their_network_before_the_range() -> None:
    assert pool_identity(pool("10.1.0.0-24", "10.1.0.0/24"), []) == ("", "", None)
    assert pool_identity(pool("blue-net-10.1.0.0-24", "10.1.0.0/24"), []) == ("blue-net", "", None)
    with pytest.raises(ValueError, match="does not end in its range"):
        pool_identity(pool("blue-10.2.0.0-24", "10.1.0.0/24"), [])


def test_offsets_count_from_the_range_and_owners_keep_pod_interface_and_container() -> None:
    read = holdings_of([pool("blue-10.1.0.0-24", "10.1.0.0/24", {"5": WEB})], [])
    (holding,) = read.holdings
    assert holding.pool == PoolId("blue", 4)
    assert holding.text == "10.1.0.5"
    assert holding.owner == Owner(container_id="c0ffee", ifname="net1", pod="default/web-0")
    assert holding.source == "IPPool kube-system/blue-10.1.0.0-24"


@pytest.mark.parametrize("podref", ["/", "", "default/", "/web-0"])
def test_a_podref_that_names_no_pod_is_brought_over_as_no_pod(podref: str) -> None:
    # whereabouts wrote "/" for a call without K8S_POD_*: a container outside Kubernetes,
    # which must not be taken for a pod that is gone (by pyabouts-migrate or the reconciler).
    allocation = {**WEB, "podref": podref}
    read = holdings_of([pool("blue-10.1.0.0-24", "10.1.0.0/24", {"5": allocation})], [])
    (holding,) = read.holdings
    assert holding.owner == Owner(container_id="c0ffee", ifname="net1", pod="")


def test_ipv6_offsets_beyond_64_bits_are_read_whole() -> None:
    """whereabouts' own offsets stop at 64 bits; an offset is read as the number it is."""
    offset = str((1 << 64) + 7)
    read = holdings_of([pool("fd00-1---48", "fd00:1::/48", {offset: WEB})], [])
    (holding,) = read.holdings
    assert holding.pool == PoolId("", 6)
    assert netaddr.IPAddress(holding.text) == netaddr.IPAddress("fd00:1:0:1::7")


def test_allocations_that_cannot_be_read_refuse_the_whole_read_naming_each() -> None:
    bad = [
        pool("a-10.1.0.0-24", "10.1.0.0/24", {"x": WEB}),
        pool("b-10.2.0.0-24", "10.2.0.0/24", {"300": WEB}),
        pool("no-range-here", "10.3.0.0/24", {"1": WEB}),
    ]
    with pytest.raises(WhereaboutsPoolError) as refused:
        holdings_of([*bad, pool("ok-10.4.0.0-24", "10.4.0.0/24", {"1": WEB})], [])
    problems = refused.value.problems
    assert len(problems) == 3
    assert "a-10.1.0.0-24" in problems[0] and "'x' is not an offset" in problems[0]
    assert "offset 300 is outside 10.2.0.0/24" in problems[1]
    assert "no-range-here" in problems[2]


def test_an_empty_pool_holds_nothing_so_its_name_does_not_matter() -> None:
    read = holdings_of([pool("whatever", "10.3.0.0/24")], [])
    assert read.holdings == [] and read.objects == 1


def test_node_slice_pools_name_network_and_node_and_carry_the_slices() -> None:
    node_slices = slices("red", {"10.9.0.64/26": "node-a-1", "10.9.0.0/26": "node-b"})
    pools = [
        pool("red-node-a-1-10.9.0.64-26", "10.9.0.64/26", {"1": WEB}),
        pool("red-node-b-10.9.0.0-26", "10.9.0.0/26"),
    ]
    read = holdings_of(pools, [node_slices])
    address, *slice_holdings = read.holdings
    assert (address.text, address.pool, address.owner.node) == (
        "10.9.0.65",
        PoolId("red", 4),
        "node-a-1",
    )
    assert address.range.text == "10.9.0.0/24"  # the whole range describes its block
    assert sorted((h.text, h.owner.node, h.address) for h in slice_holdings) == [
        ("10.9.0.0/26", "node-b", 0),
        ("10.9.0.64/26", "node-a-1", 1),
    ]
    for holding in slice_holdings:
        assert holding.owner.ifname == SLICE_IFNAME
        assert holding.pool.network == "red#node-slices 10.9.0.0/24 /26"
        assert holding.source == "NodeSlicePool kube-system/red"


def test_without_a_network_name_a_slice_pool_is_named_by_its_node() -> None:
    """The NodeSlicePool is then named after the NAD's config name, and says nothing."""
    node_slices = slices("my-nad", {"10.9.0.128/26": "node-c"})
    read = holdings_of([pool("node-c-10.9.0.128-26", "10.9.0.128/26", {"2": WEB})], [node_slices])
    address, held_slice = read.holdings
    assert address.pool == PoolId("", 4) and address.owner.node == "node-c"
    assert held_slice.pool.network == "#node-slices 10.9.0.0/24 /26"


def test_a_gone_nodes_slice_pool_reads_by_its_network_or_refuses_when_ambiguous() -> None:
    """A deleted node no longer holds its slice, and its pods are gone: a named network still
    reads; without one, "<node>-<slice>" could as well be the plain pool of a network named
    like the node."""
    node_slices = slices("red", {})
    named = pool("red-gone-10.9.0.64-26", "10.9.0.64/26", {"1": WEB})
    assert pool_identity(named, [node_slices], {}) == ("red", "gone", node_slices)
    unnamed = pool("gone-10.9.0.64-26", "10.9.0.64/26", {"1": WEB})
    with pytest.raises(WhereaboutsPoolError, match="which no node holds now"):
        holdings_of([unnamed], [node_slices])
    # Its pods all gone, it holds nothing to bring over whichever way it reads: a note, and the
    # other pools still come over.
    other = pool("blue-10.1.0.0-24", "10.1.0.0/24", {"5": {**WEB, "podref": "default/web-1"}})
    read = holdings_of([unnamed, other], [node_slices], {"default/web-1": "node-x"})
    assert [h.text for h in read.holdings] == ["10.1.0.5"]
    note, _ = read.notes  # and red's NodeSlicePool, which no IPPool then names
    assert note.startswith("IPPool kube-system/gone-10.9.0.64-26: not brought over (")
    assert "no longer exists" in note


def test_a_node_slice_pool_whose_network_no_ippool_names_is_left_out_with_a_note() -> None:
    read = holdings_of([], [slices("red", {"10.9.0.0/26": "node-a"})])
    assert read.holdings == []
    (note,) = read.notes
    assert "NodeSlicePool kube-system/red" in note and "afresh" in note


def test_a_plain_pool_whose_range_is_not_a_slice_stays_plain() -> None:
    other = slices("red", {"10.9.0.0/26": "node-a"})
    plain = pool("green-10.9.0.0-25", "10.9.0.0/25", {"1": WEB})
    assert pool_identity(plain, [other]) == ("green", "", None)


@pytest.mark.parametrize(
    ("where", "network"), [({"default/web-0": "node-x"}, "red-b"), ({"default/web-0": "b"}, "red")]
)
def test_a_pool_that_may_be_an_unheld_slices_is_read_by_where_its_pods_run(
    where: dict[str, str], network: str
) -> None:
    # Network red cut into /26 slices, the one of 10.9.0.128 held by nobody; "red-b-<slice>"
    # is node b's pool of it, or the plain pool of a network "red-b" on 10.9.0.128/26. Read the
    # wrong way, the other network would give web-0's address.
    unheld = pool("red-b-10.9.0.128-26", "10.9.0.128/26", {"1": WEB})
    node_slices = slices("red", {"10.9.0.0/26": "node-a"})
    assert pool_identity(unheld, [node_slices], where)[0] == network


@pytest.mark.parametrize(
    ("holders", "size", "name"),
    [
        ({"10.9.0.64/26": "node-b"}, "/26", "red-node-a"),
        ({"10.9.0.64/27": "node-b"}, "/27", "red-node-a"),
        ({"10.9.0.64/26": "node-b"}, "/26", "node-a"),  # the NodeSlicePool of a NAD without one
    ],
)
def test_a_slice_pool_whose_slice_changed_hands_or_size_is_read_by_where_its_pods_run(
    holders: dict[str, str], size: str, name: str
) -> None:
    # node-a's pool of an earlier slice, a pod still in it: the slice went to node-b since, or
    # the slices were cut to /27. Read as a network of the name's alone, red would give it.
    node_slices = NodeSlicePool("kube-system", "red", "10.9.0.0/24", size, holders)
    old = pool(f"{name}-10.9.0.64-26", "10.9.0.64/26", {"1": WEB})
    network = "red" if name.startswith("red-") else ""
    assert pool_identity(old, [node_slices], {"default/web-0": "node-a"}) == (
        network,
        "node-a",
        node_slices,
    )
    # Its pods elsewhere, or none alive: the plain pool of a network of that name.
    assert pool_identity(old, [node_slices], {"default/web-0": "node-c"}) == (name, "", None)
    assert pool_identity(old, [node_slices], {}) == (name, "", None)


def test_a_held_slices_pool_with_a_pod_made_again_on_another_node_stays_the_slices() -> None:
    # node-a's pool, one of whose pods (web-0) was made again on node-b, its DEL missed: read
    # as a network "red-node-a", node-a's running pods would come over into a pool no NAD uses,
    # and red's node-a slice would give their addresses again.
    node_slices = slices("red", {"10.9.0.64/26": "node-a", "10.9.0.128/26": "node-b"})
    web_1 = {**WEB, "podref": "default/web-1"}
    held = pool("red-node-a-10.9.0.64-26", "10.9.0.64/26", {"1": WEB, "2": web_1})
    now = pool("red-node-b-10.9.0.128-26", "10.9.0.128/26", {"7": WEB})  # web-0 now
    where = {"default/web-0": "node-b", "default/web-1": "node-a"}
    read = holdings_of([held, now], [node_slices], where)
    results = store_holdings(BlockByBlockStore(), read.holdings, dry_run=True, live_pods=where)
    assert [(h.text, h.owner.pod, r.value) for h, r in results if h.sliced is None] == [
        ("10.9.0.65", "default/web-0", "pod-elsewhere"),
        ("10.9.0.66", "default/web-1", "added"),
        ("10.9.0.135", "default/web-0", "added"),
    ]
    # Without web-0 in its own node's slice, pods on two nodes tell nothing: a plain network
    # "red-node-a" on that range is as likely.
    assert pool_identity(held, [node_slices], where) == ("red-node-a", "", None)


def test_a_plain_pool_whose_pods_run_on_many_nodes_is_plain_though_one_holds_the_slice() -> None:
    # A whole-range network "red-a" on the CIDR of red's slice of node a, one of its pods on a.
    node_slices = slices("red", {"10.9.0.64/26": "a", "10.9.0.128/26": "b"})
    pods = {str(i): {**WEB, "podref": f"default/p{i}"} for i in range(1, 4)}
    plain = pool("red-a-10.9.0.64-26", "10.9.0.64/26", pods)
    where = {"default/p1": "a", "default/p2": "b", "default/p3": "c"}
    read = holdings_of([plain], [node_slices], where)
    assert {(h.pool.network, h.owner.node) for h in read.holdings if h.sliced is None} == {
        ("red-a", "")
    }


def test_a_plain_pool_named_as_a_held_slices_pool_is_plain_when_its_pods_run_elsewhere() -> None:
    node_slices = slices("red", {"10.9.0.64/26": "a"})
    named = pool("red-a-10.9.0.64-26", "10.9.0.64/26", {"1": WEB})
    assert pool_identity(named, [node_slices], {"default/web-0": "a"})[:2] == ("red", "a")
    assert pool_identity(named, [node_slices], {"default/web-0": "b"})[:2] == ("red-a", "")
    assert pool_identity(named, [node_slices], {})[:2] == ("red", "a")  # no pod to go by


def test_the_migration_stores_node_slices_before_the_addresses_in_them() -> None:
    # On IPPools a write goes block by block: an address stored before its node's slice could
    # stand in a slice another node takes meanwhile.
    read = holdings_of(
        [pool("red-node-a-10.9.0.64-26", "10.9.0.64/26", {"1": WEB})],
        [slices("red", {"10.9.0.64/26": "node-a"})],
    )
    store = BlockByBlockStore()
    store_holdings(store, read.holdings, dry_run=False)
    assert [p.network for p in store.stored[0]] == ["red#node-slices 10.9.0.0/24 /26", "red"]


def test_objects_not_in_whereabouts_format_are_named_never_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listed: dict[str, list[dict[str, Any]]] = {
        "ippools": [
            {"metadata": {"namespace": "kube-system", "name": "10.9.0.0-24"}, "spec": "garbage"},
        ],
        "nodeslicepools": [
            {
                "metadata": {"namespace": "kube-system", "name": "blue"},
                "spec": {"range": "10.9.0.0/24", "sliceSize": "/26"},
                "status": {"allocations": [{"nodeName": "n1", "sliceRange": "not-a-cidr"}]},
            }
        ],
    }
    monkeypatch.setattr(whereabouts_pools, "_list", lambda api, plural: iter(listed[plural]))
    with pytest.raises(WhereaboutsPoolError) as refused:
        whereabouts_pools.read_whereabouts(None)  # type: ignore[arg-type]
    assert [p.split(":")[0] for p in refused.value.problems] == [
        "IPPool kube-system/10.9.0.0-24",
        "NodeSlicePool kube-system/blue",
    ]
    # Read, but an allocation that is no object, or a range that gives nothing (whereabouts
    # never gave from one), is a problem named by its pool.
    odd = pool("10.9.0.0-24", "10.9.0.0/24", {"1": "c0ffee"})  # type: ignore[dict-item]
    single = pool("10.9.0.7-32", "10.9.0.7/32", {"0": WEB})
    with pytest.raises(WhereaboutsPoolError) as refused:
        holdings_of([odd, single], [])
    assert len(refused.value.problems) == 2
    assert "has no usable address" in refused.value.problems[1]


class RefusingStore(BlockByBlockStore):
    """Its writes are refused (permissions, say): a run may have written part before."""

    def write_blocks(self, blocks: Any) -> Any:
        raise StoreRefusedError("the store refused the write")


def test_a_run_that_fails_to_write_says_part_may_be_written() -> None:
    read = holdings_of([pool("blue-10.1.0.0-24", "10.1.0.0/24", {"5": WEB})], [])
    with pytest.raises(CniError) as failed:
        store_holdings(RefusingStore(), read.holdings, dry_run=False)
    assert failed.value.msg.startswith("the store refused the write (after a write of this run")
    # A dry run writes nothing, and reads as well as ever.
    assert store_holdings(RefusingStore(), read.holdings, dry_run=True)
