"""Writes of a node's own slices: answered once in the node's journal, stored behind.

Under node slices (`node_slice_size`) the free addresses of a slice are given by the agent of
the node that holds it alone, as long as every config of the network cuts the same range into
slices of the same size: the registry says no other node looks there. So a decision that gives
only addresses of the node's own slices need not wait for the datastore, whether its block
(256 addresses) lies in one slice or holds several nodes' slices (slices of /25 or smaller):
another node's changes of the block are of its own slices, and a flush applies this node's
changes over them. A release may be kept of any address of such a block: no node gives an
address its view shows held, and a flush leaves an address that changed meanwhile as stored.
With --write-behind the agent keeps it
(PendingWrites): in memory, as the view every later decision reads, and as a line in a journal
file beside its socket, which a restarted agent reads again. A flusher stores the pending
changes every fraction of a second, many decisions in one compare-and-swap. Writes of every
other block (the slice registry, pools without slices, a block none of the node's slices
overlaps) go to the datastore before the answer, as without it; so do a decision that gives an
address outside the node's slices (another config's slice of the block, say; it waits for the
changes kept before, and the block's changes are then stored before their answers a while so
that it gets its turn) and those of a block decided on a view not read since the agent last
stored that block itself (its creation, say), which the datastore's compare-and-swap then
checks. After the agent starts, that holds for every block until it has stored a write of it
itself: a write sent before (by the agent that crashed, or a plugin served in-process) may
still be on its way, and can no longer land once one of the agent's own has been stored.

The datastore still has the last word. A flush applies each change only over what the decision
saw, so what the reconciler freed meanwhile stays free and an address somebody else stored
meanwhile (a config of the range without slices) is never taken over: that is a clash, logged
and counted, and while the block holds another node's address in this node's slices its
changes are stored before their answers again (one waits for the flush of those kept before).

A flush notes each block it has stored in the journal at once (a line saying how many of the
block's changes are stored), before the journal is rewritten without them: an agent that dies
in between must not apply them again over what changed since (an address the reconciler
freed, given to another pod meanwhile).

The journal is on /run (a tmpfs), on purpose: it outlives the agent (a crash, an upgrade), not
the node. A node that restarts has lost its sandboxes too, so the addresses it had not stored
yet are held by nobody.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyabouts.ipam.errors import CniError, StoreUnavailableError
from pyabouts.ipam.pool import BLOCK_SIZE, Block, BlockKey, Owner, PoolId
from pyabouts.ipam.slices import SLICE_IFNAME, is_registry, slice_span
from pyabouts.ipam.store import OnUnreadable, PoolStore, WriteOutcome, later_revision
from pyabouts.ipam.stores.codec import owner_columns, owner_from_columns

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
# What is pending may wait this long for the datastore; then the node takes no new change
# (code 11) until it is stored, as with every write stored before its answer.
MAX_PENDING_SECONDS = 15.0
# A journal a flush could not rewrite (a full /run) is tried again this often while nothing is
# pending: not at every flush, each a warning.
JOURNAL_REPAIR_SECONDS = 10.0
# How long a block's decisions go to the datastore before their answers once one that gives an
# address outside the node's slices waited there for the changes kept before it: longer than
# the longest wait between its tries (ipam.transaction.BACKOFF_MAX), so that it gets its turn.
DRAIN_SECONDS = 1.0
# The revisions of blocks with changes pending: the view's own, never the datastore's.
PENDING = "pending-"


@dataclass(frozen=True, slots=True)
class Change:
    """One address of a block as a decision changed it: what it saw there, what it left."""

    address: int
    before: Owner | None
    after: Owner | None


@dataclass(slots=True)
class _Slices:
    """The slices one registry block records, as (pool, first, last) each."""

    revision: str | None
    mine: list[tuple[PoolId, int, int]] = field(default_factory=list)
    others: list[tuple[PoolId, int, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FlushOutcome:
    stored: int  # changes now in the datastore
    left: int  # changes still pending (a conflict or an error: the next flush tries again)
    clashes: int  # changes dropped: somebody else holds the address


class PendingWrites:
    """What this node's agent decided on the blocks of its own slices and has not stored yet.

    Thread-safe; flushes run one at a time. `journal`: the file that keeps the pending changes
    across agent restarts (read at construction; its directory must exist); `node`: the
    agent's node name, whose slices it defers.
    """

    def __init__(
        self,
        journal: Path,
        node: str,
        *,
        defer: bool = True,
        max_pending: float = MAX_PENDING_SECONDS,
        on_clash: Callable[[], None] = lambda: None,
        repair_every: float = JOURNAL_REPAIR_SECONDS,
        drain_seconds: float = DRAIN_SECONDS,
    ) -> None:
        """`defer`: False keeps nothing new but changes of blocks with changes still pending
        from the journal (decided on a view holding them), until those are stored.
        `max_pending`: how long a block's changes may wait for the datastore before the block
        takes no new one. `repair_every`: how often a journal a flush could not rewrite is
        tried again while nothing is pending. `drain_seconds`: see DRAIN_SECONDS."""
        self._path = journal
        self._node = node
        self._defer = defer
        self._max_pending = max_pending
        # Per block with changes pending: when its oldest was kept (at most).
        self._pending_since: dict[BlockKey, float] = {}
        self._journal_broken = False  # an append failed, and no rewrite has repaired it yet
        self._repair_every = repair_every
        # Blocks a decision that gives outside the node's slices waits on: none of their
        # changes is kept until those pending are stored (None), and then, until the time
        # noted, their decisions are stored before their answers, the waiting one's too. (A
        # stream of ADDs kept in the node's own slice of the block would keep it waiting.)
        self._draining: dict[BlockKey, float | None] = {}
        self._drain_seconds = drain_seconds
        self._repair_after = 0.0  # when a flush with nothing pending tries the rewrite again
        self._on_clash = on_clash
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # a flush's work list is the pending one: one at once
        self._tokens = itertools.count(1)
        # Per block: changes decided and not stored yet, in order.
        self._pending: dict[BlockKey, list[Change]] = {}
        # Per block tracked (held, or with changes pending): the block decisions see (the
        # stored one with the pending changes over it) and the stored revision it is built on.
        self._latest: dict[BlockKey, Block] = {}
        self._built_on: dict[BlockKey, str | None] = {}
        # Per block, the newest stored revision this agent knows (read, or written itself): a
        # block is tracked only from a read at least that new, so no decision is kept on a
        # state a later one replaced.
        self._newest: dict[BlockKey, str] = {}
        # This agent's own writes stored before their answer (a block not held yet, say): how
        # many are in flight per block, the order (split's) of the newest whose outcome is
        # known, and the blocks it may or may not have changed (it failed, or met a conflict a
        # resent request may have caused) until one is stored. A decision on a state such a
        # write changed must not be kept unchecked: the block is written directly meanwhile,
        # and the datastore's compare-and-swap checks it.
        self._writing: dict[BlockKey, int] = {}
        self._write_order = itertools.count(1)
        self._last_written: dict[BlockKey, int] = {}
        self._unsure: set[BlockKey] = set()
        # The blocks this agent has stored a write of itself (a compare-and-swap) since it
        # started. Until then a block is unsure too: a write sent before the start (the agent
        # that crashed, a plugin served in-process) may still land on the state this agent
        # read; once a write of its own is stored over that state, none sent before can be.
        # (But for a create, once the reconciler has deleted the block as holding nothing: the
        # flush reads the block first, so a give kept over what such a create stored is a
        # clash, logged and counted, not an address lost from the store unseen.)
        self._proven: set[BlockKey] = set()
        # Per registry block read: its revision, the slices this node holds in it and those
        # other nodes hold, as (pool, first, last).
        self._slices: dict[BlockKey, _Slices] = {}
        self._slices_noted = 0  # how many times _slices changed: a stamp of what is known
        # Per block: whether the view of a stamp (its revision, _slices_noted) holds an address
        # another node gave in this node's slices (_given_by_others, asked at every write).
        self._others_given: dict[BlockKey, tuple[tuple[str | None, int], bool]] = {}
        self._journal: int | None = None  # its fd, open for appending
        self._recover()

    # -- the read and write paths (DeferringStore) ------------------------------------------

    def view(self, pool: PoolId, first: int, last: int, stored: list[Block]) -> list[Block]:
        """`stored` (a read of [first, last] of `pool`) as decisions must see it: each block
        this node has pending changes in with them applied, under a revision of its own."""
        with self._lock:
            found = {block.key for block in stored}
            out = []
            for block in stored:
                if is_registry(block.key.pool):
                    self._note_registry(block)
                out.append(self._seen(block))
            # Blocks the read did not find that this node knows: created here and not stored
            # yet, or stored by a flush after the read began.
            for key in self._pending.keys() | self._latest.keys():
                within = key.base <= last and key.base + BLOCK_SIZE - 1 >= first
                if key.pool == pool and key not in found and within:
                    out.append(self._seen(Block(key)))
            return out

    def split(self, blocks: Sequence[Block]) -> tuple[list[Block], list[Block], int]:
        """`blocks` as (the writes to keep here, the writes to store now, the order of the
        latter); those count as in flight until written() is told their outcome."""
        deferred: list[Block] = []
        direct: list[Block] = []
        with self._lock:
            for block in blocks:
                (deferred if self._defers(block) else direct).append(block)
            for block in direct:
                self._writing[block.key] = self._writing.get(block.key, 0) + 1
            return deferred, direct, next(self._write_order)

    def written(self, direct: Sequence[Block], order: int, outcome: WriteOutcome | None) -> None:
        """The outcome of storing `direct` (split's, of `order`), None when the write failed:
        each block written is read again before anything of it is kept."""
        with self._lock:
            for block in direct:
                key = block.key
                left = self._writing.pop(key) - 1
                if left:
                    self._writing[key] = left
                if order < self._last_written.get(key, 0):
                    continue  # a later write's outcome came first: this one is older news
                self._last_written[key] = order
                stored = outcome.revisions.get(key) if outcome is not None else None
                if stored is None:  # a conflict may be a resent request's own first attempt
                    self._unsure.add(key)
                else:
                    self._unsure.discard(key)
                    self._proven.add(key)
                    self._note_newest(key, stored)
                if key not in self._pending:
                    self._latest.pop(key, None)
                    self._built_on.pop(key, None)

    def keep(self, blocks: Sequence[Block]) -> WriteOutcome:
        """Keep the writes of `blocks` (all deferred): each one only if decided on the latest
        view of its block, with no write of the block of this agent's own on its way (one split
        off since, as the slices changed, say: it may land on the same state), and giving
        only addresses this node alone gives as far as it knows (_only_mine: a decision that
        gives another, in a block with changes pending, waits for their flush, and the block
        drains meanwhile: see _draining); else a conflict (decide again), all or none. In the
        journal before anything else, so
        that nothing is answered that the journal does not hold.
        StoreUnavailableError when the journal cannot take them, or when what is pending has
        waited longer than `max_pending` for the datastore (then the node answers code 11, as
        it would with every write stored before its answer)."""
        with self._lock:
            # First: a block whose changes wait for a datastore that takes none is an outage
            # (retried for OUTAGE_GRACE, meanwhile a flush may store them; then code 11), not
            # a conflict to retry until the call's deadline.
            now = time.monotonic()
            waited = max((now - self._pending_since.get(b.key, now) for b in blocks), default=0)
            if waited > self._max_pending:
                raise StoreUnavailableError(
                    f"this node's changes of a block have waited {waited:.0f} s to be stored "
                    "(see the agent's log): no change of it is taken before they are"
                )
            stale = [b.key for b in blocks if not self._keeps(b)]
            if stale:
                return WriteOutcome(conflicts=stale)
            if self._journal_broken:
                try:  # put right before anything is kept after a failed append
                    self._rewrite_journal()
                except OSError as exc:
                    raise StoreUnavailableError(
                        f"the journal {self._path} cannot be repaired: {exc}"
                    ) from exc
            kept = [(b, _changes(self._latest.get(b.key) or Block(b.key), b)) for b in blocks]
            self._append("".join(_journal_line(b.key, c) for b, c in kept if c))
            revisions = {}
            for block, changes in kept:
                if not changes:  # no address changed (an ADD and its DEL in one batch)
                    continue
                key = block.key
                self._built_on.setdefault(key, None)
                block.revision = revisions[key] = self._token()
                self._latest[key] = block
                self._pending.setdefault(key, []).extend(changes)
                self._pending_since.setdefault(key, now)
            return WriteOutcome(revisions=revisions)

    # -- the flusher's side -------------------------------------------------------------------

    def pending_count(self) -> int:
        with self._lock:
            return sum(map(len, self._pending.values()))

    def needs_flush(self, *, repair_now: bool = False) -> bool:
        """Whether a flush has work: changes pending, or a journal to put right (`repair_now`:
        the agent's last flush, which tries whenever it was tried last)."""
        with self._lock:
            due = repair_now or time.monotonic() >= self._repair_after
            repair = self._journal_broken and due
            return bool(self._pending) or repair

    def flush(self, store: PoolStore) -> FlushOutcome:
        """Store the pending changes of each block over it as `store` holds it, one write each."""
        with self._flushing:
            return self._flush(store)

    def _flush(self, store: PoolStore) -> FlushOutcome:
        with self._lock:
            work = [(key, list(changes)) for key, changes in self._pending.items()]
            taken = time.monotonic()  # changes kept after this are not in `work`
        stored = clashes = 0
        for key, changes in work:
            try:
                outcome = self._flush_block(store, key, changes, taken)
                if outcome is None:  # another writer came first (the node of another slice of
                    # the block, say): once more at once, on the read the conflict made fresh
                    outcome = self._flush_block(store, key, changes, taken)
            except CniError as exc:  # down, refused, or a block not in pyabouts' format
                log.warning("storing the pending changes of %s: %s", _describe(key), exc.msg)
                continue
            if outcome is not None:
                stored += len(changes)
                clashes += outcome
        with self._lock:
            left = sum(map(len, self._pending.values()))
            if stored or self._journal_broken:
                try:
                    self._rewrite_journal()  # what is stored leaves it; a torn line goes
                except OSError:
                    # Else a restart would store again what is stored, over what was freed
                    # since: the next change, or a later flush, puts it right.
                    self._journal_broken = True
                    self._repair_after = time.monotonic() + self._repair_every
                    raise
        return FlushOutcome(stored, left, clashes)

    def _flush_block(
        self, store: PoolStore, key: BlockKey, changes: list[Change], taken: float
    ) -> int | None:
        """Write `changes` (the block's pending ones as of `taken`) over the stored block; its
        clashes, or None on a conflict."""
        read = store.read_blocks(key.pool, key.base, key.base + BLOCK_SIZE - 1)
        base = next((b for b in read if b.key == key), None) or Block(key)
        with self._lock:
            latest = self._latest.get(key)
            built_on = self._built_on.get(key)
        merged = base.copy()
        if latest is not None:  # the range that wrote it last, as a direct write records
            merged.range_text, merged.capacity = latest.range_text, latest.capacity
            merged.range_size = latest.range_size
        clashing = _clashes(merged, [c for c in changes if not _apply(merged, c)], changes)
        outcome = store.write_blocks([merged])
        if outcome.conflicts:
            return None  # read again at the next flush (the cache marked it stale)
        for change in clashing:
            log.error(
                "address %d of %s was given by this node (to %s) while not yet stored, and "
                "meanwhile stored as held by %s: the datastore's holder keeps it. Does a "
                "network config of this network give from this node's slice (one without "
                "node_slice_size, another range or slice size)?",
                change.address,
                _describe(key),
                change.after and change.after.attachment,
                base.entries.get(change.address),
            )
            self._on_clash()
        with self._lock:
            self._proven.add(key)
            rest = self._pending.get(key, [])[len(changes) :]
            if rest:
                self._pending[key] = rest
                self._pending_since[key] = taken
            else:
                self._pending.pop(key, None)
                self._pending_since.pop(key, None)
                if key in self._draining:
                    self._draining[key] = time.monotonic() + self._drain_seconds
            # Stored: out of the journal now, as out of memory. A restart before the flush
            # rewrites the journal would else apply them again over what changed since (an
            # address the reconciler freed, given to another pod meanwhile).
            with contextlib.suppress(StoreUnavailableError):  # then rewritten from memory
                self._append(_stored_line(key, len(changes)))
            # The write's success says `base` was the stored state: what was written, with the
            # changes kept since over it, is the view now (a read that began before the write
            # may still bring `base`, and must not undo it). One a read built on the write
            # meanwhile holds the same, under a revision decisions in flight may carry.
            merged.revision = written = outcome.revisions.get(key)
            if written is not None:
                self._note_newest(key, written)
            if later_revision(self._built_on.get(key), written):
                # A read of a later state was tracked meanwhile (the reconciler wrote, say):
                # the view is built on that. With nothing left pending it goes, for the next
                # read to track that state as it is; else the next flush rebuilds it.
                if not rest:
                    self._latest.pop(key, None)
                    self._built_on.pop(key, None)
                return len(clashing)
            rebuilt = self._built_on.get(key) == written and not clashing
            if not rest:
                self._latest[key] = merged
            elif not (rebuilt and base.revision == built_on):
                self._latest[key] = _with_changes(merged, rest, self._token())
            self._built_on[key] = written
        return len(clashing)

    # -- state, under the lock ----------------------------------------------------------------

    def _defers(self, block: Block) -> bool:
        key = block.key
        if key in self._pending or (block.revision or "").startswith(PENDING):
            # Decided on a view with changes pending: kept, or (a block found shared) a
            # conflict until the flush has stored them (keep).
            return True
        if key in self._writing or self._is_unsure(key) or key not in self._built_on:
            return False  # not decided on a view tracked since this agent last stored it
        if self._drains(key):
            return False
        return self._defer and self._only_mine(block, unknown=False)

    def _keeps(self, block: Block) -> bool:
        """Whether `block` (deferred by split) may be kept now: see keep."""
        key = block.key
        if block.revision != self._expected(key) or key in self._writing:
            return False
        pending = key in self._pending
        if not self._only_mine(block, unknown=pending):
            if pending:
                self._draining.setdefault(key, None)  # it waits for them: let it have its turn
            return False
        return not (pending and key in self._draining)

    def _drains(self, key: BlockKey) -> bool:
        """Whether decisions on `key` go to the datastore before their answers for now (see
        _draining), once its pending changes are stored."""
        if key not in self._draining:
            return False
        until = self._draining[key]
        if until is None or time.monotonic() < until:
            return True
        del self._draining[key]
        return False

    def _only_mine(self, block: Block, *, unknown: bool = True) -> bool:
        """Whether `block`, decided on the tracked view of its block, gives only addresses
        that this node alone gives as far as the agent knows: each in a slice the node holds,
        in no slice another node holds in any registry read (two configs of one network with
        other ranges or slice sizes keep registries of their own), and the view holds no
        address another node gave in the node's slices there (a config without slices gives
        from them, or a flush found a clash). A release may be of any address (_gives).
        `unknown`: the answer when no registry of the pool was read since the agent started
        (a DEL reads none, and a restarted agent's journal holds changes of blocks it knew)."""
        key = block.key
        before = self._latest.get(key)
        if before is None:
            return False
        mine, others = self._slice_spans(key)
        if not any(
            p == key.pool for s in self._slices.values() for p, _, _ in (*s.mine, *s.others)
        ):
            return unknown and not self._given_by_others(before, mine, others)
        if self._given_by_others(before, mine, others):
            return False
        last = key.base + BLOCK_SIZE - 1
        if not others and any(lo <= key.base and last <= hi for lo, hi in mine):
            return True  # the block lies in the node's slices alone: every change is its own
        return all(
            not _gives(c) or (_within(c.address, mine) and not _within(c.address, others))
            for c in _changes(before, block)
        )

    def _given_by_others(
        self, view: Block, mine: list[tuple[int, int]], others: list[tuple[int, int]]
    ) -> bool:
        """Whether `view` holds an address another node gave where this node's slices (`mine`)
        say it alone gives, outside other nodes' (`others`); with no slice known, anywhere."""
        stamp = (view.revision, self._slices_noted)
        known = self._others_given.get(view.key)
        if known is not None and known[0] == stamp:
            return known[1]
        given = any(
            o.in_use
            and o.node not in ("", self._node)
            and (not mine or (_within(a, mine) and not _within(a, others)))
            for a, o in view.entries.items()
        )
        self._others_given[view.key] = (stamp, given)
        return given

    def _seen(self, stored: Block) -> Block:
        """The block decisions see for `stored`; tracks it if a slice of this node's is in it."""
        key = stored.key
        newest = self._newest.get(key)
        fresh = stored.revision == newest or later_revision(stored.revision, newest)
        if fresh and stored.revision is not None:
            self._newest[key] = stored.revision
        latest = self._latest.get(key)
        if key in self._built_on:
            built_on = self._built_on[key]
            if stored.revision != built_on and not later_revision(stored.revision, built_on):
                # A read that began before the state the view is built on (a flush's write,
                # say): it lacks what the view has.
                return latest if latest is not None else stored
            if latest is not None and stored.revision == built_on:
                return latest
        pending = self._pending.get(key)
        if not pending and (not fresh or self._is_unsure(key) or not self._slice_spans(key)[0]):
            # Not to be written behind on: no slice of the node's in it, or older than what the
            # agent has read or written itself since (what it tracked is older still). Its
            # writes go direct.
            self._latest.pop(key, None)
            self._built_on.pop(key, None)
            return stored
        built = _with_changes(stored, pending, self._token()) if pending else stored
        self._latest[key] = built
        self._built_on[key] = stored.revision
        return built

    def _is_unsure(self, key: BlockKey) -> bool:
        """Whether a write of `key` may land that this agent's view lacks: one of its own whose
        outcome is unknown, or one sent before it started (see _proven)."""
        return key in self._unsure or key not in self._proven

    def _note_newest(self, key: BlockKey, revision: str) -> None:
        if later_revision(revision, self._newest.get(key)):
            self._newest[key] = revision

    def _token(self) -> str:
        return f"{PENDING}{next(self._tokens)}"

    def _expected(self, key: BlockKey) -> str | None:
        latest = self._latest.get(key)
        return latest.revision if latest is not None else None

    def _slice_spans(self, key: BlockKey) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The spans of block `key` that slices hold, in every registry read: (this node's,
        other nodes')."""
        last = key.base + BLOCK_SIZE - 1
        mine: list[tuple[int, int]] = []
        others: list[tuple[int, int]] = []
        for known in self._slices.values():
            for spans, held in ((mine, known.mine), (others, known.others)):
                spans += [
                    (lo, hi)
                    for p, lo, hi in held
                    if p == key.pool and lo <= last and key.base <= hi
                ]
        return mine, others

    def _note_registry(self, block: Block) -> None:
        known = self._slices.get(block.key)
        if known is not None and not later_revision(block.revision, known.revision):
            return  # the same, or a read older than one noted
        noted = _Slices(block.revision)
        for owner in block.entries.values():
            if owner.ifname == SLICE_IFNAME:
                held = noted.mine if owner.node == self._node else noted.others
                held.append(slice_span(block.key.pool, owner))
        self._slices[block.key] = noted
        self._slices_noted += 1

    # -- the journal ----------------------------------------------------------------------------

    def _recover(self) -> None:
        """Take up the pending changes an earlier agent left in the journal."""
        try:
            text = self._path.read_text(errors="surrogateescape")
        except FileNotFoundError:
            text = ""
        lines = text.split("\n")
        head = json.loads(lines[0]) if lines[0] else {"version": JOURNAL_VERSION}
        if not isinstance(head, dict) or head.get("version") != JOURNAL_VERSION:
            raise ValueError(f"{self._path} is not a journal this agent reads: {lines[0]!r}")
        node = head.get("node", self._node)
        for number, line in enumerate(lines[1:], start=2):
            if not line:
                continue
            try:
                key, changes, stored = _read_journal_line(line)
            except (ValueError, KeyError, TypeError) as exc:
                # The last line may be cut short by a crash mid-write: its decision was never
                # answered. Any other is damage, reported; what it held is lost either way.
                level = logging.INFO if number >= len(lines) - 1 else logging.ERROR
                log.log(level, "%s line %d is unreadable (%s): skipped", self._path, number, exc)
                continue
            if stored:  # the block's first `stored` changes were stored before the crash
                left = self._pending.get(key, [])[stored:]
                if left:
                    self._pending[key] = left
                else:
                    self._pending.pop(key, None)
                    self._pending_since.pop(key, None)
                continue
            self._pending.setdefault(key, []).extend(changes)
            self._pending_since.setdefault(key, time.monotonic())
        if self._pending and node != self._node:
            raise ValueError(
                f"{self._path} holds changes node {node!r} answered and did not store, and "
                f"this agent serves node {self._node!r}: run the agent as {node!r} to store "
                "them (--node-name), or remove the file if that node's pods are gone"
            )
        if self._pending:
            log.warning(
                "%d pending changes of %d blocks found in %s: storing them",
                sum(map(len, self._pending.values())),
                len(self._pending),
                self._path,
            )
        self._rewrite_journal()

    def _rewrite_journal(self) -> None:
        """Replace the journal with the pending changes alone (compacted), atomically."""
        temporary = self._path.with_name(f".{self._path.name}.new")
        head = json.dumps({"version": JOURNAL_VERSION, "node": self._node}) + "\n"
        body = "".join(_journal_line(key, changes) for key, changes in self._pending.items())
        data = (head + body).encode(errors="surrogateescape")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        fd = os.open(temporary, flags, 0o600)
        try:
            if os.write(fd, data) != len(data):  # a full /run: never put in place cut short
                raise OSError(f"{temporary} took part of the journal")
            os.replace(temporary, self._path)
        except OSError:
            os.close(fd)
            raise
        # The new file's own descriptor: appends never go to the one it replaced.
        old, self._journal = self._journal, fd
        self._journal_broken = False
        if old is not None:
            os.close(old)

    def _append(self, text: str) -> None:
        if not text:
            return
        data = text.encode(errors="surrogateescape")
        assert self._journal is not None  # opened by _recover
        try:
            if os.write(self._journal, data) == len(data):
                return
            failure = "it took part of the write"
        except OSError as exc:
            failure = str(exc)
        # No line cut short may stay for the next one to run on from: nothing is kept until a
        # rewrite (now, or at the next flush) has put the journal right.
        self._journal_broken = True
        try:
            self._rewrite_journal()
        except OSError as exc:
            failure += f"; rewriting it failed too: {exc}"
        raise StoreUnavailableError(f"the journal {self._path} took no change: {failure}")

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                os.close(self._journal)
                self._journal = None


class DeferringStore:
    """`backing` (the agent's pool cache), with the writes `pending` defers kept there."""

    def __init__(self, backing: PoolStore, pending: PendingWrites) -> None:
        self._backing = backing
        self._pending = pending

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        return self._pending.view(pool, first, last, self._backing.read_blocks(pool, first, last))

    def read_all_blocks(self, *, on_unreadable: OnUnreadable | None = None) -> list[Block]:
        return self._backing.read_all_blocks(on_unreadable=on_unreadable)

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        deferred, direct, order = self._pending.split(blocks)
        # The direct ones first, in the order given (a slice registry before its addresses):
        # a change kept here must not outlive a conflict on what it was decided with.
        outcome = None
        try:
            outcome = self._backing.write_blocks(direct) if direct else WriteOutcome()
        finally:
            self._pending.written(direct, order, outcome)
        if outcome.conflicts or not deferred:
            return outcome
        kept = self._pending.keep(deferred)
        return WriteOutcome(kept.conflicts, {**outcome.revisions, **kept.revisions})

    def close(self) -> None:
        self._backing.close()


def _gives(change: Change) -> bool:
    """Whether `change` gives its address to a sandbox. Only the node that alone gives an
    address may keep that behind; a release (nothing left, a rest, a reservation) may be kept
    of any address: no node gives an address its view shows held, and a flush leaves one
    that somebody else holds by then as it is."""
    return change.after is not None and change.after.in_use


def _within(address: int, spans: list[tuple[int, int]]) -> bool:
    return any(lo <= address <= hi for lo, hi in spans)


def _with_changes(stored: Block, changes: list[Change], revision: str) -> Block:
    built = stored.copy()
    for change in changes:
        _apply(built, change)
    built.revision = revision
    return built


def _changes(before: Block, after: Block) -> list[Change]:
    """What a decision changed in a block: its entries compared by identity (a view copies a
    block's entries, so an untouched owner is the same object)."""
    old, new = before.entries, after.entries
    changes = [Change(a, old.get(a), o) for a, o in new.items() if old.get(a) is not o]
    changes += [Change(a, o, None) for a, o in old.items() if a not in new]
    return changes


def _clashes(applied: Block, refused: list[Change], changes: list[Change]) -> list[Change]:
    """Of the gives `refused` over `applied` (all of `changes` applied, as far as they could
    be), those that clash: whose address ends held otherwise than this node's last change of it
    says. One that ends so is this node's own history stored already and replayed (a flush
    whose answer was lost, stored all the same: given, freed and given again), no clash."""
    last = {change.address: change.after for change in changes}
    return [c for c in refused if applied.entries.get(c.address) != last[c.address]]


def _apply(block: Block, change: Change) -> bool:
    """Apply `change` to `block` if the address is as the decision saw it; False when another
    pod holds it now and the change gives it (a clash: left as stored). A release of an address
    that changed meanwhile leaves what is stored: another pod holds it, rests on it or has it
    reserved (a decision on a stale view of another node's slice, say), or it is free already.
    A give over a rest or a reservation stored meanwhile is applied: the pod it was answered to
    holds the address, and leaving the rest would let it be given again when the rest ends."""
    now = block.entries.get(change.address)
    if now == change.after:
        if change.after is not None:
            block.put(change.address, change.after)  # its fields compare leaves out, too
        return True
    if now != change.before:
        if change.after is None or not change.after.in_use:
            return True
        if now is not None and now.in_use:
            return False
    if change.after is None:
        block.pop(change.address)
    else:
        block.put(change.address, change.after)
    return True


def _journal_line(key: BlockKey, changes: list[Change]) -> str:
    columns = [[c.address - key.base, _columns(c.before), _columns(c.after)] for c in changes]
    record = {"network": key.pool.network, "family": key.pool.family, "base": key.base}
    return json.dumps({**record, "changes": columns}, separators=(",", ":")) + "\n"


def _stored_line(key: BlockKey, count: int) -> str:
    """The line saying that the first `count` changes of `key` still in the journal (in its
    order) are stored: recovery drops them, as the flush dropped them from memory."""
    record = {"network": key.pool.network, "family": key.pool.family, "base": key.base}
    return json.dumps({**record, "stored": count}, separators=(",", ":")) + "\n"


def _read_journal_line(line: str) -> tuple[BlockKey, list[Change], int]:
    """A line's block and its changes, or how many of its changes were stored (a
    _stored_line: no changes)."""
    record = json.loads(line)
    family = record["family"]
    if family not in (4, 6) or not isinstance(record["base"], int):
        raise ValueError("not a block")
    key = BlockKey(PoolId(str(record["network"]), family), record["base"])
    if "stored" in record:
        stored = record["stored"]
        if not isinstance(stored, int) or stored < 1:
            raise ValueError("not a count of changes")
        return key, [], stored
    changes = [
        Change(key.base + int(offset), _owner(before), _owner(after))
        for offset, before, after in record["changes"]
    ]
    if any(not 0 <= c.address - key.base < BLOCK_SIZE for c in changes):
        raise ValueError("an address outside its block")
    return key, changes, 0


def _columns(owner: Owner | None) -> str | None:
    return None if owner is None else owner_columns(owner)


def _owner(columns: object) -> Owner | None:
    return None if columns is None else owner_from_columns(str(columns))


def _describe(key: BlockKey) -> str:
    return f"block {key.base} of network {key.pool.network or '-'} (IPv{key.pool.family})"
