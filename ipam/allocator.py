"""The allocator: pure decisions over a PoolView. No I/O; the caller reads and writes the store.

Every function here changes the view (or only reads it); the caller writes back the blocks the
view marks as changed. Deciding again on fresh state gives the same answer for work that was
already stored, which is what makes retries after a conflict (or a half-written batch) safe.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Collection, Iterator, Sequence

import netaddr

from pyabouts.ipam.errors import RangeExhaustedError, RequestedAddressUnavailableError
from pyabouts.ipam.pool import BLOCK_BITS, Owner, PoolId, PoolView, container_identity
from pyabouts.ipam.ranges import AddressRange


def assign_addresses(
    view: PoolView,
    ranges: Sequence[AddressRange],
    owner: Owner,
    requested: Sequence[netaddr.IPAddress],
    spread_key: str = "",
    *,
    now: int = 0,
) -> list[int]:
    """One address per range, in order, for `owner`; see `assign_address`."""
    check_requested(ranges, requested)
    chosen: list[int] = []
    # What a requested address moves the pod off is released once every range has chosen:
    # with overlapping ranges, the one a range leaves may be the one a later range keeps.
    replaced: list[tuple[PoolId, int]] = []
    for rng in ranges:
        chosen.append(
            assign_address(
                view,
                rng,
                owner,
                requested,
                taken=chosen,
                spread_key=spread_key,
                now=now,
                replaced=replaced,
            )
        )
    kept = set(zip((rng.pool for rng in ranges), chosen, strict=True))
    for pool, address in replaced:
        if (pool, address) not in kept:
            release(view, pool, address, now=now)
            kept.add((pool, address))
    return chosen


def assign_address(
    view: PoolView,
    rng: AddressRange,
    owner: Owner,
    requested: Sequence[netaddr.IPAddress],
    *,
    taken: Collection[int] = (),
    spread_key: str = "",
    now: int = 0,
    replaced: list[tuple[PoolId, int]] | None = None,
) -> int:
    """The address `owner` gets in `rng`.

    A requested address inside the range wins; otherwise the address this pod interface already
    holds (ADD is idempotent, and the containerID is updated), or had and released less than a
    cooldown ago; otherwise the lowest free one, or, with a `spread_key` (a node agent's node
    name), the lowest free one from the block that key picks on (see block_start). `taken`
    holds what this request already got from earlier ranges, which may overlap this one.

    An address cooling down after its release is not free: only once its cooldown has passed
    (by `now`, Unix seconds) and the range has no other free address is it given again.

    What a requested address moves the pod off is released, or, given `replaced`, added to it
    for the caller to release.
    """
    pool = rng.pool
    held = sorted(a for a in view.held_by(pool, owner.attachment) if rng.contains(a))
    held = [a for a in held if a not in taken]
    # One address per range: a requested one that an earlier, overlapping range took already
    # leaves this range to give another.
    wanted = next((int(a) for a in requested if rng.can_give(a) and int(a) not in taken), None)
    if wanted is not None:
        holder = view.owner(pool, wanted)
        if holder is not None and holder.attachment != owner.attachment:
            if holder.reserved:
                raise RequestedAddressUnavailableError(
                    f"requested address {_text(rng, wanted)} is reserved for the StatefulSet "
                    f"pod {holder.attachment[0]} {holder.ifname}",
                )
            if holder.cooling and holder.cooling_until > now:
                raise RequestedAddressUnavailableError(
                    f"requested address {_text(rng, wanted)} was released and rests until "
                    f"{_clock(holder.cooling_until)} (release_cooldown)",
                )
            if not holder.cooling:
                raise RequestedAddressUnavailableError(
                    f"requested address {_text(rng, wanted)} is already allocated to "
                    f"{holder.attachment[0]} {holder.ifname}",
                )
        for address in held:
            if address == wanted:
                continue
            if replaced is None:
                release(view, pool, address, now=now)  # a resting one rests on
            else:
                replaced.append((pool, address))
        chosen = wanted
    elif held:
        chosen = held[0]
    else:
        start = block_start(rng, spread_key) if spread_key else rng.first
        free = first_free_from(view, rng, start)
        if free is None:
            free = _rest_ended(view, rng, now)
        if free is None:
            raise RangeExhaustedError(
                f"range {rng.text} is exhausted: all {rng.size} addresses are allocated"
                + (f" (network_name {rng.pool.network!r})" if rng.pool.network else "")
                + _resting(view, rng),
            )
        chosen = free
    if view.owner(pool, chosen) != owner:
        view.assign(pool, chosen, owner)
    return chosen


def check_requested(ranges: Sequence[AddressRange], requested: Sequence[netaddr.IPAddress]) -> None:
    """Refuse requested addresses that no range can give, or two for the same range."""
    for address in requested:
        matching = [r for r in ranges if r.can_give(address)]
        if not matching:
            configured = ", ".join(r.text for r in ranges)
            raise RequestedAddressUnavailableError(
                f"requested address {address} is not a usable address of "
                f"any configured range ({configured})",
            )
    for rng in ranges:
        inside = [a for a in requested if rng.can_give(a)]
        if len(inside) > 1:
            raise RequestedAddressUnavailableError(
                f"more than one requested address falls in range {rng.text}",
            )


def release_addresses(
    view: PoolView,
    ranges: Sequence[AddressRange],
    container_id: str,
    ifname: str,
    *,
    now: int = 0,
) -> list[int]:
    """Free what (container_id, ifname) holds in the ranges' networks (see release_held)."""
    return [address for _, address in release_held(view, ranges, container_id, ifname, now=now)]


def release_held(
    view: PoolView,
    ranges: Sequence[AddressRange],
    container_id: str,
    ifname: str,
    *,
    now: int = 0,
) -> list[tuple[AddressRange, int]]:
    """Free what (container_id, ifname) holds in the ranges' networks, also where a range
    gives no more (an exclusion or bound added since); a newer sandbox's hold is kept. Each
    address freed, with the first range whose network holds it. An address given with a
    cooldown rests from `now` (see release)."""
    freed = [
        (rng, a)
        for rng, a in _held_by(view, ranges, container_id, ifname, given_or_not=True)
        if view.owner(rng.pool, a) is not None
    ]
    for rng, address in freed:
        release(view, rng.pool, address, now=now, reserve=True)
    return freed


def release(view: PoolView, pool: PoolId, address: int, *, now: int, reserve: bool = False) -> None:
    """Free `address`: at once, or, when it was given with a cooldown, by leaving a resting
    entry that keeps it from everybody but its former pod interface until `now` + cooldown.

    With `reserve` (a DEL, or GC: the runtime is done with the sandbox), an address given
    sticky stays reserved for its pod's name instead; the reconciler, which knows the
    StatefulSets, releases it without `reserve` once none needs that name.
    """
    owner = view.owner(pool, address)
    if owner is None or owner.cooling:
        return
    if reserve and owner.sticky and owner.pod:  # only a pod's name can take it back
        if not owner.reserved:
            view.assign(pool, address, dataclasses.replace(owner, container_id="", reserved=True))
        return
    if owner.cooldown and now:
        resting = dataclasses.replace(
            owner, container_id="", reserved=False, cooling_until=now + owner.cooldown
        )
        view.assign(pool, address, resting)
    else:
        view.unassign(pool, address)


def find_addresses(
    view: PoolView, ranges: Sequence[AddressRange], container_id: str, ifname: str
) -> list[list[int]]:
    """For each range, the addresses (container_id, ifname) holds there."""
    return [
        [a for _, a in _held_by(view, [rng], container_id, ifname)]
        for rng in ranges  # one list per range, so CHECK can name the range that lost its address
    ]


def collect_garbage(
    view: PoolView,
    ranges: Sequence[AddressRange],
    valid: Collection[tuple[str, str]],
    *,
    node: str,
    cni_network: str,
    now: int = 0,
) -> list[int]:
    """Free every address in the ranges' networks (see release_addresses) that `node`
    allocated for `cni_network` and whose (containerID, ifname) is not in `valid`.

    A runtime's valid list names only the attachments of its own node and network
    configuration: another node's entries, another configuration's sharing the pool, and
    entries that record no node (stored before nodes were) are never its to free. Those are
    the reconciler's.
    """
    stale = [
        (rng, a)
        for rng in ranges
        for a, o in _entries_in(view, rng, given_or_not=True)
        if o.node.lower() == node.lower()  # as kubelet registers it (see slices.held_slice)
        and o.cni_network == cni_network
        and o.in_use
        and (o.container_id, o.ifname) not in valid
    ]
    for rng, address in stale:
        release(view, rng.pool, address, now=now, reserve=True)
    return sorted({a for _, a in stale})


def count_free(view: PoolView, rng: AddressRange, *, now: int = 0) -> int:
    """How many addresses the range can still give (a cooldown that has passed, by `now`, no
    longer keeps its address)."""
    kept = sum(1 for _, o in _entries_in(view, rng) if not o.cooling or o.cooling_until > now)
    return rng.size - kept


def _rest_ended(view: PoolView, rng: AddressRange, now: int) -> int | None:
    """The lowest address of `rng` whose rest has ended by `now`, now free; only that one, so
    that an ADD rewrites one block, not every block holding an ended rest."""
    for address, owner in _entries_in(view, rng):
        if owner.cooling and owner.cooling_until <= now:
            view.unassign(rng.pool, address)
            return address
    return None


def _resting(view: PoolView, rng: AddressRange) -> str:
    ends = [o.cooling_until for _, o in _entries_in(view, rng) if o.cooling]
    if not ends:
        return ""
    return f"; {len(ends)} of them rest after their release, the first until {_clock(min(ends))}"


def _clock(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _entries_in(
    view: PoolView, rng: AddressRange, *, given_or_not: bool = False
) -> Iterator[tuple[int, Owner]]:
    """The entries of the addresses `rng` gives, or (`given_or_not`) of any in its network
    that the view holds."""
    if given_or_not:
        yield from view.entries(rng.pool, int(rng.network.first), int(rng.network.last))
        return
    if not rng.spans:  # a range that gives nothing (see AddressRange.unusable)
        return
    for address, owner in view.entries(rng.pool, rng.first, rng.last):
        if rng.contains(address):
            yield address, owner


def _held_by(
    view: PoolView,
    ranges: Sequence[AddressRange],
    container_id: str,
    ifname: str,
    *,
    given_or_not: bool = False,
) -> list[tuple[AddressRange, int]]:
    """What (container_id, ifname) holds of the addresses each range gives, or (`given_or_not`)
    of any in its network, with the first range that covers each."""
    held: dict[tuple[PoolId, int], AddressRange] = {}
    identity = container_identity(container_id, ifname)
    for rng in ranges:
        covers = rng.in_network if given_or_not else rng.contains
        for address in sorted(view.held_by(rng.pool, identity)):
            if covers(address):
                held.setdefault((rng.pool, address), rng)
    return [(rng, address) for (_, address), rng in held.items()]


def block_start(rng: AddressRange, key: str) -> int:
    """Where a search keyed `key` (a node's name) starts looking for a free address: the start
    of one of the range's blocks, chosen by a stable hash of `key`.

    Nodes that all start from the lowest address all write the same block and conflict with
    each other on every write; spread over the range's blocks, they mostly write blocks of
    their own (as Calico's per-node block affinity does). Any free address of the range is
    still given, so a full block sends its node on to the next. The hash picks among the
    blocks that hold an address the range gives: a block in an excluded hole would send its
    nodes on to the one after it, all of them to the same.
    """
    runs: list[tuple[int, int]] = []  # blocks holding usable addresses, as block numbers
    for first, last in rng.spans:
        low, high = first >> BLOCK_BITS, last >> BLOCK_BITS
        if runs and low <= runs[-1][1]:  # a block two spans share
            runs[-1] = (runs[-1][0], max(runs[-1][1], high))
        else:
            runs.append((low, high))
    index = zlib.crc32(key.encode()) % sum(high - low + 1 for low, high in runs)
    for low, high in runs:
        if index <= high - low:
            return max(rng.first, (low + index) << BLOCK_BITS)
        index -= high - low + 1
    raise AssertionError("an index below the blocks' count lies in one of their runs")


def first_free_from(view: PoolView, rng: AddressRange, start: int) -> int | None:
    """The lowest free address at or after `start`, else the lowest before it."""
    after = [(max(first, start), last) for first, last in rng.spans if last >= start]
    before = [(first, min(last, start - 1)) for first, last in rng.spans if first < start]
    for first, last in after + before:
        free = view.first_free(rng.pool, first, last)
        if free is not None:
            return free
    return None


def _text(rng: AddressRange, address: int) -> str:
    return str(netaddr.IPAddress(address, rng.family))
