"""The stored state of address pools, and the working view the allocator decides against.

A pool is the address space of one `network_name` and IP family. It is stored in blocks: aligned
runs of BLOCK_SIZE addresses, one stored object each, created when the first address in them is
given. Two ranges that overlap share the blocks of the addresses they share, so an address is
never given twice across overlapping ranges of one network (whereabouts' overlapping-range
protection) without any extra reservation object. Identical ranges are one pool whatever
`enable_overlapping_ranges` says, as whereabouts keys its IPPool by range; pyabouts keeps the
overlap check for different ranges too (see ipam.config).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

Family = Literal[4, 6]

BLOCK_BITS = 8
BLOCK_SIZE = 1 << BLOCK_BITS  # 256 entries keep a stored block near 30 KiB


@dataclass(frozen=True, slots=True, order=True)
class PoolId:
    network: str  # network_name ("" is whereabouts' default)
    family: Family


@dataclass(frozen=True, slots=True, order=True)
class BlockKey:
    pool: PoolId
    base: int  # the first address of the block; a multiple of BLOCK_SIZE

    @staticmethod
    def of(pool: PoolId, address: int) -> BlockKey:
        return BlockKey(pool, address >> BLOCK_BITS << BLOCK_BITS)


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds an address: one interface of one sandbox, the pod it belongs to, and the node
    and network configuration it was made by (what CNI GC is scoped to)."""

    container_id: str
    ifname: str
    pod: str = ""  # "namespace/name" when the runtime said (K8S_POD_*), else ""
    pod_uid: str = ""  # K8S_POD_UID: tells a re-created pod of the same name from the old one
    node: str = ""  # the node that allocated it; "" in entries stored before nodes were recorded
    cni_network: str = ""  # the network configuration's `name` it was allocated for
    # When it was given (Unix seconds; 0: not recorded). Not part of who holds it: an ADD that
    # finds its own entry leaves it, time and all.
    allocated_at: int = field(default=0, compare=False)
    # The config's release_cooldown when it was given (seconds): how long the address rests
    # once released, whoever releases it (DEL, GC or the reconciler).
    cooldown: int = field(default=0, compare=False)
    # The config's sticky_statefulsets when it was given: a DEL keeps the address reserved for
    # the pod's name, and the reconciler frees it when no StatefulSet needs that name.
    sticky: bool = field(default=False, compare=False)
    # Non-zero on an address released and resting until then (Unix seconds): nobody holds it
    # (container_id is ""), and only the pod interface that had it may take it before then.
    cooling_until: int = 0
    # True on an address its pod released while sticky: no sandbox holds it (container_id is
    # ""), and only a pod of the same name and interface may take it.
    reserved: bool = False

    @property
    def cooling(self) -> bool:
        return self.cooling_until > 0

    @property
    def in_use(self) -> bool:
        """Held by a sandbox: neither resting after its release nor reserved for its pod."""
        return not (self.cooling_until > 0 or self.reserved)

    @property
    def attachment(self) -> tuple[str, str]:
        """The identity ADD is idempotent on: the pod's interface, or the sandbox's when no pod."""
        return (self.pod or f"container:{self.container_id}", self.ifname)


@dataclass(slots=True)
class Block:
    """One stored block: address -> owner, and the store's version of it (None: not stored).

    `range_text`, `capacity` and `range_size` are for people reading the store: the configured
    range that last wrote the block, how many of the block's addresses that range may give, and
    how many it may give in all (0: not recorded).
    Change `entries` only through put() and pop(), which keep the owner index current.
    """

    key: BlockKey
    entries: dict[int, Owner] = field(default_factory=dict)
    revision: str | None = None
    range_text: str = ""
    capacity: int = 0
    range_size: int = 0
    # identity -> the addresses it holds here; tuples, so that copy() shares them and a block
    # copied to be changed (every write) keeps its index rather than building it again.
    _holders: dict[tuple[str, str], tuple[int, ...]] | None = field(
        default=None, init=False, compare=False, repr=False
    )

    @property
    def last(self) -> int:
        return self.key.base + BLOCK_SIZE - 1

    def copy(self) -> Block:
        copied = Block(
            self.key,
            dict(self.entries),
            self.revision,
            self.range_text,
            self.capacity,
            self.range_size,
        )
        if self._holders is not None:
            copied._holders = dict(self._holders)
        return copied

    def held_by(self, identity: tuple[str, str]) -> tuple[int, ...]:
        """Addresses of this block held under `identity` (see _identities); built on first use."""
        holders = self._holders
        if holders is None:
            # Built aside and published whole: other threads may read this (cached) block.
            holders = self._holders = _holders_of(self.entries)
        return holders.get(identity, ())

    def put(self, address: int, owner: Owner) -> None:
        self.pop(address)
        self.entries[address] = owner
        if self._holders is not None:
            _add_holder(self._holders, address, owner)

    def pop(self, address: int) -> Owner | None:
        owner = self.entries.pop(address, None)
        if owner is not None and self._holders is not None:
            for identity in _identities(owner):
                rest = tuple(a for a in self._holders.get(identity, ()) if a != address)
                if rest:
                    self._holders[identity] = rest
                else:
                    self._holders.pop(identity, None)
        return owner


class PoolView:
    """The blocks that were read, as the allocator sees them; it remembers what it changed.

    Blocks that were not read are taken as empty. That is safe: writing such a block back is a
    create, which the store refuses if somebody else created it first. The view never changes
    the blocks it was given: it copies a block the first time it changes it, so a caller may
    hand it blocks it keeps (a cache), and building a view costs one step per block, not per
    address.
    """

    def __init__(self, blocks: Iterable[Block]) -> None:
        self._blocks = {b.key: b for b in blocks}
        self._changed: set[BlockKey] = set()  # the blocks this view copied and changed
        # What each change replaced, so decisions can be undone back to a savepoint: a block's
        # (key, block before its copy or None), or an entry's (key, address, previous owner).
        self._journal: list[tuple[BlockKey, Block | None] | tuple[BlockKey, int, Owner | None]]
        self._journal = []
        # The pool's blocks in address order, so spans are walked without looking at empty ones.
        self._bases: dict[PoolId, list[int]] = {}
        for key in sorted(self._blocks):
            self._bases.setdefault(key.pool, []).append(key.base)

    def owner(self, pool: PoolId, address: int) -> Owner | None:
        block = self._blocks.get(BlockKey.of(pool, address))
        return block.entries.get(address) if block else None

    def assign(self, pool: PoolId, address: int, owner: Owner) -> None:
        previous = self.owner(pool, address)
        if previous != owner:
            key = BlockKey.of(pool, address)
            self._writable(key).put(address, owner)
            self._journal.append((key, address, previous))

    def unassign(self, pool: PoolId, address: int) -> None:
        previous = self.owner(pool, address)
        if previous is not None:
            key = BlockKey.of(pool, address)
            self._writable(key).pop(address)
            self._journal.append((key, address, previous))

    def savepoint(self) -> int:
        """A mark to roll back to: several decisions can share one view (and one write), and
        one that fails leaves nothing behind."""
        return len(self._journal)

    def rollback(self, mark: int) -> None:
        """Undo every change made since `savepoint()` returned `mark`."""
        while len(self._journal) > mark:
            change = self._journal.pop()
            if len(change) == 3:
                key, address, previous = change
                if previous is None:
                    self._blocks[key].pop(address)
                else:
                    self._blocks[key].put(address, previous)
                continue
            key, original = change
            self._changed.discard(key)
            if original is None:
                del self._blocks[key]
                self._bases[key.pool].remove(key.base)
            else:
                self._blocks[key] = original

    def held_by(self, pool: PoolId, identity: tuple[str, str]) -> set[int]:
        """Addresses held under `identity`: an Owner.attachment or a container_identity()."""
        held: set[int] = set()
        for base in self._bases.get(pool, ()):
            held.update(self._blocks[BlockKey(pool, base)].held_by(identity))
        return held

    def entries(self, pool: PoolId, first: int, last: int) -> Iterator[tuple[int, Owner]]:
        """Every assigned address in [first, last], in address order."""
        for base in self._bases.get(pool, ()):
            if base + BLOCK_SIZE <= first or base > last:
                continue
            block = self._blocks[BlockKey(pool, base)]
            for address in sorted(block.entries):
                if first <= address <= last:
                    yield address, block.entries[address]

    def first_free(self, pool: PoolId, first: int, last: int) -> int | None:
        """The lowest unassigned address in [first, last]; full blocks are skipped whole."""
        address = first
        while address <= last:
            block = self._blocks.get(BlockKey.of(pool, address))
            if block is None or address not in block.entries:
                return address
            block_last = min(last, block.last)
            if len(block.entries) < BLOCK_SIZE:
                for candidate in range(address + 1, block_last + 1):
                    if candidate not in block.entries:
                        return candidate
            address = block_last + 1
        return None

    def changed_blocks(self) -> list[Block]:
        """The changed blocks, to be written; the view must not be used after this."""
        return [self._blocks[key] for key in sorted(self._changed)]

    def _writable(self, key: BlockKey) -> Block:
        if key not in self._changed:
            block = self._blocks.get(key)
            if block is None:
                bisect.insort(self._bases.setdefault(key.pool, []), key.base)
            self._blocks[key] = block.copy() if block else Block(key)
            self._changed.add(key)
            self._journal.append((key, block))
        return self._blocks[key]


def container_identity(container_id: str, ifname: str) -> tuple[str, str]:
    """The identity DEL, CHECK and GC go by: one interface of one sandbox."""
    return (f"id:{container_id}", ifname)


def _holders_of(entries: dict[int, Owner]) -> dict[tuple[str, str], tuple[int, ...]]:
    """Block.held_by's index of `entries`: in one pass where each identity holds one address
    of the block, as nearly all do."""
    pairs = [(identity, a) for a, owner in entries.items() for identity in _identities(owner)]
    holders: dict[tuple[str, str], tuple[int, ...]] = {i: (a,) for i, a in pairs}
    if len(holders) < len(pairs):  # an identity holding several (addresses resting, say)
        holders = {}
        for identity, address in pairs:
            _hold(holders, identity, address)
    return holders


def _add_holder(
    holders: dict[tuple[str, str], tuple[int, ...]], address: int, owner: Owner
) -> None:
    for identity in _identities(owner):
        _hold(holders, identity, address)


def _hold(
    holders: dict[tuple[str, str], tuple[int, ...]], identity: tuple[str, str], address: int
) -> None:
    holders[identity] = (*holders.get(identity, ()), address)


def _identities(owner: Owner) -> tuple[tuple[str, str], tuple[str, str]]:
    return owner.attachment, container_identity(owner.container_id, owner.ifname)
