"""What whereabouts holds: its IPPools and NodeSlicePools (whereabouts.cni.cncf.io/v1alpha1),
read from the Kubernetes API and turned into pyabouts holdings (ipam.migration).

whereabouts stores one IPPool per network_name and range, named "<network_name>-<range>" (just
"<range>" without a network_name), with ":" and "/" of the range written as "-". Its
allocations are keyed by the offset from the range's first address. With node_slice_size it
keeps one IPPool per node's slice, named "<network_name>-<node>-<slice>" ("<node>-<slice>"
without a network_name), and a NodeSlicePool per network (named after network_name, else the
NAD's config name) whose status says which node holds which slice. The network_name itself is
stored nowhere but in these names, so it is read back from them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import netaddr
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from pyabouts.controller.pods import list_pages
from pyabouts.ipam.migration import Holding
from pyabouts.ipam.pool import Family, Owner, PoolId
from pyabouts.ipam.ranges import AddressRange, RangeError, build_range
from pyabouts.ipam.slices import SlicedRange, parse_slice_size, slice_holder

GROUP = "whereabouts.cni.cncf.io"
VERSION = "v1alpha1"
# What reading a whereabouts object not in its format raises (a field of another type, a range
# that is no CIDR, an allocation that is no object): the object is named, never a traceback.
_MALFORMED = (RangeError, ValueError, TypeError, AttributeError, KeyError, netaddr.AddrFormatError)
_Read = TypeVar("_Read")


class WhereaboutsPoolError(Exception):
    """whereabouts objects that cannot be read as it writes them; each problem names one."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True, slots=True)
class WhereaboutsPool:
    """One whereabouts IPPool: offset -> {"id", "podref", "ifname"}."""

    namespace: str
    name: str
    range: str
    allocations: Mapping[str, Mapping[str, str]]

    @property
    def source(self) -> str:
        return f"IPPool {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class NodeSlicePool:
    """One whereabouts NodeSlicePool: its range, slice size, and slice CIDR -> node."""

    namespace: str
    name: str
    range: str
    slice_size: str
    holders: Mapping[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"NodeSlicePool {self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Read:
    """What was read, and what could not be brought over with a reason (not an error)."""

    holdings: list[Holding]
    objects: int  # IPPools and NodeSlicePools read
    notes: list[str]


def read_whereabouts(
    api_client: k8s.ApiClient,
) -> tuple[list[WhereaboutsPool], list[NodeSlicePool]]:
    """Every IPPool and NodeSlicePool of whereabouts, in all namespaces.

    A cluster without whereabouts' IPPool CRD is an error (there is nothing to migrate from);
    one without the NodeSlicePool CRD (whereabouts before v0.8) has no node slices.
    """
    api = k8s.CustomObjectsApi(api_client)
    problems: list[str] = []
    try:
        pools = _read_each(_list(api, "ippools"), _ippool, "IPPool", problems)
    except ApiException as exc:
        if exc.status == 404:
            raise WhereaboutsPoolError(
                [f"this cluster serves no ippools.{GROUP}: is whereabouts installed here?"]
            ) from exc
        raise
    try:
        slice_pools = _read_each(
            _list(api, "nodeslicepools"), _node_slice_pool, "NodeSlicePool", problems
        )
    except ApiException as exc:
        if exc.status != 404:
            raise
        slice_pools = []
    if problems:
        raise WhereaboutsPoolError(problems)
    return pools, slice_pools


def _read_each(
    items: Iterable[Mapping[str, Any]],
    read: Callable[[Mapping[str, Any]], _Read],
    kind: str,
    problems: list[str],
) -> list[_Read]:
    """`read` of each item; what it cannot read is named in `problems`."""
    found = []
    for item in items:
        try:
            found.append(read(item))
        except _MALFORMED as exc:
            meta = item.get("metadata") if isinstance(item, Mapping) else None
            name = f"{meta.get('namespace', '')}/{meta.get('name', '')}" if meta else "?"
            problems.append(f"{kind} {name}: {type(exc).__name__}: {exc}")
    return found


def holdings_of(
    pools: Sequence[WhereaboutsPool],
    slice_pools: Sequence[NodeSlicePool],
    pod_nodes: Mapping[str, str] | None = None,
) -> Read:
    """The pyabouts holdings of whereabouts' allocations and node slices. `pod_nodes`: the node
    each live pod ("namespace/name") runs on, which tells a slice's pool from another network's
    where the names cannot (see pool_identity).

    Raises WhereaboutsPoolError naming every pool that cannot be read (nothing should be
    brought over from a picture with holes in it), but for one whose allocations all name pods
    that are gone, which is left out with a note.
    """
    problems: list[str] = []
    notes: list[str] = []
    holdings: list[Holding] = []
    networks_of_slice_pools: dict[str, set[str]] = {}
    moved = _in_their_nodes_slices(pools, slice_pools, pod_nodes or {})
    for pool in pools:
        try:
            network, node, slice_pool = pool_identity(pool, slice_pools, pod_nodes, moved)
            holdings.extend(list(_address_holdings(pool, network, node, slice_pool)))
        except _MALFORMED as exc:
            if not pool.allocations:
                continue  # an empty pool holds nothing to bring over
            if _holds_no_pod_now(pool, pod_nodes):
                notes.append(f"{pool.source}: not brought over ({exc}); {_LEAKS_ALONE}")
            else:
                problems.append(f"{pool.source}: {exc}")
            continue
        if slice_pool is not None:
            networks_of_slice_pools.setdefault(slice_pool.name, set()).add(network)
    for slice_pool in slice_pools:
        networks = networks_of_slice_pools.get(slice_pool.name, set())
        if len(networks) != 1:
            # Its name is network_name or the NAD's name; only its IPPools' names tell which.
            notes.append(
                f"{slice_pool.source}: not brought over, as no IPPool of its slices says which "
                "network_name it serves (pyabouts' nodes take slices of it afresh)"
                if not networks
                else f"{slice_pool.source}: its IPPools name networks {sorted(networks)}"
            )
            continue
        try:
            holdings.extend(_slice_holdings(slice_pool, networks.pop()))
        except _MALFORMED as exc:
            problems.append(f"{slice_pool.source}: {exc}")
    if problems:
        raise WhereaboutsPoolError(problems)
    return Read(holdings, len(pools) + len(slice_pools), notes)


def pool_identity(
    pool: WhereaboutsPool,
    slice_pools: Sequence[NodeSlicePool],
    pod_nodes: Mapping[str, str] | None = None,
    moved: Collection[tuple[str, str]] = (),
) -> tuple[str, str, NodeSlicePool | None]:
    """(network_name, node, its NodeSlicePool) of an IPPool, read from its name; node and
    NodeSlicePool are "" and None for the pool of a whole range.

    A name may read as the pool of a node's slice without the NodeSlicePool saying that node
    holds it: no node holds the slice now, another node does, or the slices were cut to another
    size since. It may as well be the pool of a network named "<network>-<node>" (or "<node>").
    A slice's pool holds its node's pods alone, so where the pool's live pods run (`pod_nodes`:
    node by "namespace/name") decides: all on that node, the slice's; else the other network's
    (so too for a name its holder's slice reads as, whose pods run elsewhere). But the pool of
    the slice its node holds now may also hold pods made again on another node, their DEL
    missed: it is still the slice's when its pods include some on that node and each of the
    others is also in its own node's slice of the same NodeSlicePool (`moved`: (pod,
    NodeSlicePool name) pairs, see _in_their_nodes_slices; bring_over leaves those out).
    With no live pod to go by, it is read as before pods were asked: as the slice's where no
    node holds it (refused without a network_name, which a network named like the node would
    read as too), else as the other network's.
    """
    suffix = normalize_range(pool.range)
    if pool.name == suffix:
        return "", "", None
    prefix = _without_suffix(pool.name, f"-{suffix}")
    if prefix is None:
        raise ValueError(f"its name does not end in its range {pool.range!r} written as {suffix!r}")
    readings = _readings(prefix, pool.range, slice_pools)
    live = _live_pods(pool, pod_nodes or {})
    nodes = set(live.values())

    def holds(node: str, slice_pool: NodeSlicePool) -> bool:
        elsewhere = [pod for pod, on in live.items() if on != node]
        return node in nodes and all((pod, slice_pool.name) in moved for pod in elsewhere)

    held = {r: p for r, p in readings.get(HELD, {}).items() if not nodes or holds(r[1], p)}
    if held:
        chosen = held
    elif nodes:
        chosen = {
            reading: slice_pool
            for kind in (UNHELD, ELSEWHERE)
            for reading, slice_pool in readings.get(kind, {}).items()
            if {reading[1]} == nodes
        }
    else:
        chosen = readings.get(UNHELD, {})
    if not chosen:
        return prefix, "", None
    if len(chosen) > 1:
        found = ", ".join(f"network {n!r} node {m!r}" for n, m in sorted(chosen))
        raise ValueError(f"its name reads more than one way ({found})")
    ((network, node), slice_pool), *_ = chosen.items()
    if network == "" and not nodes and node not in slice_pool.holders.values():
        raise ValueError(
            f"its name reads as the pool of network_name {prefix!r}, or as node {node!r}'s "
            f"slice of {slice_pool.source}, which no node holds now"
        )
    return network, node, slice_pool


_LEAKS_ALONE = "every allocation in it names a pod that no longer exists"


def _holds_no_pod_now(pool: WhereaboutsPool, pod_nodes: Mapping[str, str] | None) -> bool:
    """Whether, with `pod_nodes` (every pod, listed), each allocation of `pool` names a pod not
    among them: leaks, left out anyway. The pool of a node removed without its pods' DELs, say,
    whose name may no longer tell its network."""
    if pod_nodes is None or not isinstance(pool.allocations, Mapping):
        return False
    for allocation in pool.allocations.values():
        if not isinstance(allocation, Mapping):
            return False
        pod = _pod_of(str(allocation.get("podref", "")))
        if not pod or pod in pod_nodes:
            return False
    return True


def _readings(
    prefix: str, pool_range: str, slice_pools: Sequence[NodeSlicePool]
) -> dict[str, dict[tuple[str, str], NodeSlicePool]]:
    """kind -> (network_name, node) -> NodeSlicePool, for each way the IPPool name's `prefix`
    reads as the pool of a slice (see _slice_pool_names)."""
    readings: dict[str, dict[tuple[str, str], NodeSlicePool]] = {}
    for slice_pool in slice_pools:
        for network, node, kind in _slice_pool_names(prefix, pool_range, slice_pool):
            readings.setdefault(kind, {})[(network, node)] = slice_pool
    return readings


def _live_pods(pool: WhereaboutsPool, pod_nodes: Mapping[str, str]) -> dict[str, str]:
    """The node of each pod of `pool`'s allocations that runs on one."""
    pods = (_pod_of(str(allocation.get("podref", ""))) for allocation in pool.allocations.values())
    return {pod: pod_nodes[pod] for pod in pods if pod_nodes.get(pod)}


def _in_their_nodes_slices(
    pools: Sequence[WhereaboutsPool],
    slice_pools: Sequence[NodeSlicePool],
    pod_nodes: Mapping[str, str],
) -> set[tuple[str, str]]:
    """(pod, NodeSlicePool name) of each live pod with an allocation in the pool of the slice
    its node holds (by name) of that NodeSlicePool: a pod made again on another node shows
    there as well as in its first node's slice."""
    found: set[tuple[str, str]] = set()
    for pool in pools:
        try:
            prefix = _without_suffix(pool.name, f"-{normalize_range(pool.range)}")
            held = _readings(prefix, pool.range, slice_pools).get(HELD, {}) if prefix else {}
            live = _live_pods(pool, pod_nodes)
        except _MALFORMED:
            continue  # pool_identity names it
        for (_, node), slice_pool in held.items():
            found.update((pod, slice_pool.name) for pod, on in live.items() if on == node)
    return found


def normalize_range(text: str) -> str:
    """A range as whereabouts writes it into a pool's name."""
    if text.endswith(":"):
        text += "0"
    return text.replace(":", "-").replace("/", "-")


def _without_suffix(name: str, suffix: str) -> str | None:
    return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None


def _is_slice_of(text: str, slice_pool: NodeSlicePool) -> bool:
    """Whether the range `text` (in `slice_pool`'s range: _within) is one of its slices."""
    size = slice_pool.slice_size.strip().removeprefix("/")
    return str(netaddr.IPNetwork(text).prefixlen) == size


# How an IPPool's name reads as the pool of a slice (_slice_pool_names).
HELD = "held"  # by the node it names
UNHELD = "unheld"  # by no node now
ELSEWHERE = "elsewhere"  # held by another node, or no slice of this size (cut another way since)


def _slice_pool_names(
    prefix: str, pool_range: str, slice_pool: NodeSlicePool
) -> Iterator[tuple[str, str, str]]:
    """The (network_name, node, kind) readings of an IPPool name's `prefix` ("<network>-<node>"
    or "<node>") as the pool of a slice of `slice_pool`: by the slice's holder where it names
    it, else by the NodeSlicePool's name (its network's, or the NAD's without a network_name)."""
    if not _within(pool_range, slice_pool):
        return
    kind = ELSEWHERE
    if _is_slice_of(pool_range, slice_pool):
        holder = slice_pool.holders.get(str(netaddr.IPNetwork(pool_range).cidr))
        if holder is None:
            kind = UNHELD
        elif prefix in (holder, f"{slice_pool.name}-{holder}"):
            yield ("" if prefix == holder else slice_pool.name), holder, HELD
            return
    named = prefix.removeprefix(f"{slice_pool.name}-")
    if named and named != prefix:
        yield slice_pool.name, named, kind
    else:
        yield "", prefix, kind


def _within(text: str, slice_pool: NodeSlicePool) -> bool:
    """Whether the range `text` lies in `slice_pool`'s range."""
    try:
        network = netaddr.IPNetwork(text)
        whole = netaddr.IPNetwork(slice_pool.range)
    except (netaddr.AddrFormatError, ValueError):
        return False
    return network.version == whole.version and whole.first <= network.first <= whole.last


def _address_holdings(
    pool: WhereaboutsPool, network: str, node: str, slice_pool: NodeSlicePool | None
) -> Iterator[Holding]:
    whole = _whole_range(slice_pool.range if slice_pool else pool.range, network, pool.range)
    # whereabouts counts offsets from the address its range is written with.
    first = int(netaddr.IPNetwork(pool.range).ip)
    own = netaddr.IPNetwork(pool.range)
    for offset, allocation in sorted(pool.allocations.items()):
        if not offset.isdigit():
            raise ValueError(f"allocation key {offset!r} is not an offset")
        address = first + int(offset)
        if not own.first <= address <= own.last:
            raise ValueError(f"offset {offset} is outside {pool.range}")
        owner = Owner(
            container_id=str(allocation.get("id", "")),
            ifname=str(allocation.get("ifname", "")),
            pod=_pod_of(str(allocation.get("podref", ""))),
            node=node,
        )
        yield Holding(whole.pool, address, owner, whole, pool.source)


def _pod_of(podref: str) -> str:
    """The pod "namespace/name" of a whereabouts podref, or "" (no pod) when it names none:
    whereabouts wrote "/" for a call without K8S_POD_NAMESPACE and K8S_POD_NAME (a container
    outside Kubernetes), which no reconciler may take for a pod that is gone."""
    namespace, _, name = podref.partition("/")
    return podref if namespace and name else ""


def _slice_holdings(slice_pool: NodeSlicePool, network: str) -> Iterator[Holding]:
    whole = _whole_range(slice_pool.range, network, slice_pool.range)
    sliced = SlicedRange(whole, parse_slice_size(slice_pool.slice_size, whole))
    registry = sliced.registry_range()
    base = int(whole.network.first)
    for cidr, node in sorted(slice_pool.holders.items()):
        index = (int(netaddr.IPNetwork(cidr).first) - base) >> sliced.slice_bits
        if sliced.slice_network(index) != netaddr.IPNetwork(cidr):
            raise ValueError(f"{cidr} is not a /{sliced.prefixlen} slice of {slice_pool.range}")
        owner = slice_holder(sliced, index, node)
        yield Holding(registry.pool, index, owner, registry, slice_pool.source, sliced)


def _whole_range(text: str, network: str, family_of: str) -> AddressRange:
    """`text` as a range of `network` (of the family of `family_of`), all of it; RangeError
    when it gives no address (a /32, say), which whereabouts never gave from."""
    whole = build_range(
        text, range_start=None, range_end=None, exclude=[], pool=PoolId(network, _family(family_of))
    )
    if whole.unusable:
        raise RangeError(whole.unusable)
    return whole


def _family(text: str) -> Family:
    return 4 if netaddr.IPNetwork(text).version == 4 else 6


def _list(api: k8s.CustomObjectsApi, plural: str) -> Iterator[dict[str, Any]]:
    call = functools.partial(api.list_cluster_custom_object, GROUP, VERSION, plural)
    for page in list_pages(call):
        yield from page.get("items") or []


def _ippool(item: Mapping[str, Any]) -> WhereaboutsPool:
    meta, spec = item.get("metadata", {}), item.get("spec", {})
    return WhereaboutsPool(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        range=str(spec.get("range", "")),
        allocations=spec.get("allocations") or {},
    )


def _node_slice_pool(item: Mapping[str, Any]) -> NodeSlicePool:
    meta, spec = item.get("metadata", {}), item.get("spec", {})
    allocations = (item.get("status") or {}).get("allocations") or []
    holders = {
        str(netaddr.IPNetwork(a["sliceRange"]).cidr): a["nodeName"]
        for a in allocations
        if a.get("nodeName") and a.get("sliceRange")
    }
    return NodeSlicePool(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        range=str(spec.get("range", "")),
        slice_size=str(spec.get("sliceSize", "")),
        holders=holders,
    )
