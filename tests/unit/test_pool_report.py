"""What `kubectl pyabouts` computes from stored blocks: usage over whole ranges, node slices
counted with their pool, and lookups by address and by pod; and how the stored form keeps the
facts it shows."""

import netaddr
import pytest
from prometheus_client import CollectorRegistry

from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId, PoolView
from pyabouts.ipam.pool_report import holdings_at, holdings_of_pod, pool_usage
from pyabouts.ipam.ranges import AddressRange, build_range
from pyabouts.ipam.slices import SlicedRange, take_slice
from pyabouts.ipam.stores.codec import block_document, block_from_document
from pyabouts.ipam.transaction import describe_blocks
from pyabouts.serving.endpoints import pool_usage_gauge, record_pool_usage

BLUE = PoolId("blue", 4)


def address(text: str) -> int:
    return int(netaddr.IPAddress(text))


def stored(view: PoolView, *ranges: AddressRange) -> list[Block]:
    """The view's changed blocks as a write stores them, described by `ranges`."""
    changed = view.changed_blocks()
    describe_blocks(changed, ranges)
    return changed


def test_usage_counts_the_whole_range_with_exclusions_and_its_slices() -> None:
    rng = build_range(
        "10.0.0.0/22", range_start=None, range_end=None, exclude=["10.0.1.0/24"], pool=BLUE
    )
    sliced = SlicedRange(rng, 24)
    view = PoolView([])
    view.assign(BLUE, address("10.0.0.1"), Owner("c1", "net1", "ns/a"))
    view.assign(BLUE, address("10.0.2.9"), Owner("c2", "net1", "ns/b"))
    take_slice(view, sliced, "node-a")
    blocks = stored(view, rng, sliced.registry_range())
    (usage,) = pool_usage(blocks)
    assert usage.pool == BLUE
    assert usage.ranges == {"10.0.0.0/22": 1022 - 256}  # the exclusion counted out
    assert (usage.total, usage.used, usage.free, usage.blocks) == (766, 2, 764, 2)
    # 4 slices of /24, of which the wholly excluded one is never handed out
    assert (usage.slices_held, usage.slices_total, usage.slice_sizes) == (1, 3, {"/24"})


def test_slices_are_counted_over_every_registry_of_the_pool() -> None:
    # Two ranges of one network, each cut into slices (one node_slice_size for both): each
    # range has a registry of its own, so both the slices held and those cut add up.
    view = PoolView([])
    registries = []
    for text in ("10.1.0.0/24", "10.2.0.0/24"):
        sliced = SlicedRange(
            build_range(text, range_start=None, range_end=None, exclude=[], pool=BLUE), 26
        )
        for node in ("node-a", "node-b", "node-c"):
            take_slice(view, sliced, node)
        registries.append(sliced.registry_range())
    (usage,) = pool_usage(stored(view, *registries))
    assert (usage.slices_held, usage.slices_total) == (6, 8)


def test_ranges_of_one_cidr_count_once_as_the_largest() -> None:
    # A block pyabouts-migrate stored records whereabouts' CIDR, one the NAD's ADD wrote its
    # START-END/PREFIX; another network_name's range in the pool overlaps, and counts apart.
    blocks = [
        described("10.8.0.0", "10.8.0.0/22", 1022),
        described("10.8.1.0", "10.8.0.1-10.8.3.254/22", 1022),
        described("10.8.2.0", "10.8.2.0/24", 254),
    ]
    (usage,) = pool_usage(blocks)
    assert len(usage.ranges) == 3
    assert usage.total == 1022 + 254


def test_a_range_written_with_leading_zero_octets_counts_once_with_its_cidr() -> None:
    # A NAD's range as its writer spelled it, read as whereabouts reads it (192.168.10.0/24).
    blocks = [
        described("192.168.10.0", "192.168.010.0/24", 254),
        described("192.168.10.0", "192.168.10.0/24", 254),
    ]
    (usage,) = pool_usage(blocks)
    assert usage.total == 254


def described(base: str, text: str, size: int) -> Block:
    block = Block(BlockKey.of(BLUE, address(base)))
    block.range_text, block.range_size = text, size
    return block


def test_blocks_stored_before_the_range_size_was_recorded_count_the_ranges_text() -> None:
    block = Block(BlockKey.of(BLUE, address("10.9.0.0")), {address("10.9.0.5"): Owner("c", "e")})
    block.range_text = "10.9.0.0/24"
    (usage,) = pool_usage([block])
    assert (usage.total, usage.used, usage.free) == (254, 1, 253)


def test_lookups_by_address_and_pod_look_through_every_network() -> None:
    red = PoolId("red", 4)
    view = PoolView([])
    view.assign(BLUE, address("10.0.0.1"), Owner("c1", "net1", "ns/a"))
    view.assign(red, address("10.0.0.1"), Owner("c2", "net2", "ns/b"))
    view.assign(red, address("10.0.0.2"), Owner("c3", "net1", "ns/a"))
    blocks = view.changed_blocks()
    assert {
        (h.pool.network, h.owner.pod) for h in holdings_at(blocks, netaddr.IPAddress("10.0.0.1"))
    } == {
        ("blue", "ns/a"),
        ("red", "ns/b"),
    }
    assert holdings_at(blocks, netaddr.IPAddress("::a00:1")) == []  # another family
    assert [(h.pool.network, h.text) for h in holdings_of_pod(blocks, "ns/a")] == [
        ("blue", "10.0.0.1"),
        ("red", "10.0.0.2"),
    ]


@pytest.mark.parametrize("bad", ["soon", -5, True, 1.5])
def test_a_malformed_time_or_size_reads_as_not_recorded(bad: object) -> None:
    """They only inform; a block is not refused for them."""
    key = BlockKey.of(BLUE, address("10.0.0.0"))
    document = {
        "rangeSize": bad,
        "allocations": {"1": {"containerID": "c", "ifname": "e", "allocated": bad}},
    }
    block = block_from_document(key, document, "1")
    assert block.range_size == 0 and block.entries[key.base + 1].allocated_at == 0


def test_time_and_size_survive_the_stored_form() -> None:
    key = BlockKey.of(PoolId("v6", 6), address("2001:db8::"))
    block = Block(key, {key.base + 3: Owner("c", "e", allocated_at=1764770000)})
    block.range_size = (1 << 64) - 2
    document = block_document(block)
    assert document["rangeSize"] == str((1 << 64) - 2)
    read = block_from_document(key, document, "1")
    assert read.range_size == block.range_size
    assert read.entries[key.base + 3].allocated_at == 1764770000


def test_the_pool_metric_counts_whole_ranges_and_no_slice_registry_as_a_pool() -> None:
    rng = build_range("10.0.0.0/22", range_start=None, range_end=None, exclude=[], pool=BLUE)
    sliced = SlicedRange(rng, 24)
    view = PoolView([])
    view.assign(BLUE, address("10.0.0.1"), Owner("c1", "net1", "ns/a"))
    take_slice(view, sliced, "node-a")
    registry = CollectorRegistry()
    gauge = pool_usage_gauge(registry)
    record_pool_usage(gauge, stored(view, rng, sliced.registry_range()))
    samples = {
        (s.labels["network"], s.labels["state"]): s.value
        for metric in registry.collect()
        for s in metric.samples
    }
    assert samples == {
        ("blue", "total"): 1022,
        ("blue", "used"): 1,
        ("blue", "reserved"): 0,
        ("blue", "cooling"): 0,
        ("blue", "free"): 1021,
    }


def test_resting_addresses_count_as_cooling_until_their_rest_ends() -> None:
    block = Block(BlockKey.of(BLUE, address("10.9.0.0")))
    block.range_text, block.range_size = "10.9.0.0/24", 254
    block.put(address("10.9.0.1"), Owner("c1", "net1", "ns/a"))
    block.put(address("10.9.0.2"), Owner("", "net1", "ns/b", cooling_until=2000))
    block.put(address("10.9.0.3"), Owner("", "net1", "ns/c", cooling_until=1000))
    (usage,) = pool_usage([block], now=1500)
    assert (usage.used, usage.cooling, usage.free) == (1, 1, 252)
