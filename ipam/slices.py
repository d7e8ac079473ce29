"""Node slices (`node_slice_size`): a range cut into aligned slices, each node allocating only
from the slice it holds.

Which node holds which slice is stored like any allocation, in a pool of its own (the range's
slice registry): entry i is slice i of the range, held by a node. So a slice is taken with the
same compare-and-swap as an address, on either datastore, and `kubectl get ippools` lists the
registry beside the addresses. Addresses stay in the range's own pool: slices cut where a node
looks, never who may hold what, so an address is unique across nodes whatever the slices say.

Pure decisions over a PoolView, like ipam.allocator; the caller runs them as transactions.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import netaddr

from pyabouts.ipam.allocator import count_free, first_free_from, release
from pyabouts.ipam.errors import NoFreeSliceError
from pyabouts.ipam.pool import Owner, PoolId, PoolView
from pyabouts.ipam.ranges import AddressRange, RangeError

#: After a network_name in the name of a slice registry's pool (then the range and the size).
REGISTRY_MARK = "#node-slices"
_REGISTRY_CUT = re.compile(r" (\S+) (/[0-9]+)")  # what follows the mark: " <range> /<size>"
#: The interface name slice entries carry: one slice per node and registry.
SLICE_IFNAME = "slice"
NODES_NAMED = 10  # in the error when every slice is held: a registry may have thousands


def parse_slice_size(text: str, rng: AddressRange) -> int:
    """The prefix length of `node_slice_size` ("/26" or "26") for `rng`: no shorter than the
    range's own and no longer than its family allows."""
    digits = text.strip().removeprefix("/")
    if not digits.isdigit():
        raise RangeError(f"node_slice_size {text!r} is not a prefix length such as '/26'")
    prefixlen = int(digits)
    longest = 32 if rng.family == 4 else 128
    if not rng.prefixlen <= prefixlen <= longest:
        raise RangeError(
            f"node_slice_size {text!r} does not cut {rng.network}: "
            f"it must be between /{rng.prefixlen} and /{longest}"
        )
    return prefixlen


@dataclass(frozen=True, slots=True)
class SlicedRange:
    """A configured range and how it is cut into slices of /`prefixlen`."""

    range: AddressRange
    prefixlen: int

    @property
    def slice_bits(self) -> int:
        return (32 if self.range.family == 4 else 128) - self.prefixlen

    @property
    def registry(self) -> PoolId:
        """The pool whose entry i says which node holds slice i: one per network_name, range
        and slice size, e.g. network "blue#node-slices 10.94.0.0/24 /26"."""
        network = f"{self.range.pool.network}{REGISTRY_MARK} {self.range.network} /{self.prefixlen}"
        return PoolId(network=network, family=self.range.family)

    @property
    def registry_text(self) -> str:
        """How the registry names itself to people (its blocks' `range`)."""
        return f"{self.range.network} in /{self.prefixlen} slices"

    def slice_network(self, index: int) -> netaddr.IPNetwork:
        base = int(self.range.network.first) + (index << self.slice_bits)
        return netaddr.IPNetwork(f"{netaddr.IPAddress(base, self.range.family)}/{self.prefixlen}")

    def usable_slices(self) -> Iterator[tuple[int, int]]:
        """Inclusive spans of the indexes of slices holding at least one address the range may
        give (a slice wholly excluded, or outside range_start/range_end, is never handed out)."""
        base = int(self.range.network.first)
        spans: list[tuple[int, int]] = []
        for first, last in self.range.spans:
            lo, hi = (first - base) >> self.slice_bits, (last - base) >> self.slice_bits
            if spans and lo <= spans[-1][1] + 1:
                spans[-1] = (spans[-1][0], max(spans[-1][1], hi))
            else:
                spans.append((lo, hi))
        yield from spans

    def registry_range(self) -> AddressRange:
        """The registry as a range of slice indexes, to read and write it transactionally."""
        spans = tuple(self.usable_slices())
        return AddressRange(
            text=self.registry_text,
            network=self.range.network,
            spans=spans,
            pool=self.registry,
            reach=(spans[0][0], spans[-1][1]),  # slice indexes, not addresses
        )

    def within(self, index: int) -> AddressRange:
        """The range cut down to slice `index`: what its node allocates from. Same pool."""
        network = self.slice_network(index)
        first, last = int(network.first), int(network.last)
        spans = tuple(
            (max(lo, first), min(hi, last))
            for lo, hi in self.range.spans
            if lo <= last and hi >= first
        )
        return AddressRange(
            text=f"{network} (node slice of {self.range.text})",
            network=self.range.network,
            spans=spans,
            pool=self.range.pool,
            reach=self.range.reach,
        )


def slice_holder(sliced: SlicedRange, index: int, node: str) -> Owner:
    """The registry entry of slice `index` held by `node`: it names the slice, so the entry
    reads on its own (`kubectl get ippool -o yaml`), and the reconciler knows what to check."""
    return Owner(container_id=str(sliced.slice_network(index)), ifname=SLICE_IFNAME, node=node)


def held_slice(view: PoolView, sliced: SlicedRange, node: str) -> int | None:
    """The index of a slice `node` holds in `sliced` that has an address to give, if any (a
    registry has about one entry per node holding a slice, so looking through it is cheap).
    A slice the config's exclusions or bounds took wholly out since it was taken (a NAD edit,
    or another NAD of the network with other ones) is not one: the node takes another, and
    keeps the entry, which the other NAD's pods may still use."""
    registry = sliced.registry_range()
    for index, owner in view.entries(sliced.registry, registry.first, registry.last):
        # Node names as kubelet registers them, lower-case: one recorded as the host name
        # spelled it (an in-process call of before) is the same node's.
        mine = owner.node.lower() == node.lower()
        if mine and owner.ifname == SLICE_IFNAME and registry.contains(index):
            return index
    return None


def take_slice(view: PoolView, sliced: SlicedRange, node: str) -> int:
    """The slice `node` holds, or else a free one (see slice_to_take), which it now holds."""
    held = held_slice(view, sliced, node)
    if held is not None:
        return held
    free = slice_to_take(view, sliced, node)
    if free is not None:
        view.assign(sliced.registry, free, slice_holder(sliced, free, node))
        return free
    registry = sliced.registry_range()
    entries = view.entries(sliced.registry, registry.first, registry.last)
    holders = sorted({owner.node for _, owner in entries})
    named = ", ".join(holders[:NODES_NAMED])
    if len(holders) > NODES_NAMED:
        named = f"{len(holders)} nodes, among them {named}"
    raise NoFreeSliceError(
        f"no free node slice for node {node!r} in range {sliced.range.text}: all "
        f"{registry.size} slices of /{sliced.prefixlen} are held (by {named})"
    )


def slice_to_take(view: PoolView, sliced: SlicedRange, node: str) -> int | None:
    """The slice a node that holds none takes: from the slice its name picks (see
    preferred_slice) on, the first free one none of whose addresses is given, else the first
    free one with an address to give, else the first free one (None: every slice is held).

    A free slice may hold given addresses: those of a network's pods from before its slice
    size or range changed (another registry), or of a config of the network without slices.
    Taken full, it gave its node nothing, and taken again at every try, for ever."""
    registry = sliced.registry_range()
    pool = sliced.range.pool
    start = first_free_from(view, registry, preferred_slice(registry, node))
    first_with_room = None
    index = start
    # Each free slice is looked at once at most: only slices holding given addresses are
    # passed over, so the walk is as long as the pool has allocations, no longer.
    while index is not None:
        within = sliced.within(index)
        if all(next(view.entries(pool, lo, hi), None) is None for lo, hi in within.spans):
            return index
        if first_with_room is None and first_free_from(view, within, within.first) is not None:
            first_with_room = index
        # The next free one after it, round the registry (first_free_from wraps), until back.
        index = first_free_from(view, registry, index + 1)
        if index == start:
            break
    return first_with_room if first_with_room is not None else start


def free_for_node(view: PoolView, sliced: SlicedRange, node: str, *, now: int = 0) -> int:
    """How many addresses `node` can still be given in `sliced`: in the slice it holds, else in
    the one take_slice would give it (0 when every slice is held). Changes nothing."""
    index = held_slice(view, sliced, node)
    if index is None:
        index = slice_to_take(view, sliced, node)
        if index is None:
            return 0
    return count_free(view, sliced.within(index), now=now)


def preferred_slice(registry: AddressRange, node: str) -> int:
    """Where `node`'s search for a free slice starts: a usable slice picked by a stable hash of
    its name. Nodes that take their first slice at once (a Deployment scaled over them) then
    mostly want different slices and so different address blocks. Their claims still race on
    the registry's block (one per 256 slices); the registry entry is written first, so a lost
    race stores nothing, and the next try mostly finds the slice it wanted still free."""
    index = zlib.crc32(node.encode()) % registry.size
    for first, last in registry.spans:
        if index <= last - first:
            return first + index
        index -= last - first + 1
    raise AssertionError("an index below the registry's size lies in one of its spans")


def node_range(view: PoolView, sliced: SlicedRange, owner: Owner, *, now: int = 0) -> AddressRange:
    """The range cut down to the slice owner.node holds (taken now if it holds none), with
    what `owner` holds in the range outside that slice released (its cooldown applies; one
    resting already rests on). Such a hold comes from a pod of that name on another node before,
    or from a write that half succeeded (the address stored, the slice lost to another node's
    race for it), which an agent that writes the registry first no longer makes but an older one
    did: either way not this node's to give."""
    mine = sliced.within(take_slice(view, sliced, owner.node))
    pool = sliced.range.pool
    for address in view.held_by(pool, owner.attachment):
        if sliced.range.contains(address) and not mine.contains(address):
            release(view, pool, address, now=now)
    return mine


def give_back_slice(
    view: PoolView, registry: PoolId, index: int, holder: Owner, *, now: int = 0
) -> bool:
    """Free registry entry `index` if `holder` still holds it and no address of its slice is
    given or resting after its release (release_cooldown) beyond `now`; True if freed. The
    slice's addresses are read in the same view: one given before the read keeps the slice
    taken (controller.node_slices says what one given after it does). Rests that have ended go
    with the slice."""
    if view.owner(registry, index) != holder:
        return False
    pool, first, last = slice_span(registry, holder)
    entries = list(view.entries(pool, first, last))
    if any(not owner.cooling or owner.cooling_until > now for _, owner in entries):
        return False
    for address, _ in entries:
        view.unassign(pool, address)
    view.unassign(registry, index)
    return True


def slice_span(registry: PoolId, holder: Owner) -> tuple[PoolId, int, int]:
    """The addresses of the slice a registry entry names: (the range's pool, first, last).
    ValueError when it names none of the registry's family: a stored registry is checked as it
    is read (check_registry_entry)."""
    try:
        network = netaddr.IPNetwork(holder.container_id)
    except netaddr.AddrFormatError as exc:
        raise ValueError(f"{holder.container_id!r} is not a slice: {exc}") from None
    if network.version != registry.family:
        raise ValueError(f"{holder.container_id!r} is not an IPv{registry.family} slice")
    pool = PoolId(registry_parts(registry)[0], registry.family)
    return pool, int(network.first), int(network.last)


def registry_parts(registry: PoolId) -> tuple[str, str, str]:
    """What a registry's network says (SlicedRange.registry): the network_name of the range it
    cuts, the range, and the slices' size ("/26"). ValueError when it says no range and size,
    as none pyabouts writes: a stored registry is checked as it is read (check_registry_name)."""
    network, _, cut = registry.network.rpartition(REGISTRY_MARK)
    said = _REGISTRY_CUT.fullmatch(cut)
    if said is None:
        raise ValueError(f"{registry.network!r} names no range and slice size")
    return network, said[1], said[2]


def check_registry_name(registry: PoolId) -> None:
    """ValueError when a stored registry's network does not name the range it cuts and the
    slices' size."""
    try:
        netaddr.IPNetwork(registry_parts(registry)[1])
    except netaddr.AddrFormatError as exc:
        raise ValueError(f"{registry.network!r} names no range: {exc}") from None


def check_registry_entry(registry: PoolId, holder: Owner) -> None:
    """ValueError when a stored registry entry names no slice (edited by hand, say): the block
    is then unreadable, as any stored block not in pyabouts' format, rather than breaking every
    decision and reconcile pass that reads it."""
    slice_span(registry, holder)


def is_registry(pool: PoolId) -> bool:
    return REGISTRY_MARK in pool.network
