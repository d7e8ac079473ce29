"""The stored form of a block: JSON a person can read with etcdctl or kubectl."""

from __future__ import annotations

import dataclasses
import json
import operator
from typing import Any

import netaddr

from pyabouts.ipam.errors import CORRUPT_BLOCK, CniError
from pyabouts.ipam.pool import BLOCK_BITS, Block, BlockKey, Owner


def block_cidr(key: BlockKey) -> str:
    prefix = (32 if key.pool.family == 4 else 128) - BLOCK_BITS
    return f"{netaddr.IPAddress(key.base, key.pool.family)}/{prefix}"


def block_document(block: Block) -> dict[str, Any]:
    """The block as stored: where it is, the range that writes it, and who holds what."""
    return {
        **_block_head(block),
        "allocations": {
            str(address - block.key.base): _owner_entry(owner)
            for address, owner in _sorted_entries(block)
        },
    }


def block_json(block: Block) -> str:
    """block_document(block) as compact JSON text, what the stores write.

    A write sends its whole block, and between two writes of a block nearly all of its owners
    are the same: each owner's entry is encoded once and kept. Encoding afresh was a quarter of
    the agent's profile samples over sequential ADDs and DELs on blocks of up to 250 addresses.
    """
    base = block.key.base
    entries = ",".join(
        f'"{address - base}":{_owner_json(owner)}' for address, owner in _sorted_entries(block)
    )
    return json_with_member(_block_head(block), "allocations", f"{{{entries}}}")


def json_with_member(document: dict[str, Any], key: str, member_json: str) -> str:
    """The compact JSON of `document` with one more member, `key`, given as JSON text."""
    if key in document:
        raise ValueError(f"the document has a member {key!r} already")
    head = compact_json(document)
    return f"{head[:-1]}{',' if document else ''}{json.dumps(key)}:{member_json}}}"


def compact_json(document: object) -> str:
    return json.dumps(document, separators=(",", ":"))


def _block_head(block: Block) -> dict[str, Any]:
    return {
        "network": block.key.pool.network,
        "cidr": block_cidr(block.key),
        "range": block.range_text,
        "capacity": block.capacity,
        # A string: an IPv6 range's size does not fit the 64-bit integers of JSON parsers.
        **({"rangeSize": str(block.range_size)} if block.range_size else {}),
    }


def _sorted_entries(block: Block) -> list[tuple[int, Owner]]:
    entries = sorted(block.entries.items())
    if entries and not (block.key.base <= entries[0][0] and entries[-1][0] <= block.last):
        outside = next(a for a, _ in entries if not block.key.base <= a <= block.last)
        raise ValueError(f"address {outside} is not in block {block_cidr(block.key)}")
    return entries


def _owner_entry(owner: Owner) -> dict[str, str | int | bool]:
    entry: dict[str, str | int | bool] = {
        "containerID": owner.container_id,
        "ifname": owner.ifname,
    }
    for key, value in (
        ("podRef", owner.pod),
        ("podUID", owner.pod_uid),
        ("node", owner.node),
        ("cniNetwork", owner.cni_network),
    ):
        if value:
            entry[key] = value
    for key, number in (
        ("allocated", owner.allocated_at),
        ("cooldown", owner.cooldown),
        ("coolingUntil", owner.cooling_until),
    ):
        if number:
            entry[key] = number
    for key, flag in (("sticky", owner.sticky), ("reserved", owner.reserved)):
        if flag:
            entry[key] = True
    return entry


def _owner_json(owner: Owner) -> str:
    # Keyed on every field: an Owner's equality leaves some out (the time, say), its JSON not.
    key = _owner_fields(owner)
    encoded = _ENCODED_OWNERS.get(key)
    if encoded is None:
        if len(_ENCODED_OWNERS) >= _MAX_ENCODED_OWNERS:
            _ENCODED_OWNERS.clear()  # rare: a writer cycling through more blocks than it keeps
        encoded = _ENCODED_OWNERS[key] = compact_json(_owner_entry(owner))
    return encoded


_owner_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(Owner)))
# The entries of 16 full blocks, some 2 to 3 MiB: more than a node's agent writes in turn.
_MAX_ENCODED_OWNERS = 4096
_ENCODED_OWNERS: dict[tuple[Any, ...], str] = {}


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
            allocated_at=_whole_number(entry.get("allocated", 0)),
            cooldown=_whole_number(entry.get("cooldown", 0)),
            cooling_until=_whole_number(entry.get("coolingUntil", 0)),
            sticky=entry.get("sticky") is True,
            reserved=entry.get("reserved") is True,
        )
    return Block(
        key,
        entries,
        revision,
        range_text=str(document.get("range", "")),
        capacity=int(document.get("capacity", 0)),
        range_size=_whole_number(_decimal(document.get("rangeSize"))),
    )


def _decimal(value: object) -> int:
    return int(value) if isinstance(value, str) and value.isdigit() else 0


def _whole_number(value: object) -> int:
    """A count or a time as stored; 0 (not recorded) for anything else, as these only inform."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _corrupt(key: BlockKey, reason: str) -> CniError:
    return CniError(CORRUPT_BLOCK, f"stored block {block_cidr(key)} is malformed: {reason}")
