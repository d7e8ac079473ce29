"""The network configuration: pydantic models of the CNI netconf and its whereabouts-style `ipam`.

Keys, meanings and defaults follow whereabouts, so a NetworkAttachmentDefinition ports by
changing `"type": "whereabouts"` to `"type": "pyabouts"`. A flat file (JSON, the same keys)
fills what the inline config leaves empty; it is searched at `configuration_path`, then at
/etc/kubernetes/cni/net.d/pyabouts.d/pyabouts.conf, then /etc/cni/net.d/pyabouts.d/pyabouts.conf.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal

import netaddr
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pyabouts.ipam.errors import INVALID_CONFIG, INVALID_ENVIRONMENT, CniError
from pyabouts.ipam.pool import Family, PoolId
from pyabouts.ipam.ranges import AddressRange, RangeError, build_range, parse_address, parse_network
from pyabouts.ipam.slices import REGISTRY_MARK, SlicedRange, parse_slice_size

log = logging.getLogger(__name__)

PLUGIN_TYPE = "pyabouts"
LOG_LEVELS = ("debug", "verbose", "info", "warning", "error", "panic")


class _Model(BaseModel):
    # Unknown keys are ignored, as whereabouts does (its own tuning keys have no meaning here).
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


def _unset_when_empty(data: Any) -> Any:
    """A key given as "" or null is a key not given, as whereabouts reads it (a templated NAD
    renders an unset value so); its default applies."""
    if isinstance(data, dict):
        return {key: value for key, value in data.items() if value not in (None, "")}
    return data


# Both give the value as a program reads it (no spaces, an address without a /prefix): routes
# and static addresses go into the result as they are, for plugins in Go to parse.
def _an_address(value: str | None) -> str | None:
    return None if value is None else str(parse_address(value))


def _a_cidr(value: str) -> str:
    if "/" not in value:
        raise RangeError(f"{value!r} is not a CIDR (address/prefix)")
    return str(parse_network(value))


class RangeConf(_Model):
    range: str
    range_start: str | None = None
    range_end: str | None = None
    exclude: list[str] = Field(default_factory=list)

    _unset_empty = model_validator(mode="before")(_unset_when_empty)
    _check_bounds = field_validator("range_start", "range_end")(_an_address)


class Route(_Model):
    """A route of the result, with CNI 1.1's attributes (whereabouts copies them all)."""

    dst: str
    gw: str | None = None
    mtu: int | None = Field(default=None, ge=0)
    advmss: int | None = Field(default=None, ge=0)
    priority: int | None = Field(default=None, ge=0)
    table: int | None = Field(default=None, ge=0)
    scope: int | None = Field(default=None, ge=0, le=255)

    _unset_empty = model_validator(mode="before")(_unset_when_empty)
    _check_dst = field_validator("dst")(_a_cidr)
    _check_gw = field_validator("gw")(_an_address)


class Dns(_Model):
    nameservers: list[str] = Field(default_factory=list)
    domain: str | None = None
    search: list[str] = Field(default_factory=list)
    options: list[str] = Field(default_factory=list)

    _unset_empty = model_validator(mode="before")(_unset_when_empty)


class StaticAddress(_Model):
    address: str
    gateway: str | None = None

    _unset_empty = model_validator(mode="before")(_unset_when_empty)
    _check_address = field_validator("address")(_a_cidr)
    _check_gateway = field_validator("gateway")(_an_address)


class KubernetesConf(_Model):
    kubeconfig: str | None = None

    _unset_empty = model_validator(mode="before")(_unset_when_empty)


class IpamConf(_Model):
    type: str
    range: str | None = None
    range_start: str | None = None
    range_end: str | None = None
    exclude: list[str] = Field(default_factory=list)
    ip_ranges: list[RangeConf] = Field(default_factory=list, alias="ipRanges")
    network_name: str = ""
    # Accepted for whereabouts' NADs. pyabouts never gives an address twice within a
    # network_name, flag or not: identical ranges must share their pool, and overlapping ranges
    # sharing blocks costs nothing (ipam.pool). Independent pools come from network_name.
    enable_overlapping_ranges: bool = True
    gateway: str | None = None
    routes: list[Route] = Field(default_factory=list)
    dns: Dns | None = None
    addresses: list[StaticAddress] = Field(default_factory=list)
    log_file: str | None = None
    log_level: str | None = None
    configuration_path: str | None = None
    kubernetes: KubernetesConf = Field(default_factory=KubernetesConf)
    datastore: Literal["kubernetes", "etcd"] = "kubernetes"
    etcd_host: str | None = None
    etcd_username: str | None = None
    etcd_password: str | None = None
    etcd_key_file: str | None = None
    etcd_cert_file: str | None = None
    etcd_ca_cert_file: str | None = None
    # pyabouts' own: etcd_password over a connection without TLS is refused unless this says
    # the plaintext password is accepted (ipam.stores.etcd_settings).
    etcd_allow_plaintext_password: bool = False
    node_slice_size: str | None = None
    # pyabouts' own: seconds a released address rests before another pod may get it, so that
    # ARP/NDP caches and connection tracking elsewhere forget it first (docs: README).
    release_cooldown: int = Field(default=0, ge=0, le=86400)
    # pyabouts' own: a StatefulSet's pod keeps its address across re-creation (docs: README).
    sticky_statefulsets: bool = False
    # pyabouts' own: node-local runtime state (the per-pool queue locks).
    run_dir: str = "/run/pyabouts"
    # When the thin plugin finds no node agent: serve the request in its own process, or fail
    # with code 11 (a node whose agent must be up, e.g. to keep start-up cost bounded).
    agent_fallback: Literal["in-process", "fail"] = "in-process"

    _unset_empty = model_validator(mode="before")(_unset_when_empty)
    _check_bounds = field_validator("range_start", "range_end", "gateway")(_an_address)

    @field_validator("network_name")
    @classmethod
    def _names_no_registry(cls, value: str) -> str:
        # A slice registry's pool is "<network_name>#node-slices ...": a network named so
        # would allocate from another network's registry.
        if REGISTRY_MARK in value:
            raise ValueError(f"must not contain {REGISTRY_MARK!r}")
        return value

    @field_validator("type")
    @classmethod
    def _is_pyabouts(cls, value: str) -> str:
        if value != PLUGIN_TYPE:
            raise ValueError(f"must be {PLUGIN_TYPE!r}")
        return value

    @field_validator("log_level")
    @classmethod
    def _is_level(cls, value: str | None) -> str | None:
        """A level of LOG_LEVELS; any other leaves the default, as whereabouts does: a word of
        a logging key never fails a pod's network."""
        level = value.lower() if value else value
        level = "warning" if level == "warn" else level
        return level if level in LOG_LEVELS else None


class RuntimeConf(_Model):
    ips: list[str] = Field(default_factory=list)


class CniArgsConf(_Model):
    ips: list[str] = Field(default_factory=list)


class ArgsConf(_Model):
    cni: CniArgsConf = Field(default_factory=CniArgsConf)


# A network config's name is stored with every address given for it (CNI GC is scoped by it),
# and whoever writes a NAD chooses it: an ADD refuses a longer one (see check_storable_name),
# which would make a pool's blocks too big to store.
MAX_NETWORK_NAME = 253


def check_storable_name(netconf: NetConf) -> None:
    """CniError 7 when the config's name or its ipam.network_name is too long to store with an
    address (each is, in every block of the pool). An ADD's check alone: a DEL of an address
    given before it was made must still free it."""
    for key, value in (("name", netconf.name), ("ipam.network_name", netconf.ipam.network_name)):
        if len(value) > MAX_NETWORK_NAME:
            raise CniError(
                INVALID_CONFIG,
                f"invalid network config: {key}={_quoted(value)}: an ADD takes one of at most "
                f"{MAX_NETWORK_NAME} characters (it is stored with the address)",
            )


class NetConf(_Model):
    cni_version: str = Field(default="", alias="cniVersion")
    name: str = ""
    type: str = ""
    ipam: IpamConf
    capabilities: dict[str, bool] = Field(default_factory=dict)
    runtime_config: RuntimeConf = Field(default_factory=RuntimeConf, alias="runtimeConfig")
    args: ArgsConf = Field(default_factory=ArgsConf)


@dataclass(frozen=True, slots=True)
class PluginConfig:
    """A validated configuration, with its ranges parsed: what the rest of pyabouts works from."""

    netconf: NetConf
    ranges: tuple[AddressRange, ...]
    flat_file: str | None  # the flat file that filled gaps, if any
    # With node_slice_size: the ranges it cuts, and how; else empty.
    slices: tuple[SlicedRange, ...] = ()
    # Why no address can be given (a range that gives none, see AddressRange.unusable; a
    # node_slice_size that cuts no range), else "": ADD and STATUS are refused, while DEL,
    # CHECK and GC go on, so that a config edited so never strands its pods' DELs, which
    # kubelet retries for ever.
    cannot_give: str = ""

    def check_can_give(self) -> None:
        """CniError 7 saying why no address can be given, if so (see cannot_give)."""
        if self.cannot_give:
            raise CniError(INVALID_CONFIG, f"invalid network config: {self.cannot_give}")

    @property
    def ipam(self) -> IpamConf:
        return self.netconf.ipam


@dataclass(frozen=True, slots=True)
class FlatFile:
    """A flat file that was read: where, and its keys."""

    path: str
    keys: dict[str, Any]


def load_config(raw: dict[str, Any], flat: FlatFile | None = None) -> PluginConfig:
    """Merge the flat file into the inline `ipam`, validate everything, and parse the ranges.

    Which flat file applies is the caller's to say, and the caller reads it: the plugin process
    the one `configuration_path` names (ipam.stores.flat_file.read_flat_file), the node agent
    its own.
    """
    inline = raw.get("ipam")
    if not isinstance(inline, dict):
        raise CniError(INVALID_CONFIG, "network config has no 'ipam' object")
    from_file = flat_file_defaults(inline, flat.keys) if flat else {}
    merged = {**raw, "ipam": fill_empty(inline, from_file)}
    try:
        netconf = NetConf.model_validate(merged)
    except ValidationError as exc:
        hidden = {key for key in from_file if inline.get(key) in (None, "", [], {})}
        raise CniError(INVALID_CONFIG, describe_validation_error(exc, hidden)) from exc
    ranges, unusable = _build_ranges(netconf.ipam)
    slices, uncut = _slice_ranges(netconf.ipam, ranges)
    return PluginConfig(
        netconf=netconf,
        ranges=ranges,
        flat_file=flat.path if flat else None,
        slices=slices,
        cannot_give=unusable or uncut,
    )


def requested_addresses(netconf: NetConf, cni_args_ip: str | None) -> list[netaddr.IPAddress]:
    """Addresses asked for, from runtimeConfig.ips (with the `ips` capability), args.cni.ips and
    CNI_ARGS IP=a,b, in that order, without repeats."""
    sources: list[tuple[str, str]] = []
    if netconf.capabilities.get("ips"):
        sources += [
            (f"runtimeConfig.ips[{i}]", v) for i, v in enumerate(netconf.runtime_config.ips)
        ]
    sources += [(f"args.cni.ips[{i}]", v) for i, v in enumerate(netconf.args.cni.ips)]
    if cni_args_ip:
        sources += [("CNI_ARGS IP", v) for v in cni_args_ip.split(",") if v.strip()]
    found: dict[netaddr.IPAddress, None] = {}  # in order, once each (a pod's writer sets them)
    for where, text in sources:
        try:
            address = parse_address(text)
        except RangeError as exc:
            # CNI_ARGS is the runtime's environment; the others are the network config.
            code = INVALID_ENVIRONMENT if where == "CNI_ARGS IP" else INVALID_CONFIG
            raise CniError(code, f"{where}: {exc}") from exc
        found.setdefault(address)
    return list(found)


# What a flat file says of how to reach its etcd: given only to a config that names no other
# etcd_host. A network config is written by namespace users; the node's credentials must not
# follow it to a host of its choosing.
ETCD_CONNECTION_KEYS = frozenset(
    {
        "etcd_username",
        "etcd_password",
        "etcd_key_file",
        "etcd_cert_file",
        "etcd_ca_cert_file",
        "etcd_allow_plaintext_password",
    }
)


def flat_file_defaults(inline: dict[str, Any], keys: dict[str, Any]) -> dict[str, Any]:
    """The flat file's `keys` that may fill what `inline` leaves empty: all of them, but its
    etcd credentials and TLS files only when `inline` names no etcd_host or the file's own.
    Nor may `inline` name the file's client certificate or key itself for another etcd_host
    (CniError 7)."""
    host = inline.get("etcd_host")
    if host in (None, "") or host == keys.get("etcd_host"):
        return keys
    for key in ("etcd_cert_file", "etcd_key_file"):
        named, own = inline.get(key), keys.get(key)
        if isinstance(named, str) and isinstance(own, str) and _same_path(named, own):
            raise CniError(
                INVALID_CONFIG,
                f"ipam.{key} names the node's own (its flat file's), which goes only to the "
                f"flat file's etcd_host, not to ipam.etcd_host={host!r}",
            )
    return {key: value for key, value in keys.items() if key not in ETCD_CONNECTION_KEYS}


def _same_path(a: str, b: str) -> bool:
    return bool(a and b) and os.path.normpath(a) == os.path.normpath(b)


def fill_empty(inline: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`inline` with every key it leaves empty taken from `defaults`, recursively for objects."""
    merged = dict(inline)
    for key, value in defaults.items():
        mine = merged.get(key)
        if isinstance(mine, dict) and isinstance(value, dict):
            merged[key] = fill_empty(mine, value)
        elif mine in (None, "", [], {}):
            merged[key] = value
    return merged


def describe_validation_error(exc: ValidationError, from_file: Collection[str] = ()) -> str:
    """One line per problem, naming the key and the value that was given; a value that came
    from the flat file (an `ipam` key in `from_file`) is not repeated: the file may be secret."""
    problems = []
    for error in exc.errors():
        loc = error["loc"]
        where = ".".join(str(part) for part in loc) or "config"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            problems.append(f"{where}: is required")
        elif len(loc) > 1 and loc[0] == "ipam" and loc[1] in from_file:
            given = error["input"]  # a validator's message may quote it: then no message
            if isinstance(given, str) and given and (given in message or repr(given) in message):
                message = "not a valid value (not repeated: the file may be secret)"
            problems.append(f"{where} (from the flat file): {message}")
        else:
            given = error["input"]
            if isinstance(given, str) and len(repr(given)) > QUOTED_MAX:
                message = message.replace(repr(given), "it")  # quoted once, cut short
            problems.append(f"{where}={_quoted(given)}: {message}")
    return "invalid network config: " + "; ".join(problems)


QUOTED_MAX = 100  # characters of a bad value an error repeats: a NAD's writer sets its size


def _quoted(value: object) -> str:
    text = repr(value)
    if len(text) <= QUOTED_MAX:
        return text
    return f"{text[:QUOTED_MAX]}... ({len(text)} characters)"


def flat_file_settings(flat: FlatFile | None) -> IpamConf:
    """A flat file's keys as settings of their own (the reconciler's, the agent's datastore);
    the defaults (IPPools) when there is none."""
    keys = flat.keys if flat else {}
    try:
        return IpamConf.model_validate({**keys, "type": PLUGIN_TYPE})
    except ValidationError as exc:
        raise CniError(INVALID_CONFIG, describe_validation_error(exc, keys)) from exc


def _build_ranges(ipam: IpamConf) -> tuple[tuple[AddressRange, ...], str]:
    """The config's ranges, and where the first that gives nothing is written and why ("" when
    each gives some: see AddressRange.unusable)."""
    entries: list[tuple[str, RangeConf]] = []
    if ipam.range:
        top = RangeConf(
            range=ipam.range,
            range_start=ipam.range_start,
            range_end=ipam.range_end,
            exclude=ipam.exclude,
        )
        entries.append(("ipam.", top))
    entries += [(f"ipam.ipRanges[{i}].", r) for i, r in enumerate(ipam.ip_ranges)]
    if not entries:
        raise CniError(
            INVALID_CONFIG, "invalid network config: ipam.range or ipam.ipRanges is required"
        )
    gateway = parse_address(ipam.gateway) if ipam.gateway else None
    # The gateway, and the static `addresses` the result always lists (an interface holding
    # one twice fails: macvlan's "file exists") with their gateways, are never given to a pod.
    kept_out = [gateway] if gateway is not None else []
    for static in ipam.addresses:
        kept_out.append(parse_network(static.address).ip)
        if static.gateway:
            kept_out.append(parse_address(static.gateway))
    ranges = []
    unusable = ""
    for key_prefix, entry in entries:
        try:
            network = parse_network(entry.range.split("-", 1)[-1]).cidr
            family: Family = 4 if network.version == 4 else 6
            # The gateway the result names is never given to a pod (as host-local; whereabouts
            # gives it, and its users exclude it by hand): a pod holding it breaks the network.
            # Nor are the static addresses (whereabouts gives them too).
            exclude = [*entry.exclude, *(str(a) for a in kept_out if a.version == family)]
            # One pool per network_name and family, whatever enable_overlapping_ranges says:
            # two NADs on one range must share it (whereabouts keys its IPPool by range), and
            # a NAD cannot know whether another one on an overlapping range sets the flag.
            pool = PoolId(network=ipam.network_name, family=family)
            rng = build_range(
                entry.range,
                range_start=entry.range_start,
                range_end=entry.range_end,
                exclude=exclude,
                pool=pool,
            )
        except RangeError as exc:
            where = f"{key_prefix}{exc.key}"
            raise CniError(INVALID_CONFIG, f"invalid network config: {where}: {exc}") from exc
        ranges.append(rng)
        if rng.unusable and not unusable:
            unusable = f"{key_prefix}range: {rng.unusable}"
    return tuple(ranges), unusable


def _slice_ranges(
    ipam: IpamConf, ranges: tuple[AddressRange, ...]
) -> tuple[tuple[SlicedRange, ...], str]:
    """The ranges `node_slice_size` cuts: each one it fits (an IPv4 size leaves a dual-stack
    config's IPv6 range whole, and the other way round); and, when it fits none, why (for
    PluginConfig.cannot_give). A range of a family it cuts but smaller than a slice stays
    whole too, with a warning. A range that gives nothing (see AddressRange.unusable) counts
    for whether the size fits, but is not cut."""
    if not ipam.node_slice_size:
        return (), ""
    cut: list[SlicedRange] = []
    refusals: list[tuple[AddressRange, str]] = []
    fits = set()
    for rng in ranges:
        try:
            sliced = SlicedRange(rng, parse_slice_size(ipam.node_slice_size, rng))
        except RangeError as exc:
            refusals.append((rng, str(exc)))
            continue
        fits.add(rng.family)
        if not rng.unusable:
            cut.append(sliced)
    if not fits:
        return (), f"ipam.{refusals[0][1]}"
    for rng, why in refusals:
        if rng.family in fits:
            log.warning("range %s is not cut into node slices: %s", rng.text, why)
    return tuple(cut), ""
