"""What the plugin asks of IPAM, each as one decision over the configured ranges, run by a
Transactions (alone, or batched with others by the node agent)."""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence

import netaddr

from pyabouts.ipam import allocator, slices
from pyabouts.ipam.pool import Owner, PoolView
from pyabouts.ipam.ranges import AddressRange
from pyabouts.ipam.slices import SlicedRange
from pyabouts.ipam.transaction import Transactions


def allocate(
    transactions: Transactions,
    ranges: Sequence[AddressRange],
    owner: Owner,
    requested: Sequence[netaddr.IPAddress],
    *,
    deadline: float,
    spread_nodes: bool = False,
    sliced: Sequence[SlicedRange] = (),
    now: int = 0,
) -> list[int]:
    """One address per range for `owner` (its existing ones if it has them).

    With `sliced` (node_slice_size: those of `ranges` it cuts, and how), from the slice of each
    of them that owner.node holds, taking a free one where it holds none yet (the first from the
    one its name picks, slices.preferred_slice): the slice
    registries are read and written in the same transaction as the addresses.

    With `spread_nodes` (the node agent), each node starts in a block of its own, picked by
    owner.node (allocator.block_start). Otherwise (a plugin process), the first try takes the
    lowest free address, as whereabouts does; a try after a conflict starts in a block this
    attachment's retry picks, so processes that collided on one block spread over the range's
    blocks instead of colliding again.
    """
    allocator.check_requested(ranges, requested)  # before any I/O: a bad request reads nothing
    tries = itertools.count()

    def decide(view: PoolView) -> list[int]:
        attempt = next(tries)
        retry_key = f"{owner.container_id}/{owner.ifname}/{attempt}" if attempt else ""
        spread_key = owner.node if spread_nodes else retry_key
        mine = [
            slices.node_range(view, cut, owner, now=now) if (cut := cuts.get(rng)) else rng
            for rng in ranges
        ]
        return allocator.assign_addresses(view, mine, owner, requested, spread_key, now=now)

    cuts = {cut.range: cut for cut in sliced}

    # The registries first: a store that writes block by block then stores no address of a
    # slice whose registry entry another node took first.
    registries = [s.registry_range() for s in sliced]
    return transactions.run([*registries, *ranges], decide, deadline=deadline)


def release(
    transactions: Transactions,
    ranges: Sequence[AddressRange],
    container_id: str,
    ifname: str,
    *,
    deadline: float,
    now: int = 0,
) -> list[int]:
    """Free what (container_id, ifname) holds; nothing held is not an error. An address given
    with a cooldown rests from `now` (Unix seconds)."""

    def free(among: Sequence[AddressRange]) -> list[tuple[AddressRange, int]]:
        return transactions.run(
            among,
            lambda view: allocator.release_held(view, among, container_id, ifname, now=now),
            deadline=deadline,
            watch_checked=True,  # "nothing held" a moment late leaves a leak, never a clash
        )

    freed = free(ranges)
    # An ADD takes its addresses in all of its pools at once. A release that found some and
    # none in another pool decided that one on a copy no write checked (an agent's cache,
    # stale for a block another writer changed): decided again alone, "nothing held" there is
    # checked against the store before it is believed.
    holding = {rng.pool for rng, _ in freed}
    missed = [rng for rng in ranges if rng.pool not in holding]
    if freed and missed:
        freed += free(missed)
    return [address for _, address in freed]


def held_addresses(
    transactions: Transactions,
    ranges: Sequence[AddressRange],
    container_id: str,
    ifname: str,
    *,
    deadline: float,
) -> list[list[int]]:
    """Per range, the addresses (container_id, ifname) holds."""
    return transactions.run(
        ranges,
        lambda view: allocator.find_addresses(view, ranges, container_id, ifname),
        deadline=deadline,
    )


def release_stale(
    transactions: Transactions,
    ranges: Sequence[AddressRange],
    valid: Collection[tuple[str, str]],
    *,
    node: str,
    cni_network: str,
    deadline: float,
    now: int = 0,
) -> list[int]:
    """CNI GC: free what `node` allocated for `cni_network` whose (containerID, ifname) is not
    in `valid` (see allocator.collect_garbage)."""
    return transactions.run(
        ranges,
        lambda view: allocator.collect_garbage(
            view, ranges, valid, node=node, cni_network=cni_network, now=now
        ),
        deadline=deadline,
        watch_checked=True,
    )


def free_counts(
    transactions: Transactions,
    ranges: Sequence[AddressRange],
    *,
    deadline: float,
    sliced: Sequence[SlicedRange] = (),
    node: str = "",
    now: int = 0,
) -> list[int]:
    """Per range, how many addresses it can still give; for one `sliced` cuts, to `node` (in
    its slice, or in the slice it would take)."""
    cuts = {cut.range: cut for cut in sliced}

    def count(view: PoolView) -> list[int]:
        return [
            slices.free_for_node(view, cut, node, now=now)
            if (cut := cuts.get(rng))
            else allocator.count_free(view, rng, now=now)
            for rng in ranges
        ]

    registries = [s.registry_range() for s in sliced]
    return transactions.run([*registries, *ranges], count, deadline=deadline, watch_checked=True)
