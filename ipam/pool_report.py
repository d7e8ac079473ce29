"""What operators ask of the stored blocks: each pool's usage, who holds an address, what a pod
holds. Pure functions of the blocks a store read (no I/O), for `kubectl pyabouts` and the
pool metrics."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import netaddr

from pyabouts.ipam.pool import Block, Owner, PoolId
from pyabouts.ipam.ranges import RangeError, build_range, parse_network
from pyabouts.ipam.slices import is_registry, registry_parts


@dataclass(slots=True)
class PoolUsage:
    """One pool (a network_name and family) over all its stored blocks."""

    pool: PoolId
    ranges: dict[str, int] = field(default_factory=dict)  # range text -> addresses it may give
    used: int = 0
    cooling: int = 0  # released, and resting (release_cooldown) until a time still to come
    reserved: int = 0  # released by a sticky pod's DEL, kept for its name (sticky_statefulsets)
    blocks: int = 0
    slices_held: int = 0  # node slices held, over the pool's slice registries
    # Per slice registry (one per range and slice size): how many slices it cuts.
    registry_slices: dict[str, int] = field(default_factory=dict)
    slice_sizes: set[str] = field(default_factory=set)  # "/26"

    @property
    def slices_total(self) -> int:
        """The slices of all the pool's registries, as slices_held counts them."""
        return sum(self.registry_slices.values())

    @property
    def total(self) -> int:
        """What the pool's ranges may give, over the whole of each range (blocks never stored
        included). Ranges of one CIDR (configs of one subnet: bounds, exclusions, or the plain
        CIDR pyabouts-migrate records for whereabouts' blocks) count as the largest of them;
        ranges of other CIDRs that overlap are counted once each."""
        largest: dict[str, int] = {}
        for text, size in self.ranges.items():
            cidr = _cidr_of(text)
            largest[cidr] = max(largest.get(cidr, 0), size)
        return sum(largest.values())

    @property
    def free(self) -> int:
        return max(0, self.total - self.used - self.cooling - self.reserved)


@dataclass(frozen=True, slots=True)
class Holding:
    """An address held in a pool, and by whom."""

    pool: PoolId
    address: int
    owner: Owner

    @property
    def text(self) -> str:
        return str(netaddr.IPAddress(self.address, self.pool.family))


def pool_usage(blocks: Iterable[Block], *, now: int = 0) -> list[PoolUsage]:
    """One PoolUsage per pool, in (network, family) order; slice registries count towards the
    pool whose range they cut, not as pools of their own. An address whose rest after its
    release ended by `now` (Unix seconds) counts as free."""
    usage: dict[PoolId, PoolUsage] = {}
    for block in blocks:
        pool = block.key.pool
        if is_registry(pool):
            base, _, slice_size = registry_parts(pool)
            row = usage.setdefault(PoolId(base, pool.family), PoolUsage(PoolId(base, pool.family)))
            row.slices_held += len(block.entries)
            cut_before = row.registry_slices.get(pool.network, 0)
            row.registry_slices[pool.network] = max(cut_before, block.range_size)
            row.slice_sizes.add(slice_size)
            continue
        row = usage.setdefault(pool, PoolUsage(pool))
        resting = [o for o in block.entries.values() if o.cooling]
        row.cooling += sum(1 for o in resting if o.cooling_until > now)
        row.reserved += sum(1 for o in block.entries.values() if o.reserved)
        row.used += sum(1 for o in block.entries.values() if o.in_use)
        row.blocks += 1
        if block.range_text:
            size = block.range_size or _size_of(block.range_text, pool)
            row.ranges[block.range_text] = max(row.ranges.get(block.range_text, 0), size)
    return [usage[pool] for pool in sorted(usage)]


def holdings_at(blocks: Iterable[Block], address: netaddr.IPAddress) -> list[Holding]:
    """Every pool's entry for `address` (one per network_name that gives it)."""
    wanted = int(address)
    return [
        Holding(block.key.pool, wanted, owner)
        for block in blocks
        if block.key.pool.family == address.version
        and not is_registry(block.key.pool)
        and (owner := block.entries.get(wanted)) is not None
    ]


def holdings_of_pod(blocks: Iterable[Block], pod: str) -> list[Holding]:
    """Every address held for the pod "namespace/name", in every pool."""
    return sorted(
        (h for h in _holdings(blocks) if h.owner.pod == pod),
        key=lambda h: (h.pool, h.address),
    )


def _holdings(blocks: Iterable[Block]) -> Iterator[Holding]:
    for block in blocks:
        if not is_registry(block.key.pool):
            for address, owner in block.entries.items():
                yield Holding(block.key.pool, address, owner)


def _size_of(text: str, pool: PoolId) -> int:
    """What a range may give as its text says, for blocks stored before they recorded it
    (its range_start, range_end and exclusions are not in the text, so this may count more)."""
    try:
        return build_range(text, range_start=None, range_end=None, exclude=[], pool=pool).size
    except RangeError:
        return 0


def _cidr_of(text: str) -> str:
    """The CIDR a range's text ("CIDR" or "START-END/PREFIX") lies in; the text itself when
    it reads as none."""
    try:
        return str(parse_network(text.rpartition("-")[2]).cidr)
    except RangeError:
        return text
