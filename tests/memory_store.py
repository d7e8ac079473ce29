"""An in-memory PoolStore with the same compare-and-swap semantics as the real ones.

For fast unit tests only; the same contract suite runs against real etcd (and the apiserver).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence

from pyabouts.ipam.pool import Block, BlockKey, PoolId
from pyabouts.ipam.store import OnUnreadable, WriteOutcome


class MemoryStore:
    def __init__(self) -> None:
        self.blocks: dict[BlockKey, Block] = {}
        self.writes = 0
        self.conflicts = 0
        self._versions = itertools.count(1)
        self._lock = threading.Lock()

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        with self._lock:
            return [
                b.copy()
                for k, b in sorted(self.blocks.items())
                if k.pool == pool and BlockKey.of(pool, first).base <= k.base <= last
            ]

    def read_all_blocks(self, *, on_unreadable: OnUnreadable | None = None) -> list[Block]:
        with self._lock:
            return [b.copy() for _, b in sorted(self.blocks.items())]

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        with self._lock:
            stale = [
                b.key
                for b in blocks
                if (self.blocks[b.key].revision if b.key in self.blocks else None) != b.revision
            ]
            if stale:
                self.conflicts += 1
                return WriteOutcome(conflicts=stale)
            outcome = WriteOutcome()
            for block in blocks:
                stored = self.blocks[block.key] = block.copy()
                stored.revision = outcome.revisions[block.key] = str(next(self._versions))
            self.writes += 1
            return outcome

    def remove_block(self, block: Block) -> bool:
        with self._lock:
            stored = self.blocks.get(block.key)
            if stored is None or stored.revision != block.revision:
                return False
            del self.blocks[block.key]
            return True

    def close(self) -> None:
        pass

    def snapshot(self) -> dict[BlockKey, dict[int, object]]:
        """Everything stored, for tests that check a request changed nothing."""
        with self._lock:
            return {k: dict(b.entries) for k, b in self.blocks.items()}


class BlockByBlockStore(MemoryStore):
    """Writes as the Kubernetes store does, one block at a time until one conflicts. Before a
    write it first runs what `meanwhile` holds: another writer landing between a read and it."""

    def __init__(self) -> None:
        super().__init__()
        self.meanwhile: list[Callable[[], object]] = []
        self.stored: list[list[PoolId]] = []  # per write asked for, the pools of what it stored

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        while self.meanwhile:
            self.meanwhile.pop()()
        outcome, stored = WriteOutcome(), []
        for block in blocks:
            one = super().write_blocks([block])
            if one.conflicts:
                outcome.conflicts.extend(one.conflicts)
                break
            outcome.revisions.update(one.revisions)
            stored.append(block.key.pool)
        self.stored.append(stored)
        return outcome
