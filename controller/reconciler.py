"""One reconcile pass: snapshot the store, then list the pods, then free what no pod uses.

The order is what makes it safe. An allocation in the snapshot was made by an ADD for a pod that
existed then (kubelet only sets up a sandbox for a pod it was given), so a pod missing from the
later listing is really gone. Allocations made after the snapshot are not looked at, and an entry
that changed after it is not freed (controller.reclaim).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from pyabouts.controller.empty_blocks import removable_blocks, remove_empty_blocks
from pyabouts.controller.leaks import (
    Leak,
    PodState,
    Policy,
    StatefulSets,
    find_leaks,
    is_static_pod,
)
from pyabouts.controller.node_slices import (
    FreedSlice,
    free_slices_of_gone_nodes,
    has_slices,
    slices_a_pass_would_free,
)
from pyabouts.controller.reclaim import free_leaks
from pyabouts.ipam.errors import CniError
from pyabouts.ipam.pool import Block, BlockKey
from pyabouts.ipam.store import PoolStore

log = logging.getLogger(__name__)

FREE_DEADLINE = 60.0  # seconds for freeing one pass's leaks, conflicts included


@dataclass(frozen=True, slots=True)
class PassSummary:
    """What one pass looked at and did."""

    allocations: int  # pod allocations in the snapshot
    pods: int  # pods listed
    leaks: list[Leak]  # judged leaked
    freed: list[Leak]  # actually freed (all of `leaks` minus those changed meanwhile)
    dry_run: bool
    seconds: float
    blocks: list[Block] = field(default_factory=list, repr=False)  # the snapshot, for metrics
    # Node slices of gone nodes given back (that would be, in a dry run).
    slices_freed: list[FreedSlice] = field(default_factory=list)
    # Stored blocks left out of the snapshot, not in pyabouts' format: why, for each.
    unreadable: list[str] = field(default_factory=list)
    # Judged leaked, and left for a later pass to judge again (reconcile's `defer`).
    deferred: list[Leak] = field(default_factory=list)
    # What failed: a write (a block the store refused, the store down), or the CronJob's
    # second look; why, for each.
    failed: list[str] = field(default_factory=list)
    # Stored blocks that held nothing, deleted (that would be, in a dry run): see empty_blocks.
    blocks_removed: list[BlockKey] = field(default_factory=list)

    def followed_by(self, again: PassSummary) -> PassSummary:
        """This pass followed by `again`, a whole pass made after it: what this one checked,
        what the two freed, and what the second found and left (it judged anew what this one
        did not free)."""
        return dataclasses.replace(
            again,
            allocations=self.allocations,
            pods=self.pods,
            leaks=[*self.freed, *again.leaks],
            freed=[*self.freed, *again.freed],
            slices_freed=[*self.slices_freed, *again.slices_freed],
            blocks_removed=[*self.blocks_removed, *again.blocks_removed],
            seconds=self.seconds + again.seconds,
        )

    def by_reason(self) -> dict[str, int]:
        return dict(Counter(leak.reason.value for leak in self.freed))

    def describe(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        done = self.leaks if self.dry_run else self.freed
        reasons = Counter(leak.reason.value for leak in done)
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "none"
        not_freed = len(self.leaks) - len(self.freed)
        kept = "" if self.dry_run else f"; {not_freed} changed meanwhile"
        if self.failed:
            kept = f"; {not_freed} not freed (changed meanwhile, or failed); "
            kept += f"{len(self.failed)} failure(s)"
        slices = f"; node slices {verb}: {len(self.slices_freed)}" if self.slices_freed else ""
        left_out = len(self.unreadable)
        unreadable = f"; {left_out} unreadable block(s) left out" if left_out else ""
        later = f"; {len(self.deferred)} left to judge again later" if self.deferred else ""
        removed = len(self.blocks_removed)
        emptied = f"; {removed} empty block(s) {'would be ' if self.dry_run else ''}deleted"
        return (
            f"checked {self.allocations} allocation(s) against {self.pods} pod(s) in "
            f"{self.seconds:.2f} s: {verb} {len(done)} ({why}){kept}{slices}{unreadable}{later}"
            + (emptied if removed else "")
        )


def reconcile(
    store: PoolStore,
    list_pods: Callable[[], Mapping[str, PodState]],
    policy: Policy,
    *,
    dry_run: bool = False,
    only_pods: Collection[str] | None = None,
    spared: Collection[str] = (),
    list_nodes: Callable[[], Collection[str] | None] | None = None,
    list_statefulsets: Callable[[], StatefulSets | None] | None = None,
    defer: Callable[[Leak], bool] | None = None,
    clock: Callable[[], float] = time.time,
) -> PassSummary:
    """One pass over the whole store, or only the allocations of the pods in `only_pods`; the
    allocations of the pods in `spared` are not judged (the controller's pods deleted too
    recently: their sandboxes may still be torn down), and a leak `defer` says so of is left
    for a later pass (the controller's pods no watch event said were gone: see Controller).
    A whole pass with `list_nodes` also gives back the node slices of nodes that are gone
    (controller.node_slices), after freeing the addresses of their pods, and frees those of
    static pods without a mirror pod whose node is gone (a targeted pass keeps them). A whole
    pass deletes the stored blocks that held nothing in its snapshot (controller.empty_blocks).

    A stored block not in pyabouts' format (an IPPool edited by hand, say) is left out and
    logged as an error at every pass, and the rest is reconciled: one bad object must not stop
    the cluster's garbage collection. Node slices are not given back meanwhile (the slice's
    addresses may be in that block)."""
    started = time.monotonic()
    unreadable: list[str] = []

    def left_out(problem: CniError) -> None:
        # At every full pass as an error; a targeted pass (one per pod deletion) only notes it.
        level = logging.ERROR if only_pods is None else logging.DEBUG
        log.log(level, "left out of this pass, fix or delete it: %s", problem.msg)
        unreadable.append(problem.msg)

    # First the snapshot, then the pods: see the module doc.
    blocks = store.read_all_blocks(on_unreadable=left_out)
    pods = list_pods()
    judged = _restricted(blocks, only_pods, spared)
    sticky = any(o.sticky for b in judged for o in b.entries.values())
    # Listed after the pods: a StatefulSet scaled down meanwhile frees its ordinals next time.
    statefulsets = list_statefulsets() if sticky and list_statefulsets is not None else None
    # Listed after the pods too: a static pod without a mirror pod is judged by its node.
    unmirrored = any(
        is_static_pod(o) and o.pod not in pods for b in judged for o in b.entries.values()
    )
    nodes = None
    if list_nodes is not None and only_pods is None and (unmirrored or has_slices(blocks)):
        listed = list_nodes()  # None: they cannot be listed
        nodes = None if listed is None else set(listed)
    leaks: list[Leak] = []
    deferred: list[Leak] = []
    found = find_leaks(
        judged, pods, now=clock(), policy=policy, statefulsets=statefulsets, nodes=nodes
    )
    for leak in found:
        (deferred if defer is not None and defer(leak) else leaks).append(leak)
    for leak in leaks:
        log.info("%s %s", "would free" if dry_run else "freeing", leak.describe())
    failed: list[str] = []

    def not_freed(problem: CniError) -> None:
        log.error("not freed in this pass: %s", problem.msg)
        failed.append(problem.msg)

    freed = []
    if not dry_run:
        deadline = time.monotonic() + FREE_DEADLINE
        freed = free_leaks(store, leaks, deadline=deadline, on_failed=not_freed)
    slices_freed = []
    if (unreadable or failed) and nodes is not None and has_slices(blocks):
        log.warning(
            "node slices of gone nodes are given back once every stored block is readable "
            "and every leak found freed"
        )
    elif nodes is not None and has_slices(blocks):
        if dry_run:
            slices_freed = slices_a_pass_would_free(blocks, nodes, leaks)
        else:
            deadline = time.monotonic() + FREE_DEADLINE
            slices_freed = free_slices_of_gone_nodes(
                store, blocks, nodes, deadline=deadline, on_failed=not_freed
            )
    blocks_removed = []
    if only_pods is None:
        if dry_run:
            blocks_removed = [block.key for block in removable_blocks(blocks)]
        else:
            blocks_removed = remove_empty_blocks(store, blocks, not_freed)
    summary = PassSummary(
        allocations=sum(1 for b in judged for o in b.entries.values() if o.pod and o.in_use),
        pods=len(pods),
        leaks=leaks,
        freed=freed,
        dry_run=dry_run,
        seconds=time.monotonic() - started,
        blocks=blocks,
        slices_freed=slices_freed,
        unreadable=unreadable,
        deferred=deferred,
        failed=failed,
        blocks_removed=blocks_removed,
    )
    log.info("reconcile: %s", summary.describe())
    return summary


def _restricted(
    blocks: Sequence[Block], only_pods: Collection[str] | None, spared: Collection[str]
) -> list[Block]:
    """The blocks, with only the entries of `only_pods` when that is given, and none of
    `spared`."""
    if only_pods is None and not spared:
        return list(blocks)
    narrowed = []
    for block in blocks:
        entries = {
            a: o
            for a, o in block.entries.items()
            if (only_pods is None or o.pod in only_pods) and o.pod not in spared
        }
        if entries:
            narrowed.append(Block(block.key, entries, block.revision))
    return narrowed
