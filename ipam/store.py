"""The store interface: read blocks, write them back only if nobody changed them.

Adapters (ipam/stores/) implement it for etcd and for Kubernetes custom resources. The
interface is deliberately small; everything that decides lives in the allocator.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from pyabouts.ipam.errors import CniError
from pyabouts.ipam.pool import Block, BlockKey, PoolId

#: Told of each stored block read_all_blocks left out as unreadable (CniError 104).
OnUnreadable = Callable[[CniError], None]

T = TypeVar("T")


def decoded_blocks(
    stored: Iterable[T], decode: Callable[[T], Block], on_unreadable: OnUnreadable | None
) -> list[Block]:
    """`decode` of each stored object; one it refuses (CniError) raises, or is left out and
    told to `on_unreadable` (see PoolStore.read_all_blocks)."""
    blocks = []
    for item in stored:
        try:
            blocks.append(decode(item))
        except CniError as exc:
            if on_unreadable is None:
                raise
            on_unreadable(exc)
    return blocks


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What a write did: the blocks somebody else changed first (not written), and the new
    revisions of the blocks written, so a caller that keeps blocks can keep them current."""

    conflicts: list[BlockKey] = field(default_factory=list)
    revisions: dict[BlockKey, str] = field(default_factory=dict)


def later_revision(revision: str | None, than: str | None) -> bool:
    """Whether a stored block at `revision` is a later state than one at `than` (None: not
    stored): as numbers where both are (etcd's, and so Kubernetes', are), so that a report or a
    read older than what is known changes nothing; else any other revision is later. A block
    found absent after it was stored is from a read that began before, or deleted since (the
    reconciler deletes blocks that hold nothing): either way it is not taken over what is
    known, and a write on that revision then meets the conflict that settles it."""
    if revision is None or than is None:
        return than is None
    if revision.isdigit() and than.isdigit():
        return int(revision) > int(than)
    return revision != than


class PoolStore(Protocol):
    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        """The stored blocks of `pool` that hold addresses in [first, last], with revisions.

        Blocks never stored are not returned. Raises StoreUnavailableError or StoreRefusedError.
        """
        ...

    def read_all_blocks(self, *, on_unreadable: OnUnreadable | None = None) -> list[Block]:
        """Every stored block of every pool, with revisions: the reconciler's snapshot.

        One consistent read where the store has one (etcd: a single range read); Kubernetes
        lists in pages, each block with its own resourceVersion. A stored block that is not in
        pyabouts' format (edited by hand, say) raises CniError 104, unless `on_unreadable` is
        given: then it is left out and `on_unreadable` is told, and the others are read.
        """
        ...

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        """Store each block if its stored revision is still `block.revision` (None: absent).

        Blocks changed by somebody else meanwhile are not written: they are the outcome's
        conflicts, and only they (a cache reads those again, not the whole write). A store that
        can write several blocks atomically (etcd) writes all or none, up to what one of its
        transactions takes (etcd: 32 blocks, else parts in order, as below); one that cannot
        (Kubernetes) writes them one by one in the order given and stops at the first conflict,
        so no block after a stale one is written. The allocator's decisions are idempotent, so
        a write that stored only some is completed by the retry.
        """
        ...

    def close(self) -> None: ...


class ChangeSink(Protocol):
    """What a BlockFeed reports to: a long-lived cache (ipam.stores.cached.CachedStore)."""

    def feed_listed(self, revisions: Mapping[tuple[str, str], str]) -> None:
        """Every stored block now, as (pool tag, block tag) -> revision: the feed is live."""
        ...

    def feed_changed(self, pool_tag: str, block_tag: str, revision: str, *, deleted: bool) -> None:
        """One block was written (or deleted) since; `revision` is the store's at that time."""
        ...

    def feed_lost(self) -> None:
        """The feed stopped: changes may go unreported until the next feed_listed."""
        ...


@runtime_checkable
class BlockFeed(Protocol):
    """What a store may offer a long-lived process, besides PoolStore: the revision of every
    stored block as it changes (a Kubernetes watch), so that a cache knows which of its blocks
    somebody else wrote without reading them. Tags name pools and blocks as the feed does."""

    def pool_tag(self, pool: PoolId) -> str: ...

    def block_tag(self, key: BlockKey) -> str: ...

    def follow_changes(self, sink: ChangeSink, stop: threading.Event) -> None:
        """Report every stored block to sink.feed_listed, then each change to sink.feed_changed,
        until `stop` is set (then return) or the feed breaks (then raise)."""
        ...


@runtime_checkable
class BlockRemoval(Protocol):
    """What a store may offer besides PoolStore: deleting a stored block, as a compare-and-swap
    too. The reconciler deletes blocks that hold nothing, so that a range much larger than its
    use (IPv6, nodes coming and going) does not keep one stored block per node ever seen."""

    def remove_block(self, block: Block) -> bool:
        """Delete `block` if its stored revision is still `block.revision`; whether it did
        (False: changed since, or gone already). A writer holding the old revision then meets
        a conflict, reads the block as absent and creates it again."""
        ...


@runtime_checkable
class ReachCheck(Protocol):
    """What a store may offer besides PoolStore: one cheap request that fails where its reads
    and writes would (the server, the credentials and rights; for IPPools, the CRD), for a
    readiness probe. A store without it is probed with a read of a block nobody holds."""

    def check_reach(self) -> None: ...
