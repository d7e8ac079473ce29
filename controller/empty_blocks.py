"""Stored blocks that hold nothing, deleted by a full pass.

A node starts in the block its name picks, so a range much larger than its use (an IPv6 /64, a
cluster whose nodes come and go) would else keep one stored block for every node it ever had:
IPPools every agent lists with its pool, and `kubectl get ippools` shows. A block is deleted
only as the pass's snapshot read it (a compare-and-swap on its revision): one written since is
kept, and a node that still holds the deleted block's old revision meets a conflict, reads it
as absent and creates it again. The lowest stored block of each pool and range (each range
text and size a block records) stays, so that what `kubectl pyabouts pools` and the pool
metrics report of each pool is the same after the deletes, and the pool stays in `kubectl get
ippools`. A pass deletes at most REMOVALS_PER_PASS: the first pass over a store that gathered
thousands (an upgrade) must not hold the controller's next passes back for minutes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from pyabouts.ipam.errors import CniError, StoreRefusedError, StoreUnavailableError
from pyabouts.ipam.pool import Block, BlockKey, PoolId
from pyabouts.ipam.slices import is_registry
from pyabouts.ipam.store import BlockRemoval, PoolStore

log = logging.getLogger(__name__)

REMOVALS_PER_PASS = 200


def removable_blocks(blocks: Sequence[Block]) -> list[Block]:
    """The blocks of `blocks` (a snapshot) that a pass deletes: those holding no entry at all
    (no address in use, resting or reserved), but the lowest stored block of each pool and
    range (empty or not; the range as its text and size, which the pool's report counts) and
    the node-slice registries; at most REMOVALS_PER_PASS, the lowest first."""
    lowest: dict[tuple[PoolId, str, int], BlockKey] = {}
    for block in blocks:
        group = (block.key.pool, block.range_text, block.range_size)
        if group not in lowest or block.key < lowest[group]:
            lowest[group] = block.key
    kept = set(lowest.values())
    empty = [
        block
        for block in blocks
        if not block.entries and block.key not in kept and not is_registry(block.key.pool)
    ]
    return sorted(empty, key=lambda block: block.key)[:REMOVALS_PER_PASS]


def remove_empty_blocks(
    store: PoolStore, blocks: Sequence[Block], on_failed: Callable[[CniError], None]
) -> list[BlockKey]:
    """Delete the removable blocks of `blocks` that are unchanged in the store; the ones
    deleted. A store that cannot delete (BlockRemoval) deletes none. A refusal (a Role without
    `delete`, kept from an earlier release, say; an admission policy) is logged as a warning
    and ends the deletes, as they are housekeeping, not the pass's work (a reconciler that may
    not list nodes likewise gives back no slice and goes on); an outage is told to `on_failed`
    and ends them too: the next would meet the same."""
    if not isinstance(store, BlockRemoval):
        return []
    removed = []
    for block in removable_blocks(blocks):
        try:
            if store.remove_block(block):
                removed.append(block.key)
        except StoreRefusedError as refusal:
            log.warning(
                "blocks that hold nothing are not deleted (the reconciler's Role needs "
                "`delete` on ippools): %s",
                refusal.msg,
            )
            break
        except StoreUnavailableError as failure:
            on_failed(failure)
            break
    if removed:
        log.info("deleted %d stored block(s) that held nothing", len(removed))
    return removed
