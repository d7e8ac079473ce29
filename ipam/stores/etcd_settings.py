"""How to reach etcd, from the `ipam` keys: endpoints, TLS and credentials, checked without I/O.

Pure on purpose: the plugin, the node agent (from its own settings) and the reconciler all build
EtcdSettings through `from_config`, and every mistake is code 7, naming the keys to fix, before
anything is dialled. TLS fails closed: `https://` without `etcd_ca_cert_file` verifies etcd's
certificate against the system's trusted roots, never skips the check. Reading the TLS files and
connecting are ipam.stores.etcd's.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from pyabouts.ipam.config import IpamConf
from pyabouts.ipam.errors import INVALID_CONFIG, CniError

DEFAULT_PORT = 2379
SCHEMES = ("http", "https")
# The TLS keys, in the order messages name them.
CA_KEY, CERT_KEY, KEY_KEY = "etcd_ca_cert_file", "etcd_cert_file", "etcd_key_file"
ALLOW_PLAINTEXT_KEY = "etcd_allow_plaintext_password"


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    endpoints: tuple[tuple[str, int], ...]
    timeout: float
    username: str | None = None
    password: str | None = None
    ca_cert: str | None = None  # None with TLS: the system's trusted roots (grpc's default)
    cert: str | None = None
    key: str | None = None
    secure: bool = False

    @classmethod
    def from_config(cls, ipam: IpamConf, *, timeout: float) -> EtcdSettings:
        """The settings `ipam` asks for; CniError(INVALID_CONFIG) saying what to fix if wrong."""
        if not ipam.etcd_host:
            raise invalid_config("ipam.etcd_host is required")
        tls_files = _tls_files(ipam)
        secure = uses_tls(ipam.etcd_host, tls_files)
        _check_pair(CERT_KEY, ipam.etcd_cert_file, KEY_KEY, ipam.etcd_key_file)
        _check_pair("etcd_username", ipam.etcd_username, "etcd_password", ipam.etcd_password)
        _check_password_is_protected(ipam, secure)
        return cls(
            endpoints=tuple(parse_endpoints(ipam.etcd_host)),
            timeout=timeout,
            username=ipam.etcd_username or None,
            password=ipam.etcd_password or None,
            ca_cert=tls_files.get(CA_KEY),
            cert=tls_files.get(CERT_KEY),
            key=tls_files.get(KEY_KEY),
            secure=secure,
        )

    def describe(self) -> str:
        return ",".join(netloc(host, port) for host, port in self.endpoints)


def url_host(host: str) -> str:
    """A host as grpc dials it and people read it: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def netloc(host: str, port: int) -> str:
    return f"{url_host(host)}:{port}"


def uses_tls(etcd_host: str, tls_files: dict[str, str]) -> bool:
    """Whether to speak TLS: https:// endpoints, or any TLS file with endpoints that name no
    scheme (whereabouts' way). http:// with TLS files is a contradiction, refused."""
    scheme = endpoint_scheme(etcd_host)
    if scheme == "http" and tls_files:
        raise invalid_config(
            f"ipam.etcd_host={etcd_host!r} uses http:// (no TLS) but {', '.join(tls_files)} "
            f"{'is' if len(tls_files) == 1 else 'are'} set: use https:// for TLS, or drop the "
            f"TLS files"
        )
    return scheme == "https" or bool(tls_files)


def endpoint_scheme(etcd_host: str) -> str | None:
    """The scheme the endpoints name, "http" or "https", or None if none names one. One TLS
    setting holds for every endpoint, so http:// and https:// cannot be mixed."""
    schemes = {_scheme_of(item, etcd_host) for item in _items(etcd_host)} - {None}
    if len(schemes) > 1:
        raise invalid_config(
            f"ipam.etcd_host={etcd_host!r} mixes http:// and https:// endpoints: one TLS setting "
            f"applies to all of them, so give them all the same scheme"
        )
    return schemes.pop() if schemes else None


def parse_endpoints(etcd_host: str) -> list[tuple[str, int]]:
    """`etcd_host`: "host:port" (an http(s):// scheme is allowed), several comma-separated; an
    IPv6 address in brackets ("[2001:db8::1]:2379"), as in a URL. The hosts come back bare."""
    endpoints = []
    for item in _items(etcd_host):
        text = item.split("://", 1)[-1].rstrip("/")
        if not text:
            continue
        if text.count(":") > 1 and not text.startswith("["):
            # "2001:db8::1:2379" reads as an address with or without a port.
            raise invalid_config(
                f"ipam.etcd_host={etcd_host!r}: write an IPv6 address in brackets, as in a URL "
                f"([2001:db8::1]:2379)"
            )
        endpoints.append(_endpoint(text, etcd_host))
    if not endpoints:
        raise invalid_config(f"ipam.etcd_host={etcd_host!r}: no endpoint (host:port) in it")
    return endpoints


_HOST_PORT = re.compile(r"(?:\[(?P<ipv6>[^\]]*)\]|(?P<host>[^:\[\]\s/@]+))(?::(?P<port>\d+))?")


def _endpoint(text: str, etcd_host: str) -> tuple[str, int]:
    """(host, port) of one endpoint's "host[:port]"; code 7 for anything else, which would
    else be dialled, fail, and be retried as an outage."""
    found = _HOST_PORT.fullmatch(text)
    port = int(found["port"] or DEFAULT_PORT) if found else 0
    if found and found["ipv6"] is not None:
        try:
            ipaddress.IPv6Address(found["ipv6"])
        except ValueError:
            found = None
    if found is None or not 0 < port < 65536:
        raise invalid_config(
            f"ipam.etcd_host={etcd_host!r}: {text!r} is no host:port (a name or an IPv4 address, "
            f"or an IPv6 address in brackets; a port from 1 to 65535, {DEFAULT_PORT} if none)"
        )
    return found["ipv6"] or found["host"], port


def _items(etcd_host: str) -> list[str]:
    return [item.strip() for item in etcd_host.split(",") if item.strip()]


def _scheme_of(item: str, etcd_host: str) -> str | None:
    if "://" not in item:
        return None
    scheme = item.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise invalid_config(
            f"ipam.etcd_host={etcd_host!r}: {scheme}:// is not an etcd client scheme; "
            f"use host:port, http://host:port or https://host:port"
        )
    return scheme


def _tls_files(ipam: IpamConf) -> dict[str, str]:
    """The TLS keys that are set, with their paths."""
    files = {
        CA_KEY: ipam.etcd_ca_cert_file,
        CERT_KEY: ipam.etcd_cert_file,
        KEY_KEY: ipam.etcd_key_file,
    }
    return {key: path for key, path in files.items() if path}


def _check_password_is_protected(ipam: IpamConf, secure: bool) -> None:
    """A password goes over TLS, unless the config explicitly accepts plaintext."""
    if ipam.etcd_password and not secure and not ipam.etcd_allow_plaintext_password:
        raise invalid_config(
            f"ipam.etcd_password would be sent to etcd in plaintext: ipam.etcd_host="
            f"{ipam.etcd_host!r} uses no TLS. Use https:// (with {CA_KEY} unless etcd's "
            f"certificate is signed by a system-trusted CA), or set "
            f"ipam.{ALLOW_PLAINTEXT_KEY}: true to accept a plaintext password"
        )


def _check_pair(first: str, first_value: str | None, second: str, second_value: str | None) -> None:
    """Keys that only mean something together: both set, or neither."""
    if bool(first_value) != bool(second_value):
        given, missing = (first, second) if first_value else (second, first)
        raise invalid_config(
            f"ipam.{first} and ipam.{second} go together: ipam.{given} is set but "
            f"ipam.{missing} is not; set both or neither"
        )


def invalid_config(problem: str) -> CniError:
    return CniError(INVALID_CONFIG, f"invalid network config: {problem}")
