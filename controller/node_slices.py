"""Node slices of nodes that are gone: given back, so that a node joining later gets them.

A slice goes back only when no address of it is given: the pods of a deleted node are deleted
too (the pod garbage collector), their addresses freed by the pass, and then the slice. Each
slice in an optimistic transaction of its own, over the registry entry and the slice's
addresses together, so an address given meanwhile keeps the slice taken.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from pyabouts.ipam.pool import Block
from pyabouts.ipam.slices import give_back_slice, is_registry, slice_span
from pyabouts.ipam.store import PoolStore
from pyabouts.ipam.transaction import Span, run_span_transaction

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FreedSlice:
    network: str  # the range's network_name
    slice: str  # its CIDR
    node: str  # the node that held it

    def describe(self) -> str:
        return f"node slice {self.slice} (network {self.network or '-'}) of gone node {self.node}"


def has_slices(blocks: Sequence[Block]) -> bool:
    return any(is_registry(b.key.pool) and b.entries for b in blocks)


def free_slices_of_gone_nodes(
    store: PoolStore, blocks: Sequence[Block], nodes: Collection[str], *, deadline: float
) -> list[FreedSlice]:
    """Give back the slices in `blocks` (a snapshot) held by nodes not in `nodes` whose
    addresses are all free; the ones given back."""
    freed = []
    for block in blocks:
        if not is_registry(block.key.pool):
            continue
        for index, holder in sorted(block.entries.items()):
            if holder.node in nodes:
                continue
            pool, first, last = slice_span(block.key.pool, holder)
            spans = [Span(block.key.pool, index, index), Span(pool, first, last)]
            decide = functools.partial(
                give_back_slice,
                registry=block.key.pool,
                index=index,
                holder=holder,
                now=int(time.time()),
            )
            if run_span_transaction(store, spans, decide, deadline=deadline):
                gone = FreedSlice(pool.network, holder.container_id, holder.node)
                log.info("freed %s", gone.describe())
                freed.append(gone)
    return freed
