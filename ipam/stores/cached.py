"""A PoolStore that keeps the blocks it has seen, for one long-lived process.

Every write it sends to the backing store is still a compare-and-swap, so the cache can only
make a write fail (a conflict), never succeed wrongly: after a conflict, the blocks that
conflicted are read afresh (one block each: a GET on Kubernetes, not a LIST of the pool) on the
next read.
Meant for the node agent and bulk drivers; a one-shot plugin process reads its pools directly.

Fed by a BlockFeed (ipam.store), the cache also learns which blocks somebody else wrote, as they
are written: a pool as old as max_age is then read again only where it changed, and one nobody
else wrote costs no read at all however long it rested; and a write of a block the feed has
already reported written (or deleted) since the copy it was decided on is not sent, since it
could only be refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pyabouts.ipam.pool import BLOCK_SIZE, Block, BlockKey, PoolId
from pyabouts.ipam.store import BlockFeed, OnUnreadable, PoolStore, WriteOutcome, later_revision

_WHOLE_SPACE = (0, (1 << 128) - 1)


@dataclass(frozen=True, slots=True)
class _Changes:
    blocks: set[BlockKey]
    new: bool


@dataclass(frozen=True, slots=True)
class _Stored:
    """A block's revision as the feed last reported it."""

    revision: str
    deleted: bool = False


class CachedStore:
    """Safe for threads working on different pools at once (the agent's batches); the I/O is
    done outside its lock.

    A compare-and-swap only guards the blocks a decision writes. A decision that depends on a
    block it does not write (this pod already holds an address elsewhere in the pool, written
    by another process) could act on a stale copy of it; `max_age` bounds how stale: a pool
    read longer ago than that is read whole again. With a live feed, such a pool is compared
    with the revisions the feed reported instead: nothing is read when none of its blocks
    changed, one GET when one did, the whole pool when several did or the feed knows a block
    of it that is not cached. Every `max_age_fed` it is read whole all the same.
    """

    def __init__(
        self,
        backing: PoolStore,
        *,
        max_age: float | None = None,
        feed: BlockFeed | None = None,
        max_age_fed: float | None = None,
        on_overtaken: Callable[[int], None] | None = None,
    ) -> None:
        """`feed`: the tags of the BlockFeed that will report to this cache (its follower calls
        feed_listed, feed_changed, feed_lost); while it is live, `max_age_fed` applies instead
        of `max_age`, a bound in case the feed silently stopped. `on_overtaken`: told how many
        blocks a write did not send because the feed showed them changed (see write_blocks)."""
        self._backing = backing
        self._max_age = max_age
        self._read_at: dict[PoolId, float] = {}  # when it was last read whole
        self._checked_at: dict[PoolId, float] = {}  # when it was last compared with the feed
        self._pools: dict[PoolId, dict[BlockKey, Block]] = {}
        self._stale: dict[PoolId, set[BlockKey]] = {}  # blocks somebody else wrote meanwhile
        self._kept_at: dict[BlockKey, float] = {}  # when each cached block was last kept
        self._lock = threading.Lock()
        self.reads = 0  # backing reads, for figures
        self._feed = feed
        self._max_age_fed = max_age_fed
        # pool tag -> block tag -> as the feed last reported it; None while the feed is not live.
        self._fed: dict[str, dict[str, _Stored]] | None = None
        self._tags: dict[BlockKey, str] = {}
        self._pool_tags: dict[PoolId, str] = {}
        self._held_back: dict[BlockKey, str] = {}  # the feed's revision each was last held at
        self._on_overtaken = on_overtaken
        self._forgotten: dict[PoolId, int] = {}  # how many times each pool was forgotten

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        now = time.monotonic()
        with self._lock:
            blocks = self._pools.get(pool)
            stale = self._stale.pop(pool, set())
            read_at = self._read_at.get(pool, 0.0)
            checked_at = self._checked_at.get(pool, read_at)
            # As old as a pool may be: read it whole, or what the feed says changed since.
            max_age = self._max_age
            due = blocks is not None and max_age is not None and now - checked_at > max_age
            changed = self._changed_since_read(pool, blocks) if blocks is not None and due else None
        if due:
            if changed is None or (self._max_age_fed and now - read_at > self._max_age_fed):
                blocks = None  # no feed, or one not to be trusted for ever: read it whole
            elif changed.new or len(changed.blocks) > 1:
                blocks = None  # one LIST rather than a GET each
            else:
                stale |= changed.blocks
        # A pool counts as checked only once what the check asked for was read and kept: a read
        # that failed, or was overtaken, leaves it due, so the next read checks again.
        if blocks is not None and stale:
            blocks = self._refresh(pool, blocks, stale, checked=now if due else None)
        elif blocks is not None and due:
            with self._lock:
                if self._pools.get(pool) is blocks:
                    self._checked_at[pool] = now
        if blocks is None:
            began = time.monotonic()
            with self._lock:
                forgotten = self._forgotten.get(pool, 0)
            loaded = self._backing.read_blocks(pool, *_WHOLE_SPACE)
            with self._lock:
                self.reads += 1
                if self._forgotten.get(pool, 0) != forgotten:
                    # Forgotten while on its way (recheck): what it read stands for this read
                    # alone, and the next one reads afresh.
                    return _in_span({b.key: b for b in loaded}, pool, first, last)
                # Merged, not stored over: a write or read of this pool that ended while this
                # one was on its way may have kept a newer copy of a block.
                blocks = self._merge(pool, {b.key: b for b in loaded}, whole_since=began)
                self._stale.pop(pool, None)
                self._read_at[pool] = self._checked_at[pool] = began
        return _in_span(blocks, pool, first, last)

    def _refresh(
        self,
        pool: PoolId,
        blocks: dict[BlockKey, Block],
        stale: set[BlockKey],
        *,
        checked: float | None,
    ) -> dict[BlockKey, Block]:
        fresh = dict(blocks)
        began = time.monotonic()
        try:
            for key in stale:
                fresh.pop(key, None)
                for block in self._backing.read_blocks(pool, key.base, key.base + BLOCK_SIZE - 1):
                    fresh[block.key] = block
        except Exception:
            self.forget(pool)
            raise
        read_again = {key: fresh[key] for key in stale if key in fresh}
        with self._lock:
            self.reads += len(stale)
            if self._pools.get(pool) is blocks:  # nobody replaced it meanwhile
                self._pools[pool] = fresh
                self._kept_at.update(dict.fromkeys(read_again, time.monotonic()))
                if checked is not None:
                    self._checked_at[pool] = checked
            elif pool in self._pools:  # replaced: what was read again still counts
                fresh = self._merge(pool, read_again)
                for key in stale - read_again.keys():  # found deleted, and not kept since
                    if self._kept_at.get(key, 0.0) < began:
                        fresh.pop(key, None)  # not seen by any reader yet: under the lock since
                        self._kept_at.pop(key, None)
        return fresh

    def cached_blocks(self) -> list[Block]:
        """The blocks of every pool read so far, as last seen: for usage figures."""
        with self._lock:
            return [b for blocks in self._pools.values() for b in blocks.values()]

    def read_all_blocks(self, *, on_unreadable: OnUnreadable | None = None) -> list[Block]:
        # A rare, whole-store read: never cached.
        return self._backing.read_all_blocks(on_unreadable=on_unreadable)

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        # Blocks the feed reports written (or deleted) since the copies this write was decided
        # on would be refused: nothing is sent, and they count as the conflicts they would be.
        # On Kubernetes a refused PUT costs kube-apiserver about what a stored one does.
        overtaken = self._overtaken(blocks)
        if overtaken:
            with self._lock:
                for key in overtaken:
                    if key.pool in self._pools:
                        self._stale.setdefault(key.pool, set()).add(key)
            if self._on_overtaken is not None:
                self._on_overtaken(len(overtaken))
            return WriteOutcome(conflicts=overtaken)
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
                if revision is not None and block.key.pool in self._pools:
                    block.revision = revision
                    self._merge(block.key.pool, {block.key: block})
            for key in outcome.conflicts:
                if key.pool in self._pools:
                    self._stale.setdefault(key.pool, set()).add(key)
        return outcome

    def _overtaken(self, blocks: Sequence[Block]) -> list[BlockKey]:
        """Those of `blocks` whose stored object the feed reports at a later revision than the
        one they were decided on, or at all for one to be created, each once per report: a
        block read again and found as it was decided (a deletion the feed has not reported
        yet) is sent at the next try, for its compare-and-swap to settle."""
        with self._lock:
            feed, fed = self._feed, self._fed
            if feed is None or fed is None:
                return []
            overtaken = []
            for block in blocks:
                stored = fed.get(self._pool_tag(feed, block.key.pool), {}).get(
                    self._tag(feed, block.key)
                )
                if stored is None or not stored.revision.isdigit():
                    continue
                if block.revision is None:
                    if stored.deleted:
                        continue
                elif not block.revision.isdigit() or int(stored.revision) <= int(block.revision):
                    continue
                if self._held_back.get(block.key) != stored.revision:
                    self._held_back[block.key] = stored.revision
                    overtaken.append(block.key)
            return overtaken

    def _pool_tag(self, feed: BlockFeed, pool: PoolId) -> str:
        """`feed`'s tag of `pool`, kept. Under the lock."""
        tag = self._pool_tags.get(pool)
        if tag is None:
            tag = self._pool_tags[pool] = feed.pool_tag(pool)
        return tag

    def _tag(self, feed: BlockFeed, key: BlockKey) -> str:
        """`feed`'s tag of block `key`, kept. Under the lock."""
        tag = self._tags.get(key)
        if tag is None:
            tag = self._tags[key] = feed.block_tag(key)
        return tag

    def _merge(
        self, pool: PoolId, blocks: dict[BlockKey, Block], *, whole_since: float | None = None
    ) -> dict[BlockKey, Block]:
        """Keep `blocks` in `pool`'s cache, each unless a later revision of it is there; the
        pool's blocks now. `whole_since`: `blocks` are the whole pool as read from then, so a
        cached block they lack is gone (deleted), unless it was kept since (written meanwhile).
        A new dict, not a change in place: readers iterate the one they got. Under the lock."""
        cached = self._pools.get(pool, {})
        merged = {
            key: block
            for key, block in cached.items()
            if whole_since is None or key in blocks or self._kept_at.get(key, 0.0) >= whole_since
        }
        for key in cached.keys() - merged.keys():
            self._kept_at.pop(key, None)  # gone from the store
        now = time.monotonic()
        for key, block in blocks.items():
            kept = merged.get(key)
            if kept is None or later_revision(block.revision, kept.revision):
                merged[key] = block
                self._kept_at[key] = now
        self._pools[pool] = merged
        return merged

    def feed_listed(self, revisions: Mapping[tuple[str, str], str]) -> None:
        fed: dict[str, dict[str, _Stored]] = {}
        for (pool_tag, block_tag), revision in revisions.items():
            fed.setdefault(pool_tag, {})[block_tag] = _Stored(revision)
        with self._lock:
            self._fed = fed

    def feed_changed(self, pool_tag: str, block_tag: str, revision: str, *, deleted: bool) -> None:
        with self._lock:
            if self._fed is not None:
                self._fed.setdefault(pool_tag, {})[block_tag] = _Stored(revision, deleted)

    def feed_lost(self) -> None:
        with self._lock:
            self._fed = None  # max_age again, from when each pool was last read or checked

    def _changed_since_read(self, pool: PoolId, blocks: dict[BlockKey, Block]) -> _Changes | None:
        """What the feed saw change in `pool` since its blocks were read: the cached blocks
        written or deleted since (or that it does not know: deleted before it listed them, or
        created here and not reported yet), and whether it knows a block that is not cached
        (somebody else created it). None while the feed is not live. Under the lock."""
        if self._fed is None or self._feed is None:
            return None
        fed = self._fed.get(self._pool_tag(self._feed, pool), {})
        changed = set()
        for key, block in blocks.items():
            stored = fed.get(self._tag(self._feed, key))
            if stored is None or stored.deleted or later_revision(stored.revision, block.revision):
                changed.add(key)
        cached = {self._tags[key] for key in blocks}
        new = any(not stored.deleted and tag not in cached for tag, stored in fed.items())
        return _Changes(changed, new)

    def recheck(self, pool: PoolId, fresh: bool = True) -> None:
        """Check `pool` against the store before its next use (a decision on it wrote nothing,
        so no compare-and-swap checked what it read): read whole, or unless `fresh`, with a
        live feed, only the blocks it reports written since they were read (none when nobody
        else wrote), which is the store's state but for what the feed has not reported yet."""
        with self._lock:
            fed = self._fed is not None and self._max_age is not None and pool in self._pools
            if fed and not fresh:
                self._checked_at[pool] = float("-inf")  # due now: compared with the feed
                return
        self.forget(pool)

    def forget(self, pool: PoolId) -> None:
        """Read `pool` afresh next time (someone else is known to have written it), and keep
        nothing of a whole read of it already on its way."""
        with self._lock:
            self._forgotten[pool] = self._forgotten.get(pool, 0) + 1
            for key in self._pools.pop(pool, {}):
                self._kept_at.pop(key, None)
            self._stale.pop(pool, None)

    def close(self) -> None:
        self._backing.close()


def _in_span(blocks: Mapping[BlockKey, Block], pool: PoolId, first: int, last: int) -> list[Block]:
    """The blocks of [first, last] in address order: the blocks themselves, not copies
    (PoolView never changes what it is given)."""
    low = BlockKey.of(pool, first).base
    return [b for key, b in sorted(blocks.items()) if low <= key.base <= last]
