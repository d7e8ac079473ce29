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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import netaddr
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from pyabouts.controller.pods import list_pages
from pyabouts.ipam.migration import Holding
from pyabouts.ipam.pool import Family, Owner, PoolId
from pyabouts.ipam.ranges import RangeError, build_range
from pyabouts.ipam.slices import SlicedRange, parse_slice_size, slice_holder

GROUP = "whereabouts.cni.cncf.io"
VERSION = "v1alpha1"


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
    try:
        pools = [_ippool(item) for item in _list(api, "ippools")]
    except ApiException as exc:
        if exc.status == 404:
            raise WhereaboutsPoolError(
                [f"this cluster serves no ippools.{GROUP}: is whereabouts installed here?"]
            ) from exc
        raise
    try:
        slice_pools = [_node_slice_pool(item) for item in _list(api, "nodeslicepools")]
    except ApiException as exc:
        if exc.status != 404:
            raise
        slice_pools = []
    return pools, slice_pools


def holdings_of(pools: Sequence[WhereaboutsPool], slice_pools: Sequence[NodeSlicePool]) -> Read:
    """The pyabouts holdings of whereabouts' allocations and node slices.

    Raises WhereaboutsPoolError naming every pool that cannot be read (nothing should be
    brought over from a picture with holes in it).
    """
    problems: list[str] = []
    holdings: list[Holding] = []
    networks_of_slice_pools: dict[str, set[str]] = {}
    for pool in pools:
        try:
            network, node, slice_pool = pool_identity(pool, slice_pools)
            holdings.extend(_address_holdings(pool, network, node, slice_pool))
        except (RangeError, ValueError, netaddr.AddrFormatError) as exc:
            if pool.allocations:  # an empty pool holds nothing to bring over
                problems.append(f"{pool.source}: {exc}")
            continue
        if slice_pool is not None:
            networks_of_slice_pools.setdefault(slice_pool.name, set()).add(network)
    notes: list[str] = []
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
        except (RangeError, ValueError, netaddr.AddrFormatError) as exc:
            problems.append(f"{slice_pool.source}: {exc}")
    if problems:
        raise WhereaboutsPoolError(problems)
    return Read(holdings, len(pools) + len(slice_pools), notes)


def pool_identity(
    pool: WhereaboutsPool, slice_pools: Sequence[NodeSlicePool]
) -> tuple[str, str, NodeSlicePool | None]:
    """(network_name, node, its NodeSlicePool) of an IPPool, read from its name; node and
    NodeSlicePool are "" and None for the pool of a whole range."""
    suffix = normalize_range(pool.range)
    if pool.name == suffix:
        return "", "", None
    prefix = _without_suffix(pool.name, f"-{suffix}")
    if prefix is None:
        raise ValueError(f"its name does not end in its range {pool.range!r} written as {suffix!r}")
    readings = {
        (network, node): slice_pool
        for slice_pool in slice_pools
        if _is_slice_of(pool.range, slice_pool)
        for network, node in _slice_pool_names(prefix, pool.range, slice_pool)
    }
    if not readings:
        return prefix, "", None
    if len(readings) > 1:
        found = ", ".join(f"network {n!r} node {m!r}" for n, m in sorted(readings))
        raise ValueError(f"its name reads more than one way ({found})")
    ((network, node), slice_pool), *_ = readings.items()
    if network == "" and node not in slice_pool.holders.values():
        raise ValueError(
            f"its name reads as the pool of network_name {prefix!r}, or as node {node!r}'s "
            f"slice of {slice_pool.source}, which no node holds now"
        )
    return network, node, slice_pool


def normalize_range(text: str) -> str:
    """A range as whereabouts writes it into a pool's name."""
    if text.endswith(":"):
        text += "0"
    return text.replace(":", "-").replace("/", "-")


def _without_suffix(name: str, suffix: str) -> str | None:
    return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None


def _is_slice_of(text: str, slice_pool: NodeSlicePool) -> bool:
    """Whether the range `text` is one of `slice_pool`'s slices."""
    try:
        network = netaddr.IPNetwork(text)
        whole = netaddr.IPNetwork(slice_pool.range)
    except (netaddr.AddrFormatError, ValueError):
        return False
    size = slice_pool.slice_size.strip().removeprefix("/")
    return (
        network.version == whole.version
        and str(network.prefixlen) == size
        and whole.first <= network.first <= whole.last
    )


def _slice_pool_names(
    prefix: str, slice_range: str, slice_pool: NodeSlicePool
) -> Iterator[tuple[str, str]]:
    """The (network_name, node) readings of an IPPool name's `prefix` ("<network>-<node>" or
    "<node>") for a slice of `slice_pool`: by the slice's holder when it has one, else by the
    NodeSlicePool's name (a node deleted since no longer holds its slice)."""
    holder = slice_pool.holders.get(str(netaddr.IPNetwork(slice_range).cidr))
    if holder is not None:
        if prefix == holder:
            yield "", holder
        elif prefix == f"{slice_pool.name}-{holder}":
            yield slice_pool.name, holder
        return
    named = prefix.removeprefix(f"{slice_pool.name}-")
    yield (slice_pool.name, named) if named != prefix and named else ("", prefix)


def _address_holdings(
    pool: WhereaboutsPool, network: str, node: str, slice_pool: NodeSlicePool | None
) -> Iterator[Holding]:
    whole = build_range(
        slice_pool.range if slice_pool else pool.range,
        range_start=None,
        range_end=None,
        exclude=[],
        pool=PoolId(network, _family(pool.range)),
    )
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
    whole = build_range(
        slice_pool.range,
        range_start=None,
        range_end=None,
        exclude=[],
        pool=PoolId(network, _family(slice_pool.range)),
    )
    sliced = SlicedRange(whole, parse_slice_size(slice_pool.slice_size, whole))
    registry = sliced.registry_range()
    base = int(whole.network.first)
    for cidr, node in sorted(slice_pool.holders.items()):
        index = (int(netaddr.IPNetwork(cidr).first) - base) >> sliced.slice_bits
        if sliced.slice_network(index) != netaddr.IPNetwork(cidr):
            raise ValueError(f"{cidr} is not a /{sliced.prefixlen} slice of {slice_pool.range}")
        owner = slice_holder(sliced, index, node)
        yield Holding(registry.pool, index, owner, registry, slice_pool.source, sliced)


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
