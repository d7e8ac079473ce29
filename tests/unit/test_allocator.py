import re
import zlib
from collections import Counter

import netaddr
import pytest

from pyabouts.ipam import allocator
from pyabouts.ipam.errors import RangeExhaustedError, RequestedAddressUnavailableError
from pyabouts.ipam.pool import BLOCK_SIZE, Owner, PoolId, PoolView
from pyabouts.ipam.ranges import AddressRange, build_range, parse_address


def make(
    text: str,
    *,
    network: str = "",
    start: str | None = None,
    end: str | None = None,
    exclude: list[str] | None = None,
) -> AddressRange:
    pool = PoolId(network, 6 if ":" in text else 4)
    return build_range(text, range_start=start, range_end=end, exclude=exclude or [], pool=pool)


def ip(text: str) -> int:
    return int(netaddr.IPAddress(text))


def pod(
    n: int,
    ifname: str = "net1",
    container: str | None = None,
    *,
    node: str = "node-a",
    cni_network: str = "net",
) -> Owner:
    return Owner(
        container_id=container or f"c{n}",
        ifname=ifname,
        pod=f"default/pod-{n}",
        node=node,
        cni_network=cni_network,
    )


def assign(view: PoolView, rng: AddressRange, owner: Owner, *requested: str) -> int:
    wanted = [parse_address(r) for r in requested]
    return allocator.assign_addresses(view, [rng], owner, wanted)[0]


def test_gives_the_lowest_free_address_and_never_the_network_address() -> None:
    rng, view = make("10.0.0.0/24"), PoolView([])
    assert [assign(view, rng, pod(i)) for i in range(3)] == [
        ip("10.0.0.1"),
        ip("10.0.0.2"),
        ip("10.0.0.3"),
    ]
    allocator.release_addresses(view, [rng], "c1", "net1")
    assert assign(view, rng, pod(9)) == ip("10.0.0.2")


def test_respects_start_end_and_exclusions() -> None:
    rng = make("10.0.0.0/24", start="10.0.0.10", end="10.0.0.13", exclude=["10.0.0.11"])
    view = PoolView([])
    assert [assign(view, rng, pod(i)) for i in range(3)] == [
        ip("10.0.0.10"),
        ip("10.0.0.12"),
        ip("10.0.0.13"),
    ]
    with pytest.raises(RangeExhaustedError, match=r"10\.0\.0\.0/24"):
        assign(view, rng, pod(4))


def test_never_gives_the_broadcast_address() -> None:
    rng, view = make("10.0.0.0/30"), PoolView([])
    assert [assign(view, rng, pod(i)) for i in range(2)] == [ip("10.0.0.1"), ip("10.0.0.2")]
    with pytest.raises(RangeExhaustedError):
        assign(view, rng, pod(3))


def test_dot_zero_is_given_inside_a_larger_range() -> None:
    rng = make("10.0.0.0/23", start="10.0.0.255")
    view = PoolView([])
    assert assign(view, rng, pod(1)) == ip("10.0.0.255")
    assert assign(view, rng, pod(2)) == ip("10.0.1.0")


def test_full_blocks_are_crossed() -> None:
    rng, view = make("10.0.0.0/16"), PoolView([])
    for i in range(3 * BLOCK_SIZE):
        assign(view, rng, pod(i))
    assert assign(view, rng, pod(99999)) == ip("10.0.3.1")


def test_ipv6_upper_half_of_a_64() -> None:
    rng = make("2001:db8::/64", start="2001:db8::ffff:ffff:ffff:fff0")
    view = PoolView([])
    got = [assign(view, rng, pod(i)) for i in range(14)]
    assert got[0] == ip("2001:db8::ffff:ffff:ffff:fff0")
    assert got[-1] == ip("2001:db8::ffff:ffff:ffff:fffd")
    assert assign(view, rng, pod(14)) == ip("2001:db8::ffff:ffff:ffff:fffe")
    with pytest.raises(RangeExhaustedError):
        assign(view, rng, pod(15))


def test_add_is_idempotent_on_pod_and_interface_and_updates_the_container_id() -> None:
    rng, view = make("10.0.0.0/24"), PoolView([])
    first = assign(view, rng, pod(1, container="old"))
    assign(view, rng, pod(2))
    again = assign(view, rng, pod(1, container="new"))
    assert again == first
    assert view.owner(rng.pool, first) == pod(1, container="new")


def test_another_interface_of_the_same_pod_gets_another_address() -> None:
    rng, view = make("10.0.0.0/24"), PoolView([])
    assert assign(view, rng, pod(1, "net1")) != assign(view, rng, pod(1, "net2"))


def test_without_a_pod_add_is_idempotent_on_the_container() -> None:
    rng, view = make("10.0.0.0/24"), PoolView([])
    bare = Owner(container_id="c1", ifname="eth0")
    assert assign(view, rng, bare) == assign(view, rng, bare)
    assert assign(view, rng, Owner(container_id="c2", ifname="eth0")) == ip("10.0.0.2")


def test_a_late_delete_from_an_old_sandbox_keeps_the_new_sandboxs_address() -> None:
    rng, view = make("10.0.0.0/24"), PoolView([])
    address = assign(view, rng, pod(1, container="old"))
    assign(view, rng, pod(1, container="new"))
    assert allocator.release_addresses(view, [rng], "old", "net1") == []
    assert view.owner(rng.pool, address) == pod(1, container="new")
    assert allocator.release_addresses(view, [rng], "new", "net1") == [address]
    assert view.owner(rng.pool, address) is None


def test_releasing_what_is_not_held_changes_nothing() -> None:
    rng, view = make("10.0.0.0/24"), PoolView([])
    assert allocator.release_addresses(view, [rng], "ghost", "net1") == []
    assert view.changed_blocks() == []


def test_ip_ranges_give_one_address_per_range_in_order_dual_stack() -> None:
    v4, v6 = make("10.0.0.0/24"), make("2001:db8::/64")
    view = PoolView([])
    got = allocator.assign_addresses(view, [v4, v6], pod(1), [])
    assert got == [ip("10.0.0.1"), ip("2001:db8::1")]
    assert allocator.assign_addresses(view, [v4, v6], pod(1), []) == got


def test_overlapping_ranges_of_one_network_never_give_an_address_twice() -> None:
    wide, narrow = make("10.0.0.0/24"), make("10.0.0.0/28")
    view = PoolView([])
    from_wide = {assign(view, wide, pod(i)) for i in range(5)}
    from_narrow = {assign(view, narrow, pod(100 + i)) for i in range(5)}
    assert not from_wide & from_narrow
    assert from_narrow == {ip(f"10.0.0.{i}") for i in range(6, 11)}


def test_overlapping_ranges_in_one_request_get_distinct_addresses() -> None:
    wide, narrow = make("10.0.0.0/24"), make("10.0.0.0/28")
    view = PoolView([])
    got = allocator.assign_addresses(view, [narrow, wide], pod(1), [])
    assert len(set(got)) == 2
    assert allocator.assign_addresses(view, [narrow, wide], pod(1), []) == got


def test_a_requested_address_two_overlapping_ranges_can_give_goes_to_the_first_only() -> None:
    wide, narrow = make("10.5.0.0/29"), make("10.5.0.0/30")
    view = PoolView([])
    wanted = [netaddr.IPAddress("10.5.0.2")]
    got = allocator.assign_addresses(view, [wide, narrow], pod(1), wanted)
    assert got == [ip("10.5.0.2"), ip("10.5.0.1")]
    assert allocator.assign_addresses(view, [wide, narrow], pod(1), wanted) == got


def test_a_repeated_add_with_a_requested_address_keeps_the_other_ranges_address() -> None:
    """The first range's requested address moves the pod off what it holds there, but not off
    the address the overlapping second range gave it: the ADD, tried again once a lower address
    was freed meanwhile, answers as before."""
    wide, narrow = make("10.5.0.0/24"), make("10.5.0.0/28")
    view = PoolView([])
    allocator.assign_addresses(view, [wide], pod(0), [])  # .1
    wanted = [netaddr.IPAddress("10.5.0.5")]
    first = allocator.assign_addresses(view, [wide, narrow], pod(1), wanted)
    assert first == [ip("10.5.0.5"), ip("10.5.0.2")]
    allocator.release_addresses(view, [wide], "c0", "net1")  # .1 free again
    assert allocator.assign_addresses(view, [wide, narrow], pod(1), wanted) == first
    assert sorted(view.held_by(wide.pool, pod(1).attachment)) == sorted(first)


def test_network_name_makes_independent_pools() -> None:
    a, b = make("10.0.0.0/24", network="a"), make("10.0.0.0/24", network="b")
    view = PoolView([])
    assert assign(view, a, pod(1)) == assign(view, b, pod(2)) == ip("10.0.0.1")


def test_a_requested_free_address_is_reserved() -> None:
    rng, view = make("10.0.0.0/24"), PoolView([])
    assert assign(view, rng, pod(1), "10.0.0.50/24") == ip("10.0.0.50")
    assert assign(view, rng, pod(1), "10.0.0.50") == ip("10.0.0.50")
    assert assign(view, rng, pod(2)) == ip("10.0.0.1")


def test_a_requested_address_held_by_another_pod_is_refused() -> None:
    rng, view = make("10.0.0.0/24"), PoolView([])
    assign(view, rng, pod(1), "10.0.0.50")
    with pytest.raises(RequestedAddressUnavailableError, match=r"10\.0\.0\.50"):
        assign(view, rng, pod(2), "10.0.0.50")


@pytest.mark.parametrize("requested", ["10.1.0.5", "10.0.0.0", "10.0.0.255", "10.0.0.7"])
def test_a_requested_address_outside_the_usable_range_is_refused(requested: str) -> None:
    rng = make("10.0.0.0/24", exclude=["10.0.0.7"])
    with pytest.raises(RequestedAddressUnavailableError, match=re.escape(requested)):
        allocator.assign_addresses(PoolView([]), [rng], pod(1), [netaddr.IPAddress(requested)])


def test_a_requested_address_moves_the_pod_off_its_old_one() -> None:
    rng, view = make("10.0.0.0/24"), PoolView([])
    old = assign(view, rng, pod(1))
    assert assign(view, rng, pod(1), "10.0.0.9") == ip("10.0.0.9")
    assert view.owner(rng.pool, old) is None


def test_garbage_collection_frees_only_attachments_not_listed() -> None:
    rng, view = make("10.0.0.0/24"), PoolView([])
    for i in range(4):
        assign(view, rng, pod(i))
    valid = {("c0", "net1"), ("c2", "net1")}
    freed = allocator.collect_garbage(view, [rng], valid, node="node-a", cni_network="net")
    assert freed == [ip("10.0.0.2"), ip("10.0.0.4")]
    assert allocator.count_free(view, rng) == 254 - 2


def test_garbage_collection_never_frees_another_nodes_or_networks_or_unrecorded_entries() -> None:
    rng, view = make("10.0.0.0/24"), PoolView([])
    mine = assign(view, rng, pod(1))
    theirs = assign(view, rng, pod(2, node="node-b"))
    other_network = assign(view, rng, pod(3, cni_network="other"))
    unrecorded = assign(view, rng, pod(4, node="", cni_network=""))  # stored before nodes were
    freed = allocator.collect_garbage(view, [rng], set(), node="node-a", cni_network="net")
    assert freed == [mine]
    assert all(view.owner(rng.pool, a) for a in (theirs, other_network, unrecorded))
    # A node that made nothing frees nothing, even with an empty list.
    assert allocator.collect_garbage(view, [rng], set(), node="node-c", cni_network="net") == []


def test_find_addresses_lists_per_range() -> None:
    v4, v6 = make("10.0.0.0/24"), make("2001:db8::/64")
    view = PoolView([])
    allocator.assign_addresses(view, [v4], pod(1), [])
    assert allocator.find_addresses(view, [v4, v6], "c1", "net1") == [[ip("10.0.0.1")], []]


def test_only_the_blocks_that_changed_are_written() -> None:
    rng, view = make("10.0.0.0/16"), PoolView([])
    assign(view, rng, pod(1), "10.0.5.5")
    assert [b.key.base for b in view.changed_blocks()] == [ip("10.0.5.0")]


def test_nodes_start_from_blocks_of_their_own_and_still_fill_the_whole_range() -> None:
    rng = make("10.0.0.0/22", end="10.0.3.232")  # 1000 usable: four blocks
    starts = {allocator.block_start(rng, f"node-{n}") for n in range(10)}
    assert starts <= {ip("10.0.0.1"), ip("10.0.1.0"), ip("10.0.2.0"), ip("10.0.3.0")}
    assert len(starts) > 1  # ten nodes do not all land on one block
    assert allocator.block_start(rng, "node-3") == allocator.block_start(rng, "node-3")

    view = PoolView([])
    given = [
        allocator.assign_addresses(view, [rng], pod(n), [], spread_key=f"node-{n % 10}")[0]
        for n in range(1000)
    ]
    assert sorted(given) == list(range(ip("10.0.0.1"), ip("10.0.3.232") + 1))
    with pytest.raises(RangeExhaustedError):
        allocator.assign_addresses(view, [rng], pod(1000), [], spread_key="node-1")


def test_nodes_spread_over_the_blocks_a_range_gives_from_not_its_excluded_holes() -> None:
    holes = ["10.0.64.0/18", "10.0.192.0/19"]  # 96 of the 256 blocks
    rng = make("10.0.0.0/16", exclude=holes)
    starts = Counter(allocator.block_start(rng, f"node-{n}") for n in range(1000))
    assert all(rng.contains(start) for start in starts)
    # 160 blocks for 1000 nodes: about 6 each, where the hole's would go to the block after it
    assert max(starts.values()) < 25, starts.most_common(3)
    # Without holes, where it always was: an upgrade moves no node's block.
    plain, blocks = make("10.0.0.0/16"), 256
    for n in range(20):
        index = zlib.crc32(f"node-{n}".encode()) % blocks
        assert allocator.block_start(plain, f"node-{n}") == max(
            plain.first, ip("10.0.0.0") + index * 256
        )


def test_a_node_whose_block_is_full_wraps_round_to_the_lowest_free() -> None:
    rng = make("10.0.0.0/23")  # two blocks
    node = next(
        f"n{i}"
        for i in range(100)
        if allocator.block_start(make("10.0.0.0/23"), f"n{i}") == ip("10.0.1.0")
    )
    view = PoolView([])
    for n in range(256):
        view.assign(rng.pool, ip("10.0.1.0") + n, pod(1000 + n))
    assert allocator.assign_addresses(view, [rng], pod(1), [], spread_key=node) == [ip("10.0.0.1")]
    assert allocator.assign_addresses(view, [rng], pod(2), []) == [ip("10.0.0.2")]  # no node
