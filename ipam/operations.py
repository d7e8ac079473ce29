"""What the plugin asks of IPAM, each as one decision over the configured ranges, run by a
Transactions (alone, or batched with others by the node agent)."""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence

import netaddr

from pyabouts.ipam import allocator
from pyabouts.ipam.pool import Owner, PoolView
from pyabouts.ipam.ranges import AddressRange
from pyabouts.ipam.transaction import Transactions


def allocate(
    transactions: Transactions,
    ranges: Sequence[AddressRange],
    owner: Owner,
    requested: Sequence[netaddr.IPAddress],
    *,
    deadline: float,
    spread_nodes: bool = False,
) -> list[int]:
    """One address per range for `owner` (its existing ones if it has them).

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
        return allocator.assign_addresses(view, ranges, owner, requested, spread_key)

    return transactions.run(ranges, decide, deadline=deadline)


def release(
    transactions: Transactions,
    ranges: Sequence[AddressRange],
    container_id: str,
    ifname: str,
    *,
    deadline: float,
) -> list[int]:
    """Free what (container_id, ifname) holds; nothing held is not an error."""
    return transactions.run(
        ranges,
        lambda view: allocator.release_addresses(view, ranges, container_id, ifname),
        deadline=deadline,
    )


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
) -> list[int]:
    """CNI GC: free what `node` allocated for `cni_network` whose (containerID, ifname) is not
    in `valid` (see allocator.collect_garbage)."""
    return transactions.run(
        ranges,
        lambda view: allocator.collect_garbage(
            view, ranges, valid, node=node, cni_network=cni_network
        ),
        deadline=deadline,
    )


def free_counts(
    transactions: Transactions, ranges: Sequence[AddressRange], *, deadline: float
) -> list[int]:
    """Per range, how many addresses it can still give."""
    return transactions.run(
        ranges,
        lambda view: [allocator.count_free(view, r) for r in ranges],
        deadline=deadline,
    )
