"""ADD, DEL, CHECK, GC and STATUS: config -> ipam operation -> CNI result."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import netaddr

from pyabouts.ipam import operations
from pyabouts.ipam.config import PluginConfig, check_storable_name, requested_addresses
from pyabouts.ipam.errors import (
    INVALID_CONFIG,
    NOT_AVAILABLE,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    CniError,
)
from pyabouts.ipam.pool import Owner
from pyabouts.ipam.ranges import RangeError, parse_address
from pyabouts.ipam.transaction import Transactions
from pyabouts.plugin.backend import Backend
from pyabouts.plugin.cni import (
    LATEST_VERSION,
    IpConfig,
    check_one_address_per_family,
    legacy_result,
    render_result,
    require_env,
)
from pyabouts.plugin.logs import configure_logging

log = logging.getLogger(__name__)

DEADLINE_SECONDS = 60.0  # the whole command, retries included (kubelet waits 2 min); then 11
VALID_ATTACHMENTS = "cni.dev/valid-attachments"
# The same list under the name CNI 1.1.0's text first gave it (cni#1101): libcni sends both.
SPEC_ATTACHMENTS = "cni.dev/attachments"


def run_command(
    command: str,
    env: Mapping[str, str],
    cni_args: Mapping[str, str],
    raw: dict[str, Any],
    *,
    netconf: bytes,
    backend: Backend,
    deadline: float | None = None,
) -> dict[str, Any] | None:
    """Serve one CNI command on `raw`, the network config decoded from `netconf`; the result to
    print, or None when the command prints nothing. `deadline` (time.monotonic()) defaults to
    DEADLINE_SECONDS from now."""
    deadline = time.monotonic() + DEADLINE_SECONDS if deadline is None else deadline
    writes_by = None if command in ("CHECK", "STATUS") else deadline
    try:
        config = backend.config(raw, netconf)
        if command in ("ADD", "STATUS"):
            config.check_can_give()
        if backend.configures_logging:
            configure_logging(config.ipam.log_file, config.ipam.log_level)
        pools = [rng.pool for rng in config.ranges]
        with backend.transactions(config.ipam, pools, writes_by=writes_by) as transactions:
            if command == "ADD":
                return _add(transactions, config, env, cni_args, deadline, backend=backend)
            if command == "DEL":
                _delete(transactions, config, env, deadline)
            elif command == "CHECK":
                _check(transactions, config, env, raw, deadline)
            elif command == "GC":
                _collect_garbage(transactions, config, raw, deadline, node=backend.node)
            elif command == "STATUS":
                _status(transactions, config, deadline, node=backend.node)
    except CniError as error:
        if command == "STATUS" and error.code == TRY_AGAIN_LATER:
            # The datastore (or the agent) out of reach: ADD cannot be served, as CNI 1.1's
            # STATUS says with code 50.
            raise CniError(NOT_AVAILABLE, error.msg, error.details) from error
        raise
    return None


def _add(
    transactions: Transactions,
    config: PluginConfig,
    env: Mapping[str, str],
    cni_args: Mapping[str, str],
    deadline: float,
    *,
    backend: Backend,
) -> dict[str, Any]:
    container_id, ifname = require_env(env, "CNI_CONTAINERID", "CNI_IFNAME")
    check_storable_name(config.netconf)
    version = config.netconf.cni_version or LATEST_VERSION  # as the handler took one without
    if legacy_result(version):
        families = [rng.family for rng in config.ranges]
        families += [parse_address(a.address).version for a in config.ipam.addresses]
        check_one_address_per_family(version, families)
    requested = requested_addresses(config.netconf, cni_args.get("IP"))
    pod = ""
    if cni_args.get("K8S_POD_NAME"):
        pod = f"{cni_args.get('K8S_POD_NAMESPACE', '')}/{cni_args['K8S_POD_NAME']}"
    owner = Owner(
        container_id=container_id,
        ifname=ifname,
        pod=pod,
        pod_uid=cni_args.get("K8S_POD_UID", ""),
        node=backend.node,
        cni_network=config.netconf.name,
        allocated_at=int(time.time()),
        cooldown=config.ipam.release_cooldown,
        sticky=config.ipam.sticky_statefulsets,
    )
    addresses = operations.allocate(
        transactions,
        config.ranges,
        owner,
        requested,
        deadline=deadline,
        spread_nodes=backend.spreads_nodes,
        sliced=config.slices,
        now=owner.allocated_at,
    )
    ipam = config.ipam
    gateway = parse_address(ipam.gateway) if ipam.gateway else None
    ips = [
        IpConfig(
            address=rng.format(address),
            family=rng.family,
            gateway=str(gateway) if gateway and gateway.version == rng.family else None,
        )
        for rng, address in zip(config.ranges, addresses, strict=True)
    ]
    ips += [
        IpConfig(address=a.address, family=parse_address(a.address).version, gateway=a.gateway)
        for a in ipam.addresses
    ]
    log.info("ADD %s %s (%s): %s", container_id, ifname, pod, ", ".join(i.address for i in ips))
    return render_result(
        version,
        ips,
        routes=[r.model_dump(exclude_none=True) for r in ipam.routes],
        dns=ipam.dns.model_dump(exclude_defaults=True) if ipam.dns else None,
    )


def _delete(
    transactions: Transactions, config: PluginConfig, env: Mapping[str, str], deadline: float
) -> None:
    container_id, ifname = require_env(env, "CNI_CONTAINERID", "CNI_IFNAME")
    freed = operations.release(
        transactions, config.ranges, container_id, ifname, deadline=deadline, now=int(time.time())
    )
    log.info("DEL %s %s: freed %d address(es)", container_id, ifname, len(freed))


def _check(
    transactions: Transactions,
    config: PluginConfig,
    env: Mapping[str, str],
    raw: dict[str, Any],
    deadline: float,
) -> None:
    container_id, ifname = require_env(env, "CNI_CONTAINERID", "CNI_IFNAME")
    held = operations.held_addresses(
        transactions, config.ranges, container_id, ifname, deadline=deadline
    )
    for rng, addresses in zip(config.ranges, held, strict=True):
        if not addresses:
            raise CniError(
                UNKNOWN_CONTAINER,
                f"no address of range {rng.text} is allocated to container {container_id} "
                f"interface {ifname}",
            )
    mine = {
        (rng.family, a)
        for rng, addresses in zip(config.ranges, held, strict=True)
        for a in addresses
    }
    previous = _previous_addresses(raw)
    for address in previous:
        in_ranges = any(rng.can_give(address) for rng in config.ranges)
        if in_ranges and (address.version, int(address)) not in mine:
            raise CniError(
                UNKNOWN_CONTAINER,
                f"address {address} from prevResult is not allocated to container "
                f"{container_id} interface {ifname}",
            )
    # And the other way round: what it holds is what the runtime says the interface has.
    listed = {(address.version, int(address)) for address in previous}
    missing = sorted(mine - listed) if isinstance(raw.get("prevResult"), dict) else []
    if missing:
        family, value = missing[0]
        raise CniError(
            UNKNOWN_CONTAINER,
            f"address {netaddr.IPAddress(value, family)} allocated to container "
            f"{container_id} interface {ifname} is not in prevResult",
        )


def _collect_garbage(
    transactions: Transactions,
    config: PluginConfig,
    raw: dict[str, Any],
    deadline: float,
    *,
    node: str,
) -> None:
    valid = _valid_attachments(raw)
    network = config.netconf.name
    freed = operations.release_stale(
        transactions,
        config.ranges,
        valid,
        node=node,
        cni_network=network,
        deadline=deadline,
        now=int(time.time()),
    )
    log.info("GC on %s for %r: freed %d address(es) no longer valid", node, network, len(freed))


def _status(
    transactions: Transactions, config: PluginConfig, deadline: float, *, node: str
) -> None:
    free = operations.free_counts(
        transactions,
        config.ranges,
        deadline=deadline,
        sliced=config.slices,
        node=node,
        now=int(time.time()),
    )
    exhausted = [rng.text for rng, count in zip(config.ranges, free, strict=True) if count == 0]
    if exhausted:
        on = f" for node {node!r} (node_slice_size)" if config.slices else ""
        raise CniError(
            NOT_AVAILABLE, f"cannot serve ADD: range(s) {', '.join(exhausted)} exhausted{on}"
        )


def _valid_attachments(raw: dict[str, Any]) -> set[tuple[str, str]]:
    """The attachments a GC keeps. A GC that names none is refused: it would free every address
    of this node and network. An empty list (libcni sends null for one) keeps none."""
    key = VALID_ATTACHMENTS if VALID_ATTACHMENTS in raw else SPEC_ATTACHMENTS
    if key not in raw:
        raise CniError(
            INVALID_CONFIG,
            f"invalid network config: a GC needs {VALID_ATTACHMENTS}, the attachments to keep",
        )
    items = raw[key] if raw[key] is not None else []
    if not isinstance(items, list) or not all(
        isinstance(i, dict)
        and isinstance(i.get("containerID"), str)
        and isinstance(i.get("ifname"), str)
        for i in items
    ):
        raise CniError(
            INVALID_CONFIG,
            f"invalid network config: {key} must be a list of {{containerID, ifname}} objects",
        )
    return {(i["containerID"], i["ifname"]) for i in items}


def _previous_addresses(raw: dict[str, Any]) -> list[netaddr.IPAddress]:
    prev = raw.get("prevResult")
    ips = prev.get("ips", []) if isinstance(prev, dict) else []
    found = []
    for entry in ips if isinstance(ips, list) else []:
        address = entry.get("address") if isinstance(entry, dict) else None
        if isinstance(address, str):
            try:
                found.append(parse_address(address))
            except RangeError as exc:
                raise CniError(INVALID_CONFIG, f"prevResult: {exc}") from exc
    return found
