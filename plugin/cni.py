"""The CNI protocol: versions, CNI_ARGS, result shapes and error JSON. Standard library only."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyabouts.ipam.errors import DECODE_FAILURE, INCOMPATIBLE_VERSION, INVALID_ENVIRONMENT, CniError

SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
# The first version that knows each command (CHECK came in 0.4.0, GC and STATUS in 1.1.0).
COMMAND_SINCE = {"ADD": "0.1.0", "DEL": "0.1.0", "CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}
# Before it, a result holds one address of each family ("ip4", "ip6"), not a list.
IP_LIST_SINCE = (0, 3, 0)
KNOWN_ARGS = frozenset(
    {
        "IgnoreUnknown",
        "K8S_POD_NAMESPACE",
        "K8S_POD_NAME",
        "K8S_POD_INFRA_CONTAINER_ID",
        "K8S_POD_UID",
        "IP",
        "MAC",
        "GATEWAY",
    }
)


@dataclass(frozen=True, slots=True)
class IpConfig:
    """One address of a result: CIDR, family and optional gateway."""

    address: str
    family: int
    gateway: str | None = None


def decode_netconf(stdin: bytes) -> dict[str, Any]:
    """The network config object from stdin; CNI code 6 when it is not a JSON object."""
    try:
        raw = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CniError(DECODE_FAILURE, f"network config is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # deeper than the parser goes: no config nests like that
        raise CniError(DECODE_FAILURE, "network config is nested too deeply") from exc
    if not isinstance(raw, dict):
        raise CniError(DECODE_FAILURE, "network config must be a JSON object")
    # A "\ud800" escape decodes to half a character, which no store can encode: refused here,
    # not as an internal error where a name is written. Looked for only where one is escaped.
    try:
        lone = b"\\u" in stdin and _has_lone_surrogate(raw)
    except RecursionError as exc:
        raise CniError(DECODE_FAILURE, "network config is nested too deeply") from exc
    if lone:
        raise CniError(DECODE_FAILURE, "network config holds a lone UTF-16 surrogate: not text")
    return raw


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


def version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def check_version(command: str, version: str) -> None:
    """Refuse config versions this plugin does not speak, or that predate the command."""
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            INCOMPATIBLE_VERSION,
            f"cniVersion {version!r} is not supported; supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    since = COMMAND_SINCE.get(command)
    if since is not None and version_key(version) < version_key(since):
        raise CniError(
            INCOMPATIBLE_VERSION, f"{command} needs cniVersion {since} or later, got {version}"
        )


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS "K=V;K=V" as a dict. A repeated key keeps its last value (Multus repeats some).

    Unknown keys are an error unless IgnoreUnknown is set to a true value.
    """
    args: dict[str, str] = {}
    for item in text.split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS: {item!r} is not KEY=VALUE")
        args[key.strip()] = value.strip()
    unknown = sorted(set(args) - KNOWN_ARGS)
    ignore = args.get("IgnoreUnknown", "").lower() in ("1", "true")
    if unknown and not ignore:
        raise CniError(
            INVALID_ENVIRONMENT,
            f"CNI_ARGS: unknown key(s) {', '.join(unknown)} (set IgnoreUnknown=1 to allow)",
        )
    return args


def require_env(env: Mapping[str, str], *names: str) -> list[str]:
    values = [env.get(name, "") for name in names]
    missing = [name for name, value in zip(names, values, strict=True) if not value]
    if missing:
        raise CniError(
            INVALID_ENVIRONMENT, f"missing environment variable(s): {', '.join(missing)}"
        )
    return values


def render_result(
    version: str,
    ips: Sequence[IpConfig],
    routes: Sequence[Mapping[str, Any]],
    dns: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """An IPAM result in the shape of `version` (no interfaces: the delegating plugin adds them)."""
    if legacy_result(version):
        return _render_legacy_result(version, ips, routes, dns)
    with_family = version_key(version) < (1, 0, 0)  # 0.3.x and 0.4.0 carry "version": "4"|"6"
    entries = []
    for ip in ips:
        entry: dict[str, Any] = {"address": ip.address}
        if with_family:
            entry = {"version": str(ip.family), **entry}
        if ip.gateway:
            entry["gateway"] = ip.gateway
        entries.append(entry)
    result: dict[str, Any] = {"cniVersion": version, "ips": entries}
    if routes:
        result["routes"] = [dict(r) for r in routes]
    if dns:
        result["dns"] = dict(dns)
    return result


def legacy_result(version: str) -> bool:
    """Whether a result of `version` holds one address of each family (0.1.0 and 0.2.0)."""
    return version_key(version) < IP_LIST_SINCE


def check_one_address_per_family(version: str, families: Sequence[int]) -> None:
    """Refuse (code 1) a config that gives more addresses of a family than the result of
    `version` holds (see legacy_result), before anything is allocated, as whereabouts refuses
    them: a result would leave one out, held for nobody."""
    if not legacy_result(version):
        return
    for family in (4, 6):
        if (count := families.count(family)) > 1:
            raise CniError(
                INCOMPATIBLE_VERSION,
                f"cniVersion {version} carries one IPv{family} address, and this config gives "
                f"{count} (its ranges and static addresses): use cniVersion 0.3.0 or later",
            )


def _render_legacy_result(
    version: str,
    ips: Sequence[IpConfig],
    routes: Sequence[Mapping[str, Any]],
    dns: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """A 0.1.0 or 0.2.0 result: "ip4" and "ip6", each with its family's routes, as libcni
    converts a later result to it (its types/040 convertTo02x)."""
    result: dict[str, Any] = {"cniVersion": version}
    for ip in ips:
        key = f"ip{ip.family}"
        if key in result:
            continue  # check_one_address_per_family refused it before: one of each
        entry: dict[str, Any] = {"ip": ip.address}
        if ip.gateway:
            entry["gateway"] = ip.gateway
        own = [
            {k: r[k] for k in ("dst", "gw") if k in r}
            for r in routes
            if _route_family(r) == ip.family
        ]
        if own:
            entry["routes"] = own
        result[key] = entry
    if dns:
        result["dns"] = dict(dns)
    return result


def _route_family(route: Mapping[str, Any]) -> int:
    return 6 if ":" in str(route.get("dst", "")) else 4


def render_error(version: str, error: CniError) -> dict[str, Any]:
    body: dict[str, Any] = {"cniVersion": version, "code": error.code, "msg": error.msg}
    if error.details:
        body["details"] = error.details
    return body


def render_version() -> dict[str, Any]:
    return {"cniVersion": LATEST_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}
