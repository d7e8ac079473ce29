"""Bringing allocations made elsewhere (whereabouts' IPPools) into pyabouts' pools.

Pure decisions over a PoolView, like ipam.allocator: the caller reads what another IPAM holds,
turns it into Holdings, and runs `bring_over` as one transaction. Each holding is stored as it
was held, so an ADD of the same pod and interface finds its address (ADD is idempotent on the
pod's interface), and nothing else is given an address that is held.

A holding that pyabouts already stores for the same pod interface (an earlier run, or an ADD
since) is left as it is. One that pyabouts stores for somebody else is a conflict: then nothing
is changed at all, and every conflict is named. One whose pod is gone is left out, and so is
one in a node's slice whose pod now runs on another node.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import netaddr

from pyabouts.ipam.pool import Owner, PoolId, PoolView
from pyabouts.ipam.ranges import AddressRange
from pyabouts.ipam.slices import SLICE_IFNAME, SlicedRange, held_slice


@dataclass(frozen=True, slots=True)
class Holding:
    """One address (or one node's slice) held elsewhere, and where it goes in pyabouts.

    For an address, `pool` is the range's pool and `address` the address; for a node slice,
    `pool` is the range's slice registry and `address` the slice's index in it (see
    ipam.slices). `range` is what describes the stored block to people; `source` names the
    object the holding was read from.
    """

    pool: PoolId
    address: int
    owner: Owner
    range: AddressRange
    source: str
    sliced: SlicedRange | None = None  # set for a node slice

    @property
    def text(self) -> str:
        """The address, or the slice's CIDR."""
        if self.sliced is not None:
            return str(self.sliced.slice_network(self.address))
        return str(netaddr.IPAddress(self.address, self.pool.family))


class Result(enum.StrEnum):
    ADDED = "added"  # stored now (or, in a dry run, would be)
    PRESENT = "present"  # pyabouts already stores it for the same holder
    POD_GONE = "pod-gone"  # held for a pod that no longer exists: a leak, not brought over
    # held in a node's slice for a pod that runs on another node now (made again there: a
    # StatefulSet's pod whose DEL was missed): a leak too, not brought over
    POD_ELSEWHERE = "pod-elsewhere"


@dataclass(frozen=True, slots=True)
class Conflict:
    """A holding whose place pyabouts (or another holding) gives somebody else."""

    holding: Holding
    holder: Owner
    held_in: str  # where `holder` holds it: "pyabouts" or another holding's source


class MigrationConflictError(Exception):
    """Holdings that pyabouts gives to somebody else: this decision changed nothing (an
    earlier one of the same run may have stored part: `after_a_write`)."""

    def __init__(self, conflicts: Sequence[Conflict], *, after_a_write: bool = False) -> None:
        super().__init__(f"{len(conflicts)} conflicting holding(s)")
        self.conflicts = list(conflicts)
        self.after_a_write = after_a_write


def bring_over(
    view: PoolView,
    holdings: Sequence[Holding],
    *,
    dry_run: bool,
    live_pods: Mapping[str, str] | None = None,
) -> list[tuple[Holding, Result]]:
    """Store each holding in `view` (unless `dry_run`), and say which were there already.

    With `live_pods` ("namespace/name" -> node, listed after the holdings were read), an
    address held for a pod not among them is left out: its pod is gone, and the holding a leak
    (the other IPAM missed its DEL, or was frozen when it came). pyabouts may since have given
    the address to somebody else, which is then no conflict. So is an address held in a node's
    slice (its owner names the node) for a pod that runs on another node now.

    Raises MigrationConflictError, having changed nothing, when any holding conflicts.
    """
    results: list[tuple[Holding, Result]] = []
    conflicts: list[Conflict] = []
    first_seen: dict[tuple[PoolId, int], Holding] = {}
    for holding in holdings:
        left_out = _left_out(holding, live_pods)
        if left_out is not None:
            results.append((holding, left_out))
            continue
        earlier = first_seen.setdefault((holding.pool, holding.address), holding)
        if earlier is not holding and not _same_holder(earlier.owner, holding):
            conflicts.append(Conflict(holding, earlier.owner, earlier.source))
            continue
        stored = view.owner(holding.pool, holding.address)
        if stored is not None and _gives_way(stored, holding):
            stored = None
        if stored is None:
            elsewhere = _slice_held_elsewhere(view, holding)
            if elsewhere is not None:
                conflicts.append(Conflict(holding, elsewhere, "pyabouts"))
            else:
                results.append((holding, Result.ADDED))
        elif _same_holder(stored, holding):
            results.append((holding, Result.PRESENT))
        else:
            conflicts.append(Conflict(holding, stored, "pyabouts"))
    if conflicts:
        raise MigrationConflictError(conflicts)
    if not dry_run:
        for holding, result in results:
            if result is Result.ADDED:
                view.assign(holding.pool, holding.address, holding.owner)
    return results


def _left_out(holding: Holding, live_pods: Mapping[str, str] | None) -> Result | None:
    """Why an address holding is a leak not to bring over (see bring_over), else None."""
    pod, node = holding.owner.pod, holding.owner.node
    if live_pods is None or holding.sliced is not None or not pod:
        return None
    if pod not in live_pods:
        return Result.POD_GONE
    runs_on = live_pods[pod]
    # Node names as the API lists them are lower-case (kubelet lower-cases the host name).
    if node and runs_on and runs_on.lower() != node.lower():
        return Result.POD_ELSEWHERE
    return None


def _same_holder(stored: Owner, holding: Holding) -> bool:
    """Whether `stored` holds what `holding` does as far as pyabouts goes: the same pod
    interface (whose sandbox may have changed since, by an ADD pyabouts served), or, for a
    slice, the same node."""
    if holding.sliced is not None:
        return stored.ifname == SLICE_IFNAME and stored.node == holding.owner.node
    return stored.in_use and stored.attachment == holding.owner.attachment


def _gives_way(stored: Owner, holding: Holding) -> bool:
    """Whether a stored entry that no sandbox holds yields to `holding`: a rest after a release
    does, and so does a reservation for the same pod interface (its pod holds it live)."""
    if holding.sliced is not None or stored.in_use:
        return False
    return stored.cooling or stored.attachment == holding.owner.attachment


def _slice_held_elsewhere(view: PoolView, holding: Holding) -> Owner | None:
    """For a node slice: the entry of another slice that its node already holds in pyabouts
    (a node holds one slice per range), else None."""
    if holding.sliced is None:
        return None
    index = held_slice(view, holding.sliced, holding.owner.node)
    return None if index is None else view.owner(holding.pool, index)
