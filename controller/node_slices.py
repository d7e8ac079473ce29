"""Node slices of nodes that are gone: given back, so that a node joining later gets them.

A slice goes back only when no address of it is given: the pods of a deleted node are deleted
too (the pod garbage collector), their addresses freed by the pass, and then the slice. Each
slice in an optimistic transaction of its own, over the registry entry and the slice's
addresses together. Its compare-and-swap covers the blocks it writes: the registry's, and the
slice's where it frees ended rests. So an ADD into the slice that lands between its read and its
write is missed when it writes only the address's block, which a node that holds the slice does;
the pass frees only slices of nodes the API does not list, which make no ADDs but for a node
deleted and registered again within the pass (README, "Node slices").
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from pyabouts.controller.leaks import Leak
from pyabouts.controller.reclaim import OnFailed, each_write, release_unchanged
from pyabouts.ipam.pool import Block, Owner, PoolId, PoolView
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
    store: PoolStore,
    blocks: Sequence[Block],
    nodes: Collection[str],
    *,
    deadline: float,
    on_failed: OnFailed | None = None,
) -> list[FreedSlice]:
    """Give back the slices in `blocks` (a snapshot) held by nodes not in `nodes` whose
    addresses are all free, slice by slice (see reclaim.each_write for a write that fails);
    the ones given back."""
    freed = []

    def give_back(held: tuple[PoolId, int, Owner]) -> None:
        registry, index, holder = held
        pool, first, last = slice_span(registry, holder)
        # The addresses first: a store writing block by block stops at the first conflict, so
        # the registry entry goes only once its ended rests are gone, and a retry completes it.
        spans = [Span(pool, first, last), Span(registry, index, index)]
        decide = functools.partial(
            give_back_slice, registry=registry, index=index, holder=holder, now=int(time.time())
        )
        if run_span_transaction(store, spans, decide, deadline=deadline):
            gone = _freed(registry, holder)
            log.info("freed %s", gone.describe())
            freed.append(gone)

    each_write(_held_by_gone_nodes(blocks, nodes), give_back, on_failed)
    return freed


def slices_a_pass_would_free(
    blocks: Sequence[Block], nodes: Collection[str], leaks: Sequence[Leak]
) -> list[FreedSlice]:
    """For a dry run: the slices a pass over `blocks` (a snapshot) would give back once it had
    freed `leaks`, decided as the pass decides, on a view of the snapshot that is never
    written."""
    view = PoolView(blocks)
    now = int(time.time())
    release_unchanged(view, leaks, now)
    would = [
        _freed(registry, holder)
        for registry, index, holder in _held_by_gone_nodes(blocks, nodes)
        if give_back_slice(view, registry=registry, index=index, holder=holder, now=now)
    ]
    for gone in would:
        log.info("would free %s", gone.describe())
    return would


def _held_by_gone_nodes(
    blocks: Sequence[Block], nodes: Collection[str]
) -> Iterator[tuple[PoolId, int, Owner]]:
    """(registry, entry, holder) of each slice in `blocks` whose node is not in `nodes`."""
    for block in blocks:
        if is_registry(block.key.pool):
            for index, holder in sorted(block.entries.items()):
                if holder.node.lower() not in nodes:  # as is_static_pod reads a node
                    yield block.key.pool, index, holder


def _freed(registry: PoolId, holder: Owner) -> FreedSlice:
    pool = slice_span(registry, holder)[0]
    return FreedSlice(pool.network, holder.container_id, holder.node)
