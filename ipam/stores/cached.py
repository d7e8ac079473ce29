"""A PoolStore that keeps the blocks it has seen, for one long-lived process.

Every write still goes to the backing store as a compare-and-swap, so the cache can only make a
write fail (a conflict), never succeed wrongly: after a conflict, the blocks that conflicted are
read afresh (one block each: a GET on Kubernetes, not a LIST of the pool) on the next read.
Meant for the node agent and bulk drivers; a one-shot plugin process reads its pools directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from pyabouts.ipam.pool import BLOCK_SIZE, Block, BlockKey, PoolId
from pyabouts.ipam.store import PoolStore, WriteOutcome

_WHOLE_SPACE = (0, (1 << 128) - 1)


class CachedStore:
    """Safe for threads working on different pools at once (the agent's batches); the I/O is
    done outside its lock.

    A compare-and-swap only guards the blocks a decision writes. A decision that depends on a
    block it does not write (this pod already holds an address elsewhere in the pool, written
    by another process) could act on a stale copy of it; `max_age` bounds how stale: a pool
    read longer ago than that is read whole again.
    """

    def __init__(self, backing: PoolStore, *, max_age: float | None = None) -> None:
        self._backing = backing
        self._max_age = max_age
        self._read_at: dict[PoolId, float] = {}
        self._pools: dict[PoolId, dict[BlockKey, Block]] = {}
        self._stale: dict[PoolId, set[BlockKey]] = {}  # blocks somebody else wrote meanwhile
        self._lock = threading.Lock()
        self.reads = 0  # backing reads, for figures

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        with self._lock:
            blocks = self._pools.get(pool)
            stale = self._stale.pop(pool, set())
            read_at = self._read_at.get(pool, 0.0)
        if self._max_age is not None and time.monotonic() - read_at > self._max_age:
            blocks = None
        if blocks is not None and stale:
            blocks = self._refresh(pool, blocks, stale)
        if blocks is None:
            began = time.monotonic()
            loaded = self._backing.read_blocks(pool, *_WHOLE_SPACE)
            blocks = {b.key: b for b in loaded}
            with self._lock:
                self.reads += 1
                self._pools[pool] = blocks
                self._stale.pop(pool, None)
                self._read_at[pool] = began
        low = BlockKey.of(pool, first).base
        # The blocks themselves, not copies: PoolView never changes what it is given.
        return [b for key, b in sorted(blocks.items()) if low <= key.base <= last]

    def _refresh(
        self, pool: PoolId, blocks: dict[BlockKey, Block], stale: set[BlockKey]
    ) -> dict[BlockKey, Block]:
        fresh = dict(blocks)
        try:
            for key in stale:
                fresh.pop(key, None)
                for block in self._backing.read_blocks(pool, key.base, key.base + BLOCK_SIZE - 1):
                    fresh[block.key] = block
        except Exception:
            self.forget(pool)
            raise
        with self._lock:
            self.reads += len(stale)
            if self._pools.get(pool) is blocks:  # nobody replaced it meanwhile
                self._pools[pool] = fresh
        return fresh

    def cached_blocks(self) -> list[Block]:
        """The blocks of every pool read so far, as last seen: for usage figures."""
        with self._lock:
            return [b for blocks in self._pools.values() for b in blocks.values()]

    def read_all_blocks(self) -> list[Block]:
        return self._backing.read_all_blocks()  # a rare, whole-store read: never cached

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        try:
            outcome = self._backing.write_blocks(blocks)
        except Exception:
            # Unknown whether it was written: read these pools afresh.
            for block in blocks:
                self.forget(block.key.pool)
            raise
        with self._lock:
            for block in blocks:
                revision = outcome.revisions.get(block.key)
                cached = self._pools.get(block.key.pool)
                if revision is not None and cached is not None:
                    block.revision = revision
                    # A new dict, not a change in place: readers iterate the one they got.
                    self._pools[block.key.pool] = {**cached, block.key: block}
            for key in outcome.conflicts:
                if key.pool in self._pools:
                    self._stale.setdefault(key.pool, set()).add(key)
        return outcome

    def forget(self, pool: PoolId) -> None:
        """Read `pool` afresh next time (someone else is known to have written it)."""
        with self._lock:
            self._pools.pop(pool, None)
            self._stale.pop(pool, None)

    def close(self) -> None:
        self._backing.close()
