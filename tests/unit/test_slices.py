"""Node slices: cutting a range, taking and giving back slices, and the config key."""

import dataclasses
import re
import time

import netaddr
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyabouts.ipam import allocator, operations
from pyabouts.ipam.config import load_config
from pyabouts.ipam.errors import INVALID_CONFIG, CniError, NoFreeSliceError
from pyabouts.ipam.pool import Owner, PoolId, PoolView
from pyabouts.ipam.ranges import AddressRange, RangeError, build_range
from pyabouts.ipam.slices import (
    SlicedRange,
    give_back_slice,
    held_slice,
    node_range,
    parse_slice_size,
    preferred_slice,
    slice_span,
    take_slice,
)
from pyabouts.ipam.store import PoolStore
from pyabouts.ipam.transaction import DirectTransactions
from tests.memory_store import BlockByBlockStore, MemoryStore


def make(text: str, *, exclude: list[str] | None = None, start: str | None = None) -> AddressRange:
    pool = PoolId("net", 6 if ":" in text else 4)
    return build_range(text, range_start=start, range_end=None, exclude=exclude or [], pool=pool)


def sliced(
    text: str, size: str, *, exclude: list[str] | None = None, start: str | None = None
) -> SlicedRange:
    rng = make(text, exclude=exclude, start=start)
    return SlicedRange(rng, parse_slice_size(size, rng))


def ip(text: str) -> int:
    return int(netaddr.IPAddress(text))


def addresses(rng: AddressRange) -> set[int]:
    return {a for lo, hi in rng.spans for a in range(lo, hi + 1)}


def pod(n: int, node: str) -> Owner:
    return Owner(container_id=f"c{n}", ifname="net1", pod=f"default/pod-{n}", node=node)


def add(store: PoolStore, cut: SlicedRange, n: int, node: str) -> int:
    """Pod n's ADD on `node`, from the slice it holds of `cut`, as one transaction on `store`."""
    owner = Owner(f"c{n}", "net1", f"ns/p{n}", node=node)
    transactions = DirectTransactions(store)
    deadline = time.monotonic() + 5
    [address] = operations.allocate(
        transactions, [cut.range], owner, [], deadline=deadline, sliced=[cut]
    )
    return address


@pytest.mark.parametrize("text", ["/26", "26", " /26 "])
def test_a_slice_size_is_a_prefix_length_with_or_without_its_slash(text: str) -> None:
    assert parse_slice_size(text, make("10.0.0.0/24")) == 26


@pytest.mark.parametrize(
    ("text", "why"),
    [("abc", "not a prefix length"), ("/23", "between /24 and /32"), ("/33", "between")],
)
def test_a_slice_size_that_cannot_cut_the_range_is_refused(text: str, why: str) -> None:
    with pytest.raises(RangeError, match=why):
        parse_slice_size(text, make("10.0.0.0/24"))


def test_a_range_is_cut_into_aligned_slices_without_its_network_and_broadcast() -> None:
    cut = sliced("10.0.0.0/24", "/26")
    assert list(cut.usable_slices()) == [(0, 3)]
    assert [str(cut.slice_network(i)) for i in range(4)] == [
        "10.0.0.0/26",
        "10.0.0.64/26",
        "10.0.0.128/26",
        "10.0.0.192/26",
    ]
    first, last = cut.within(0), cut.within(3)
    assert first.spans == (
        (int(netaddr.IPAddress("10.0.0.1")), int(netaddr.IPAddress("10.0.0.63"))),
    )
    assert last.last == int(netaddr.IPAddress("10.0.0.254"))
    # A slice's addresses are in the range's own pool, with the range's prefix length.
    assert first.pool == cut.range.pool
    assert first.format(first.first) == "10.0.0.1/24"


def test_each_node_takes_the_first_free_slice_from_the_one_its_name_picks_and_keeps_it() -> None:
    cut, view = sliced("10.0.0.0/24", "/26"), PoolView([])
    # The slices the names pick: nodes taking their first slice at once mostly want others.
    picks = {n: preferred_slice(cut.registry_range(), n) for n in ("a", "b", "c", "d")}
    assert picks == {"a": 3, "b": 1, "c": 3, "d": 0}
    # c finds 3 held (by a) and takes the next free one, d finds 0 held and goes on to 2.
    assert [take_slice(view, cut, n) for n in ("a", "b", "c")] == [3, 1, 0]
    assert take_slice(view, cut, "b") == 1
    assert held_slice(view, cut, "d") is None
    assert take_slice(view, cut, "d") == 2
    with pytest.raises(NoFreeSliceError) as refused:
        take_slice(view, cut, "e")
    message = str(refused.value)
    for part in ("'e'", "10.0.0.0/24", "4 slices of /26", "a, b, c, d"):
        assert part in message, message


def test_a_slice_wholly_excluded_or_before_range_start_is_never_handed_out() -> None:
    cut = sliced("10.0.0.0/24", "/26", exclude=["10.0.0.64/26"], start="10.0.0.130")
    assert list(cut.usable_slices()) == [(2, 3)]
    view = PoolView([])
    # Both names pick slice 3 of the two usable ones; b, second, goes on to the other one.
    assert [take_slice(view, cut, n) for n in ("a", "b")] == [3, 2]
    # Inside a slice the exclusions and bounds still hold.
    assert cut.within(2).first == int(netaddr.IPAddress("10.0.0.130"))


def test_a_node_whose_slice_an_edit_excludes_wholly_takes_another() -> None:
    store = MemoryStore()
    cut = sliced("10.0.0.0/24", "/26")
    node = next(f"n{i}" for i in range(100) if preferred_slice(cut.registry_range(), f"n{i}") == 1)
    assert add(store, cut, 1, node) == ip("10.0.0.64")
    # The NAD now excludes the node's slice, which lies between usable ones.
    edited = sliced("10.0.0.0/24", "/26", exclude=["10.0.0.64/26"])
    taken = (add(store, edited, 2, node) - ip("10.0.0.0")) >> 6
    assert taken != 1
    view = PoolView(store.read_blocks(edited.registry, 0, 3))
    held = sorted((i, o.node) for i, o in view.entries(edited.registry, 0, 3))
    assert held == sorted([(1, node), (taken, node)])
    # The config before the edit gives from a slice the node holds.
    assert (add(store, cut, 3, node) - ip("10.0.0.0")) >> 6 in {1, taken}


def test_exclusions_inside_a_slice_are_honoured_by_the_allocator() -> None:
    cut, view = sliced("10.0.0.0/24", "/26", exclude=["10.0.0.65", "10.0.0.66/31"]), PoolView([])
    assert take_slice(view, cut, "b") == 1
    mine = cut.within(1)
    got = [allocator.assign_addresses(view, [mine], pod(n, "b"), [])[0] for n in range(3)]
    # The slice's own first address is given; the excluded .65, .66 and .67 are not.
    assert [str(netaddr.IPAddress(a)) for a in got] == ["10.0.0.64", "10.0.0.68", "10.0.0.69"]


def test_ipv6_ranges_are_sliced_too() -> None:
    cut, view = sliced("2001:db8::/64", "/80"), PoolView([])
    assert take_slice(view, cut, "b") == 0xEFF9  # of 65536 slices, the one its name picks
    assert str(cut.slice_network(0xEFF9)) == "2001:db8:0:0:eff9::/80"
    got = allocator.assign_addresses(view, [cut.within(0xEFF9)], pod(1, "b"), [])[0]
    # A slice's first address is given: only the range's own network address is not.
    assert str(netaddr.IPAddress(got, 6)) == "2001:db8:0:0:eff9::"


def test_a_slice_goes_back_only_when_its_node_holds_it_and_no_address_of_it_is_given() -> None:
    cut, view = sliced("10.0.0.0/24", "/26"), PoolView([])
    take_slice(view, cut, "d")
    take_slice(view, cut, "b")
    (entry,) = [o for i, o in view.entries(cut.registry, 0, 3) if i == 1]
    assert (entry.container_id, entry.node) == ("10.0.0.64/26", "b")  # it names its slice
    assert slice_span(cut.registry, entry) == (cut.range.pool, ip("10.0.0.64"), ip("10.0.0.127"))
    address = allocator.assign_addresses(view, [cut.within(1)], pod(1, "b"), [])[0]
    (held_by_d,) = [o for i, o in view.entries(cut.registry, 0, 3) if i == 0]
    assert not give_back_slice(view, cut.registry, 1, held_by_d)  # not d's
    assert not give_back_slice(view, cut.registry, 1, entry)  # pod-1 holds an address in it
    allocator.release_addresses(view, [cut.range], "c1", "net1")
    assert view.owner(cut.range.pool, address) is None
    assert give_back_slice(view, cut.registry, 1, entry)
    assert held_slice(view, cut, "b") is None
    assert preferred_slice(cut.registry_range(), "y") == 1
    assert take_slice(view, cut, "y") == 1  # free again, it is the slice y's name picks


@given(
    prefix=st.integers(min_value=20, max_value=28),
    extra=st.integers(min_value=0, max_value=6),
    excluded=st.lists(st.integers(min_value=0, max_value=4095), max_size=8),
)
def test_the_slices_partition_the_ranges_usable_addresses(
    prefix: int, extra: int, excluded: list[int]
) -> None:
    base = int(netaddr.IPAddress("10.8.0.0"))
    size = 1 << (32 - prefix)
    exclude = [str(netaddr.IPAddress(base + e % size)) for e in excluded]
    rng = (
        make(f"10.8.0.0/{prefix}", exclude=exclude)
        if len(exclude) < size - 2
        else make("10.8.0.0/20")
    )
    cut = SlicedRange(rng, min(prefix + extra, 30))
    seen: set[int] = set()
    for first, last in cut.usable_slices():
        for index in range(first, last + 1):
            mine = addresses(cut.within(index))
            network = cut.slice_network(index)
            assert all(a in network for a in map(netaddr.IPAddress, mine))
            assert not mine & seen
            seen |= mine
    assert seen == addresses(rng)


@given(
    start=st.integers(min_value=1, max_value=200),
    excluded=st.lists(st.integers(min_value=0, max_value=255), max_size=6),
    node=st.text(min_size=1, max_size=20),
)
def test_the_slice_a_name_picks_is_always_one_that_can_be_handed_out(
    start: int, excluded: list[int], node: str
) -> None:
    exclude = [f"10.8.0.{e}/30" for e in excluded]
    cut = sliced("10.8.0.0/24", "/28", exclude=exclude, start=f"10.8.0.{start}")
    registry = cut.registry_range()  # the slices holding an address the range gives
    assert registry.contains(preferred_slice(registry, node))


def test_node_slice_size_is_checked_when_the_config_is_loaded() -> None:
    raw = {"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "pyabouts", "range": "10.0.0.0/24"}}
    assert load_config(raw).slices == ()
    raw["ipam"]["node_slice_size"] = "/26"  # type: ignore[index]
    (cut,) = load_config(raw).slices
    assert cut.prefixlen == 26
    raw["ipam"]["node_slice_size"] = "/20"  # type: ignore[index]
    config = load_config(raw)  # refused for ADD only: a DEL of it still frees
    assert config.slices == ()
    with pytest.raises(CniError) as refused:
        config.check_can_give()
    assert refused.value.code == INVALID_CONFIG
    assert "node_slice_size" in refused.value.msg


def test_an_allocation_takes_the_nodes_slice_and_its_address_in_one_transaction() -> None:
    store = MemoryStore()
    cut = sliced("10.0.0.0/24", "/26")
    # d's name picks slice 0, b's slice 1
    got = [add(store, cut, 1, "d"), add(store, cut, 2, "b"), add(store, cut, 3, "d")]
    assert got == [ip("10.0.0.1"), ip("10.0.0.64"), ip("10.0.0.2")]
    registry = {
        o.node: o.container_id
        for b in store.blocks.values()
        for o in b.entries.values()
        if b.key.pool == cut.registry
    }
    assert registry == {"d": "10.0.0.0/26", "b": "10.0.0.64/26"}
    # The registry's stored blocks say what they are, for people reading them.
    (block,) = [b for b in store.blocks.values() if b.key.pool == cut.registry]
    assert (block.range_text, block.capacity) == ("10.0.0.0/24 in /26 slices", 4)


def test_a_range_of_the_sliced_family_smaller_than_a_slice_stays_whole_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = {
        "cniVersion": "1.0.0",
        "name": "n",
        "ipam": {
            "type": "pyabouts",
            "range": "10.0.0.0/24",
            "ipRanges": [{"range": "10.1.0.0/28"}, {"range": "fd00::/64"}],
            "node_slice_size": "/26",
        },
    }
    with caplog.at_level("WARNING", logger="pyabouts.ipam.config"):
        loaded = load_config(config)
    assert [c.range.text for c in loaded.slices] == ["10.0.0.0/24"]
    (warning,) = caplog.messages  # for the IPv4 range alone: the IPv6 one is another family's
    assert "10.1.0.0/28 is not cut into node slices" in warning, warning


def test_a_slice_size_cuts_the_ranges_it_fits_and_is_refused_when_it_fits_none() -> None:
    dual = {
        "cniVersion": "1.0.0",
        "name": "n",
        "ipam": {
            "type": "pyabouts",
            "range": "10.0.0.0/24",
            "ipRanges": [{"range": "fd00::/64"}],
            "node_slice_size": "/26",
        },
    }
    config = load_config(dual)
    assert [(c.range.text, c.prefixlen) for c in config.slices] == [("10.0.0.0/24", 26)]
    dual["ipam"]["node_slice_size"] = "/80"  # type: ignore[index]
    assert [(c.range.text, c.prefixlen) for c in load_config(dual).slices] == [("fd00::/64", 80)]
    store = MemoryStore()
    owner = Owner("c1", "net1", "ns/p1", node="a")
    got = operations.allocate(
        DirectTransactions(store),
        load_config(dual).ranges,
        owner,
        [],
        deadline=time.monotonic() + 5,
        sliced=load_config(dual).slices,
    )
    # v6 sliced (the first address of the slice node a's name picks), v4 whole
    assert got == [ip("10.0.0.1"), int(netaddr.IPAddress("fd00::be43:0:0:0"))]
    dual["ipam"]["node_slice_size"] = "/20"  # type: ignore[index]
    with pytest.raises(CniError, match=re.escape("node_slice_size '/20' does not cut 10.0.0.0/24")):
        load_config(dual).check_can_give()
    # A drained range (every address excluded) still counts for whether the size fits: the
    # config loads, for DEL, and ADD is refused for the range that gives nothing.
    dual["ipam"] |= {"node_slice_size": "/26", "exclude": ["10.0.0.0/24"]}  # type: ignore[operator]
    drained = load_config(dual)
    assert drained.slices == ()
    with pytest.raises(CniError, match=re.escape("ipam.range: '10.0.0.0/24': every address")):
        drained.check_can_give()


def test_an_address_held_outside_the_nodes_slice_is_let_go_when_the_pod_allocates() -> None:
    # A half-written first ADD: pod-1's address stored in slice 0, which node b then lost to
    # node d. Deciding again on node b, pod-1 gets an address of b's slice and lets .1 go.
    cut, view = sliced("10.0.0.0/24", "/26"), PoolView([])
    assert take_slice(view, cut, "d") == 0
    owner = pod(1, "b")
    view.assign(cut.range.pool, ip("10.0.0.1"), owner)
    mine = node_range(view, cut, owner)
    assert (mine.first, mine.last) == (ip("10.0.0.64"), ip("10.0.0.127"))
    assert view.owner(cut.range.pool, ip("10.0.0.1")) is None
    assert allocator.assign_addresses(view, [mine], owner, [])[0] == ip("10.0.0.64")


def test_each_range_and_slice_size_of_a_network_has_a_registry_of_its_own() -> None:
    registries = {
        sliced("10.0.0.0/24", "/26").registry,
        sliced("10.0.1.0/24", "/26").registry,
        sliced("10.0.0.0/24", "/27").registry,
    }
    assert len(registries) == 3
    assert sliced("10.0.0.0/24", "/26").registry == PoolId("net#node-slices 10.0.0.0/24 /26", 4)


def test_a_slice_whose_addresses_rest_goes_back_once_their_rest_has_ended() -> None:
    """release_cooldown: a resting address keeps its slice until its rest ends."""
    cut, view = sliced("10.0.0.0/24", "/26"), PoolView([])
    take_slice(view, cut, "d")
    (entry,) = [o for _, o in view.entries(cut.registry, 0, 3)]
    resting = dataclasses.replace(pod(1, "d"), cooldown=30)
    address = allocator.assign_addresses(view, [cut.within(0)], resting, [], now=1000)[0]
    allocator.release_addresses(view, [cut.range], "c1", "net1", now=1000)
    assert not give_back_slice(view, cut.registry, 0, entry, now=1029)
    assert give_back_slice(view, cut.registry, 0, entry, now=1030)
    assert view.owner(cut.range.pool, address) is None  # the ended rest went with it


def test_a_node_that_loses_its_slices_race_stores_nothing_of_it() -> None:
    # Node a decides on its slice and address; node b takes another slice before a writes. a's
    # registry write then conflicts, and as it goes first, a's address is not stored: it would
    # otherwise sit in a slice the registry does not give a, for b or any node to take.
    store, cut = BlockByBlockStore(), sliced("10.0.0.0/22", "/24")  # a block per slice
    registry = cut.registry_range()
    assert preferred_slice(registry, "a") != preferred_slice(registry, "b")

    store.meanwhile.append(lambda: add(store, cut, 2, "b"))
    got = add(store, cut, 1, "a")
    b_write, a_first, *a_again = store.stored
    assert b_write == [cut.registry, cut.range.pool]
    assert a_first == []  # its registry entry lost the race: nothing of it written
    assert a_again == [[cut.registry, cut.range.pool]]
    assert cut.within(preferred_slice(registry, "a")).contains(got)


def node_picking(cut: SlicedRange, index: int) -> str:
    """A node name whose search for a free slice starts at slice `index`."""
    return next(
        f"n{i}" for i in range(1000) if preferred_slice(cut.registry_range(), f"n{i}") == index
    )


def test_a_free_slice_whose_addresses_are_all_given_is_passed_over() -> None:
    """A config of the network without slices gave .1 to .63 lowest first (or its pods come
    from before the slice size changed): slice 0's registry entry is free, its addresses are
    not. The node whose name picks it takes the next slice none of whose addresses is given,
    rather than slice 0 at every ADD, each failing with code 100 (a whole range of free
    slices beside it)."""
    store = MemoryStore()
    whole = make("10.0.0.0/24")
    transactions = DirectTransactions(store)
    for n in range(63):
        operations.allocate(transactions, [whole], pod(n, "w"), [], deadline=time.monotonic() + 5)
    cut = sliced("10.0.0.0/24", "/26")
    assert add(store, cut, 100, node_picking(cut, 0)) == ip("10.0.0.64")


def test_a_slice_none_of_whose_addresses_is_given_comes_before_one_partly_given() -> None:
    store, cut = MemoryStore(), sliced("10.0.0.0/24", "/26")
    transactions = DirectTransactions(store)
    # .65 given without slices: slice 1 is free in the registry, but not empty.
    operations.allocate(
        transactions,
        [make("10.0.0.64/26")],
        pod(0, "w"),
        [],
        deadline=time.monotonic() + 5,
    )
    assert add(store, cut, 1, node_picking(cut, 1)) == ip("10.0.0.128")  # slice 2, untouched
    # With every free slice partly given, one with an address to give: the one the name picks,
    # else, that one full, the next (round the registry).
    view = PoolView([])
    for index in range(4):
        view.assign(cut.range.pool, int(cut.slice_network(index).first) + 1, pod(10 + index, "w"))
    assert take_slice(view, cut, node_picking(cut, 3)) == 3
    view = PoolView([])
    for index in range(3):
        view.assign(cut.range.pool, int(cut.slice_network(index).first) + 1, pod(10 + index, "w"))
    for n, taken in enumerate(addresses(cut.within(3))):
        view.assign(cut.range.pool, taken, pod(20 + n, "w"))
    assert take_slice(view, cut, node_picking(cut, 3)) == 0


def test_when_every_slice_is_held_the_error_names_a_few_of_their_nodes() -> None:
    cut, view = sliced("10.0.0.0/24", "/28"), PoolView([])
    holders = [f"node-{i:02d}" for i in range(cut.registry_range().size)]
    for name in holders:
        take_slice(view, cut, name)
    with pytest.raises(NoFreeSliceError) as refused:
        take_slice(view, cut, "late")
    message = str(refused.value)
    assert f"by {len(holders)} nodes, among them node-00, node-01," in message, message
    assert "node-09" in message and "node-10" not in message
