"""The stored form of a block: JSON a person can read with etcdctl or kubectl.

A block's owners are one string, a table of a line per given address under a header line that
names the columns: far cheaper for kube-apiserver and etcd to take than an object per address
(see "The Kubernetes datastore" in the README), and still read at a glance with
`kubectl get ippool -o yaml`. Blocks stored in the earlier form, an object of owner objects
keyed by offset, are read as well; the next write of a block stores it as a table.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import netaddr

from pyabouts.ipam.errors import CORRUPT_BLOCK, CniError
from pyabouts.ipam.pool import BLOCK_BITS, BLOCK_SIZE, Block, BlockKey, Owner
from pyabouts.ipam.slices import check_registry_entry, check_registry_name, is_registry

# The table's first line. A reader refuses a table under any other header, so that a later
# form (a column more) is never read as this one.
TABLE_HEADER = (
    "offset containerID ifname podRef podUID node cniNetwork allocated cooldown coolingUntil flags"
)
_COLUMNS = len(TABLE_HEADER.split(" "))
_EMPTY = "-"  # an empty text column, and no flags
# Besides letters, digits and "_.-~", what a value may hold unescaped: what names, pod
# references and slice records (a CIDR) are made of. Anything else is percent-encoded, so a
# value never holds a space, a line break or a quote.
_SAFE = "/:@+=,"

K = TypeVar("K")
V = TypeVar("V")
A = TypeVar("A")


def block_cidr(key: BlockKey) -> str:
    prefix = (32 if key.pool.family == 4 else 128) - BLOCK_BITS
    return f"{netaddr.IPAddress(key.base, key.pool.family)}/{prefix}"


def block_document(block: Block) -> dict[str, Any]:
    """The block as stored: where it is, the range that writes it, and who holds what."""
    return {**_block_head(block), "allocations": "\n".join(_table_lines(block)[0])}


def block_json(block: Block) -> str:
    """block_document(block) as compact JSON text, what the stores write.

    The table, most of what a write encodes, is made a JSON string by joining its lines with
    an escaped line break: its lines are printable ASCII without quotes or backslashes
    (values are percent-encoded, see _SAFE), which json.dumps would scan, at several times
    the cost, only to leave as they are. Each line is checked once, when it is made (see
    _table_lines); json.dumps takes a table with a line that is not so."""
    lines, plain = _table_lines(block)
    if not plain:
        return compact_json(block_document(block))
    return json_with_member(_block_head(block), "allocations", '"' + "\\n".join(lines) + '"')


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


def _table_lines(block: Block) -> tuple[list[str], bool]:
    """The header, then a line per address; and whether every line is plain (printable ASCII
    without quotes or backslashes: as JSON escapes nothing in it). A write sends its whole
    block, and between two writes of a block nearly all of its owners are the same objects
    (blocks copied to be changed share them): each address's plain line is kept with the owner
    it was made for."""
    kept = _TABLES.get(block.key)
    if kept is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        kept = _TABLES[block.key] = {}
    base = block.key.base
    lines = [TABLE_HEADER]
    plain = True
    for address, owner in _sorted_entries(block):
        line = kept.get(address)
        if line is None or line[0] is not owner:
            text = f"{address - base} {owner_columns(owner)}"
            if _is_plain(text):
                kept[address] = (owner, text)
            else:
                plain = False
            lines.append(text)
        else:
            lines.append(line[1])
    return lines, plain


def _is_plain(text: str) -> bool:
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def _sorted_entries(block: Block) -> list[tuple[int, Owner]]:
    entries = sorted(block.entries.items())
    if entries and not (block.key.base <= entries[0][0] and entries[-1][0] <= block.last):
        outside = next(a for a, _ in entries if not block.key.base <= a <= block.last)
        raise ValueError(f"address {outside} is not in block {block_cidr(block.key)}")
    return entries


def owner_columns(owner: Owner) -> str:
    """The owner's columns after the offset. A write sends its whole block, and between two
    writes of a block nearly all of its owners are the same: each owner's line is kept, by the
    Owner object (blocks copied to be changed share them), else by its fields."""
    kept = _LINES_BY_OWNER.get(id(owner))
    if kept is not None and kept[0] is owner:  # the entry holds it: its id is not reused
        return kept[1]
    # Keyed on every field: an Owner's equality leaves some out (the time, say), its line not.
    columns = _kept(_OWNER_LINES, _owner_fields(owner), _line_of, owner)
    if len(_LINES_BY_OWNER) >= _MAX_KEPT:
        _LINES_BY_OWNER.clear()
    _LINES_BY_OWNER[id(owner)] = (owner, columns)
    return columns


def _kept(cache: dict[K, V], key: K, make: Callable[[A], V], source: A) -> V:
    """cache[key], made first from `source` if need be. Bounded: emptied when full, which is
    rare (a process cycling through more blocks than it keeps)."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= _MAX_KEPT:
            cache.clear()
        value = cache[key] = make(source)
    return value


def _line_of(owner: Owner) -> str:
    texts = (owner.container_id, owner.ifname, owner.pod, owner.pod_uid, owner.node)
    counts = (owner.allocated_at, owner.cooldown, owner.cooling_until)
    flags = ",".join(name for name in ("sticky", "reserved") if getattr(owner, name))
    return " ".join(
        [
            *map(_text_column, (*texts, owner.cni_network)),
            *map(_count_column, counts),
            flags or _EMPTY,
        ]
    )


_owner_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(Owner)))
# The entries of 16 full blocks: more than a node's agent writes or reads in turn.
_MAX_KEPT = 4096
_OWNER_LINES: dict[tuple[Any, ...], str] = {}
_LINES_BY_OWNER: dict[int, tuple[Owner, str]] = {}
# Per block key, each address's line and the owner it was made for (see _table_lines); as many
# blocks as _MAX_KEPT entries fill.
_TABLES: dict[BlockKey, dict[int, tuple[Owner, str]]] = {}
_MAX_TABLES = _MAX_KEPT // BLOCK_SIZE


def _text_column(value: str) -> str:
    if not value:
        return _EMPTY
    # surrogatepass: a value decoded with surrogateescape (the agent's environment strings)
    # is stored and read back as it came, as JSON's escapes kept it in the earlier form.
    return "%2D" if value == _EMPTY else quote(value, safe=_SAFE, errors="surrogatepass")


def _count_column(value: int) -> str:
    # Refused here rather than stored: a block holding one would be refused by every reader.
    if type(value) is not int or value < 0:
        raise ValueError(f"{value!r} is not a count or a time to store")
    return str(value)


def block_from_document(key: BlockKey, document: dict[str, Any], revision: str) -> Block:
    """The block a stored document describes, in either form; CniError 104 naming the entry
    when it is not in pyabouts' format (the datastores do not check entries: see crds/)."""
    try:
        return _block_of_document(key, document, revision)
    except (TypeError, ValueError, OverflowError, AttributeError) as exc:  # a field's type
        raise _corrupt(key, f"{type(exc).__name__} {exc}") from None


def _block_of_document(key: BlockKey, document: dict[str, Any], revision: str) -> Block:
    allocations = document.get("allocations", {})
    if isinstance(allocations, str):
        entries = _entries_of_table(key, allocations)
    elif isinstance(allocations, dict):
        entries = _entries_of_objects(key, allocations)
    else:
        raise _corrupt(key, "allocations is neither a table nor an object")
    if is_registry(key.pool):
        check_registry_name(key.pool)
        for owner in entries.values():
            check_registry_entry(key.pool, owner)
    return Block(
        key,
        entries,
        revision,
        range_text=str(document.get("range", "")),
        capacity=int(document.get("capacity", 0)),
        range_size=_whole_number(_decimal(document.get("rangeSize"))),
    )


def _entries_of_table(key: BlockKey, table: str) -> dict[int, Owner]:
    lines = table.split("\n")
    if lines[0] != TABLE_HEADER:
        raise _corrupt(key, f"the allocations table's header is not pyabouts': {lines[0]!r}")
    del lines[0]
    # A block read again (after a conflict, by the reconciler) has nearly the same lines.
    found = map(_LINES_READ.get, lines)
    reads = [read or _new_line_read(key, line) for read, line in zip(found, lines, strict=True)]
    base = key.base
    entries = {base + offset: owner for offset, owner in reads}
    if len(entries) < len(reads):
        offsets = [offset for offset, _ in reads]
        twice = next(o for n, o in enumerate(offsets) if o in offsets[:n])
        raise _corrupt(key, f"offset {twice} is given twice")
    return entries


def _new_line_read(key: BlockKey, line: str) -> tuple[int, Owner]:
    try:
        return _kept(_LINES_READ, line, _line_read, line)
    except ValueError as exc:
        raise _corrupt(key, f"allocation line {line!r}: {exc}") from None


def _line_read(line: str) -> tuple[int, Owner]:
    offset, _, columns = line.partition(" ")
    return _offset(offset), owner_from_columns(columns)


def owner_from_columns(columns: str) -> Owner:
    """The owner a line's columns after its offset describe. Blocks are read again and again
    (after a conflict, by the reconciler) with nearly the same lines: each one's owner is kept."""
    return _kept(_OWNERS_READ, columns, _owner_of, columns)


def _owner_of(columns: str) -> Owner:
    values = columns.split(" ")
    if len(values) != _COLUMNS - 1:
        raise ValueError(f"not {_COLUMNS} columns")
    cid, ifname, pod, uid, node, network, allocated, cooldown, cooling, flags = values
    return Owner(
        container_id=_text(cid),
        ifname=_text(ifname),
        pod=_text(pod),
        pod_uid=_text(uid),
        node=_text(node),
        cni_network=_text(network),
        allocated_at=_count(allocated),
        cooldown=_count(cooldown),
        cooling_until=_count(cooling),
        **_flags(flags),
    )


_OWNERS_READ: dict[str, Owner] = {}
_LINES_READ: dict[str, tuple[int, Owner]] = {}


def _offset(column: str) -> int:
    offset = _count(column)
    if offset >= 1 << BLOCK_BITS:
        raise ValueError(f"{column} is not an offset in the block")
    return offset


def _count(column: str) -> int:
    if not (column.isascii() and column.isdigit()):
        raise ValueError(f"{column!r} is not a whole number")
    return int(column)


def _text(column: str) -> str:
    if column == _EMPTY:
        return ""
    if "%" not in column:
        return column
    # Strict but for surrogates (see _text_column): a table pyabouts wrote holds UTF-8.
    return unquote(column, errors="surrogatepass")


def _flags(column: str) -> dict[str, bool]:
    names = [] if column == _EMPTY else column.split(",")
    if unknown := set(names) - {"sticky", "reserved"}:
        raise ValueError(f"unknown flags {sorted(unknown)}")
    return {name: True for name in names}


def _entries_of_objects(key: BlockKey, allocations: dict[str, Any]) -> dict[int, Owner]:
    """The entries of the earlier form: {offset: {containerID, ifname, podRef, ...}}."""
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
    return entries


def _decimal(value: object) -> int:
    return int(value) if isinstance(value, str) and value.isdigit() else 0


def _whole_number(value: object) -> int:
    """A count or a time as stored; 0 (not recorded) for anything else, as these only inform."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _corrupt(key: BlockKey, reason: str) -> CniError:
    return CniError(CORRUPT_BLOCK, f"stored block {block_cidr(key)} is malformed: {reason}")
