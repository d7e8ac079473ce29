"""The etcd datastore: one key per block, written with transactions comparing mod revisions.

Key: /pyabouts/v1/pools/<family>/<network_name>/<scope>/<block base, fixed-width hex>, so the
blocks of a span are one range read. Several blocks are written in one transaction, all or none.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import etcd3
import grpc
from etcd3 import exceptions as etcd_exceptions

from ipam.config import IpamConf
from ipam.errors import INVALID_CONFIG, CniError, StoreRefusedError, StoreUnavailableError
from ipam.pool import Block, BlockKey, PoolId
from ipam.store import WriteOutcome
from ipam.stores.codec import block_document, block_from_document

T = TypeVar("T")

KEY_PREFIX = "/pyabouts/v1/pools"
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,  # etcd answers a wrong password this way
    grpc.StatusCode.FAILED_PRECONDITION,
}
_ERRORS = (grpc.RpcError, etcd_exceptions.Etcd3Exception)


def pool_prefix(pool: PoolId) -> str:
    # quote() never yields a lone "%", so it stands for the empty name unambiguously.
    network = quote(pool.network, safe="") or "%"
    scope = quote(pool.scope, safe="") or "%"
    return f"{KEY_PREFIX}/{pool.family}/{network}/{scope}/"


def block_key(key: BlockKey) -> str:
    width = 8 if key.pool.family == 4 else 32
    return f"{pool_prefix(key.pool)}{key.base:0{width}x}"


def parse_block_key(text: str) -> BlockKey:
    """The inverse of block_key."""
    family, network, scope, base = text.removeprefix(f"{KEY_PREFIX}/").split("/")
    pool = PoolId(
        network="" if network == "%" else unquote(network),
        family=4 if family == "4" else 6,
        scope="" if scope == "%" else unquote(scope),
    )
    return BlockKey(pool, int(base, 16))


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    endpoints: tuple[tuple[str, int], ...]
    timeout: float
    username: str | None = None
    password: str | None = None
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    secure: bool = False

    @classmethod
    def from_config(cls, ipam: IpamConf, *, timeout: float) -> EtcdSettings:
        if not ipam.etcd_host:
            raise CniError(INVALID_CONFIG, "invalid network config: ipam.etcd_host is required")
        return cls(
            endpoints=tuple(parse_endpoints(ipam.etcd_host)),
            timeout=timeout,
            username=ipam.etcd_username or None,
            password=ipam.etcd_password or None,
            ca_cert=ipam.etcd_ca_cert_file or None,
            cert=ipam.etcd_cert_file or None,
            key=ipam.etcd_key_file or None,
            secure=bool(ipam.etcd_ca_cert_file) or "https://" in ipam.etcd_host,
        )

    def describe(self) -> str:
        return ",".join(f"{host}:{port}" for host, port in self.endpoints)


class EtcdStore:
    """PoolStore on etcd. Endpoints are tried in order; the first that answers is kept."""

    def __init__(self, settings: EtcdSettings) -> None:
        self._settings = settings
        self._client: Any = None
        self._next_endpoint = 0

    @classmethod
    def from_config(cls, ipam: IpamConf, *, timeout: float) -> EtcdStore:
        return cls(EtcdSettings.from_config(ipam, timeout=timeout))

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        start = block_key(BlockKey.of(pool, first))
        end = block_key(BlockKey.of(pool, last)) + "\0"  # exclusive end, just past the last
        return _decode(self._call(lambda client: list(client.get_range(start, end))))

    def read_all_blocks(self) -> list[Block]:
        return _decode(self._call(lambda client: list(client.get_prefix(f"{KEY_PREFIX}/"))))

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        def transact(client: Any) -> WriteOutcome:
            txn = client.transactions
            compare = [
                txn.version(block_key(b.key)) == 0
                if b.revision is None
                else txn.mod(block_key(b.key)) == int(b.revision)
                for b in blocks
            ]
            puts = [
                txn.put(block_key(b.key), json.dumps(block_document(b), separators=(",", ":")))
                for b in blocks
            ]
            succeeded, responses = client.transaction(compare=compare, success=puts, failure=[])
            if not succeeded:
                return WriteOutcome(conflicts=[b.key for b in blocks])
            return WriteOutcome(
                revisions={
                    b.key: str(r.response_put.header.revision)
                    for b, r in zip(blocks, responses, strict=True)
                }
            )

        return self._call(transact)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _call(self, operation: Callable[[Any], T]) -> T:
        """Run `operation` on a connected client, moving to the next endpoint when one is down."""
        attempts = len(self._settings.endpoints)
        for attempt in range(attempts):
            try:
                return operation(self._connected())
            except _ERRORS as exc:
                # etcd3 marks a failed endpoint unusable for the client: start afresh next time.
                self.close()
                error = _store_error(exc, self._settings.describe())
                if isinstance(error, StoreRefusedError) or attempt == attempts - 1:
                    raise error from exc
        raise AssertionError("unreachable: the loop returns or raises")

    def _connected(self) -> Any:
        if self._client is None:
            settings = self._settings
            host, port = settings.endpoints[self._next_endpoint % len(settings.endpoints)]
            self._next_endpoint += 1
            creds = None
            if settings.secure:
                try:
                    creds = etcd3.MultiEndpointEtcd3Client.get_secure_creds(
                        settings.ca_cert, settings.key, settings.cert
                    )
                except OSError as exc:
                    raise CniError(INVALID_CONFIG, f"etcd TLS files: {exc}") from exc
            endpoint = etcd3.Endpoint(host, port, secure=settings.secure, creds=creds)
            self._client = etcd3.MultiEndpointEtcd3Client(
                endpoints=[endpoint],
                timeout=settings.timeout,
                user=settings.username,
                password=settings.password,
            )
        return self._client


def parse_endpoints(etcd_host: str) -> list[tuple[str, int]]:
    """`etcd_host`: "host:port" (an http(s):// scheme is allowed), several comma-separated."""
    endpoints = []
    for item in etcd_host.split(","):
        text = item.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
        if not text:
            continue
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            host, port = text, "2379"
        endpoints.append((host.strip("[]"), int(port)))
    if not endpoints:
        raise CniError(INVALID_CONFIG, f"invalid network config: ipam.etcd_host={etcd_host!r}")
    return endpoints


def _decode(found: list[tuple[bytes, Any]]) -> list[Block]:
    return [
        block_from_document(
            parse_block_key(meta.key.decode()), json.loads(value), str(meta.mod_revision)
        )
        for value, meta in found
    ]


def _store_error(exc: Exception, endpoints: str) -> CniError:
    code = exc.code() if isinstance(exc, grpc.RpcError) else None
    if code in _REFUSALS:
        details = exc.details() if isinstance(exc, grpc.RpcError) else ""
        return StoreRefusedError(f"etcd at {endpoints} refused the request: {details}")
    return StoreUnavailableError(f"etcd at {endpoints} is unreachable: {type(exc).__name__} {exc}")
