"""The stored form of a block: JSON a person can read with etcdctl or kubectl."""

from __future__ import annotations

from typing import Any

import netaddr

from pyabouts.ipam.errors import CORRUPT_BLOCK, CniError
from pyabouts.ipam.pool import BLOCK_BITS, Block, BlockKey, Owner


def block_cidr(key: BlockKey) -> str:
    prefix = (32 if key.pool.family == 4 else 128) - BLOCK_BITS
    return f"{netaddr.IPAddress(key.base, key.pool.family)}/{prefix}"


def block_document(block: Block) -> dict[str, Any]:
    """The block as stored: where it is, the range that writes it, and who holds what."""
    allocations: dict[str, dict[str, str]] = {}
    for address, owner in sorted(block.entries.items()):
        if not block.key.base <= address <= block.last:
            raise ValueError(f"address {address} is not in block {block_cidr(block.key)}")
        entry = {"containerID": owner.container_id, "ifname": owner.ifname}
        for key, value in (
            ("podRef", owner.pod),
            ("podUID", owner.pod_uid),
            ("node", owner.node),
            ("cniNetwork", owner.cni_network),
        ):
            if value:
                entry[key] = value
        allocations[str(address - block.key.base)] = entry
    return {
        "network": block.key.pool.network,
        "cidr": block_cidr(block.key),
        "range": block.range_text,
        "capacity": block.capacity,
        "allocations": allocations,
    }


def block_from_document(key: BlockKey, document: dict[str, Any], revision: str) -> Block:
    """The block a stored document describes; CniError 104 naming the entry when it is not in
    pyabouts' format (the datastores do not check entries: see crds/)."""
    allocations = document.get("allocations", {})
    if not isinstance(allocations, dict):
        raise _corrupt(key, "allocations is not an object")
    entries = {}
    for offset, entry in allocations.items():
        if not (str(offset).isdigit() and int(offset) < 1 << BLOCK_BITS):
            raise _corrupt(key, f"allocation key {offset!r} is not an offset in the block")
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(field), str) for field in ("containerID", "ifname")
        ):
            raise _corrupt(key, f"allocation {offset} lacks containerID or ifname: {entry!r}")
        entries[key.base + int(offset)] = Owner(
            container_id=entry["containerID"],
            ifname=entry["ifname"],
            pod=str(entry.get("podRef", "")),
            pod_uid=str(entry.get("podUID", "")),
            node=str(entry.get("node", "")),
            cni_network=str(entry.get("cniNetwork", "")),
        )
    return Block(
        key,
        entries,
        revision,
        range_text=str(document.get("range", "")),
        capacity=int(document.get("capacity", 0)),
    )


def _corrupt(key: BlockKey, reason: str) -> CniError:
    return CniError(CORRUPT_BLOCK, f"stored block {block_cidr(key)} is malformed: {reason}")
