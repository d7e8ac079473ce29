"""The etcd datastore: one key per block, written with transactions comparing mod revisions.

Key: /pyabouts/v1/pools/<family>/<network_name>/<block base, fixed-width hex>, so the
blocks of a span are one range read. Several blocks are written in one transaction, all or none
(a write of more than one transaction takes, in several, in order: see _transaction_parts); one
that fails names the blocks somebody else changed, as read in the same transaction.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import socket
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

from pyabouts.ipam.config import IpamConf
from pyabouts.ipam.errors import (
    CORRUPT_BLOCK,
    INVALID_CONFIG,
    CniError,
    StoreBusyError,
    StoreRefusedError,
    StoreUnavailableError,
)
from pyabouts.ipam.pool import BLOCK_SIZE, Block, BlockKey, PoolId
from pyabouts.ipam.store import OnUnreadable, WriteOutcome, decoded_blocks
from pyabouts.ipam.stores.codec import block_from_document, block_json
from pyabouts.ipam.stores.etcd_settings import (
    CA_KEY,
    CERT_KEY,
    KEY_KEY,
    EtcdSettings,
    invalid_config,
    netloc,
    url_host,
)

# grpc's EventEngine client hands each call's I/O to a pool of its own threads: measured here
# (grpcio 1.85, a read and a transaction on a 25 KB key), 12 thread switches per pair of calls
# and 0.6 ms of CPU, against almost none and 0.45 ms when the calling thread polls, as grpc did
# before. The agent makes one or two calls per request, on a node busy starting pods. grpc
# reads this once: set after its import, it changed nothing. A GRPC_EXPERIMENTS set by the
# operator is kept as it is.
os.environ.setdefault(
    "GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_for_all_other_endpoints"
)

import etcd3
import grpc
from etcd3 import exceptions as etcd_exceptions

T = TypeVar("T")

KEY_PREFIX = "/pyabouts/v1/pools"
# The most one transaction stores (see _transaction_parts): 32 blocks are 96 operations of etcd's
# 128, and 1 MiB leaves room under its 1.5 MiB for the compares and keys.
TXN_BLOCKS = 32
TXN_BYTES = 1 << 20
# grpc refuses answers over 4 MiB by default: a whole-store read (the reconciler's pass) of
# some 70 full blocks. etcd's own Go client takes answers up to 2 GiB; so does this one.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 2**31 - 1)]
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,  # etcd answers a wrong password this way
    grpc.StatusCode.FAILED_PRECONDITION,
}
# Answers of an etcd that took the call but is overloaded: up, so retried until the deadline.
_BUSY = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
_ERRORS = (grpc.RpcError, etcd_exceptions.Etcd3Exception)
# How long a client never answered whose call timed out waits for a TCP connection to etcd
# (_busy_if_connectable).
CONNECT_CHECK_SECONDS = 1.0
# etcd's answer to a write once its database reached its quota (the NOSPACE alarm): the history
# of every key's writes stays until compacted.
NO_SPACE = "database space exceeded"
NO_SPACE_ADVICE = (
    "Its history needs compacting (run etcd with --auto-compaction-retention, see the README), "
    "then `etcdctl defrag` and `etcdctl alarm disarm`"
)


def pool_prefix(pool: PoolId) -> str:
    # quote() never yields a lone "%", so it stands for the empty name unambiguously.
    network = quote(pool.network, safe="") or "%"
    return f"{KEY_PREFIX}/{pool.family}/{network}/"


def block_key(key: BlockKey) -> str:
    width = 8 if key.pool.family == 4 else 32
    return f"{pool_prefix(key.pool)}{key.base:0{width}x}"


def parse_block_key(text: str) -> BlockKey:
    """The inverse of block_key."""
    family, network, base = text.removeprefix(f"{KEY_PREFIX}/").split("/")
    pool = PoolId(
        network="" if network == "%" else unquote(network), family=4 if family == "4" else 6
    )
    return BlockKey(pool, int(base, 16))


class EtcdStore:
    """PoolStore on etcd. Endpoints are tried in order; the first that answers is kept."""

    def __init__(self, settings: EtcdSettings) -> None:
        self._settings = settings
        self._client: Any = None
        # What each client dialled, and whether it was answered (see _busy_if_connectable);
        # weak, so that a client dropped is closed once no call holds it.
        self._dialled: weakref.WeakKeyDictionary[Any, _Dialled] = weakref.WeakKeyDictionary()
        self._endpoint = settings.endpoints[0]  # the one dialled last, for messages
        self._next_endpoint = 0

    @classmethod
    def from_config(cls, ipam: IpamConf, *, timeout: float) -> EtcdStore:
        return cls(EtcdSettings.from_config(ipam, timeout=timeout))

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        start = block_key(BlockKey.of(pool, first))
        end = block_key(BlockKey.of(pool, last)) + "\0"  # exclusive end, just past the last
        return _decode(self._call(lambda client: list(client.get_range(start, end))))

    def read_all_blocks(self, *, on_unreadable: OnUnreadable | None = None) -> list[Block]:
        found = self._call(lambda client: list(client.get_prefix(f"{KEY_PREFIX}/")))
        return _decode(found, on_unreadable)

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        # One transaction per part (see _transaction_parts), in order, until one conflicts:
        # what follows is decided again, as the Kubernetes store does after its first conflict.
        outcome = WriteOutcome()
        for part in _transaction_parts(blocks):
            written = self._call(functools.partial(_write_part, part))
            outcome.revisions.update(written.revisions)
            if written.conflicts:
                outcome.conflicts.extend(written.conflicts)
                break
        return outcome

    def remove_block(self, block: Block) -> bool:
        """BlockRemoval: one transaction, the delete on the block's mod revision."""
        if block.revision is None:
            return False
        key, revision = block_key(block.key), int(block.revision)

        def remove(client: Any) -> bool:
            txn = client.transactions
            compare = [txn.mod(key) == revision]
            succeeded, _ = client.transaction(
                compare=compare, success=[txn.delete(key)], failure=[]
            )
            return bool(succeeded)

        return self._call(remove)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _call(self, operation: Callable[[Any], T]) -> T:
        """Run `operation` on a connected client, moving to the next endpoint when one fails.

        A refusal (credentials) holds for every endpoint and is raised at once. Otherwise, when
        every endpoint failed, a certain misconfiguration is raised rather than an outage.
        """
        failures: list[CniError] = []
        logged_in_again = False
        tries = len(self._settings.endpoints)
        while tries:
            tries -= 1
            logging_in = self._client is None or self._settings.username is None
            client = None
            try:
                client = self._connected()
                answer = operation(client)
                if (dialled := self._dialled.get(client)) is not None:
                    dialled.answered = True
                return answer
            except _ERRORS as exc:
                # etcd3 marks a failed endpoint unusable for the client: start afresh next time.
                # Dropped, not closed: other threads' calls may be on it (grpc closes its
                # channel once no call holds it), and a closed one fails them with ValueError.
                if client is not None and self._client is client:
                    self._client = None
                if not logging_in and not logged_in_again and _token_outlived(exc):
                    logged_in_again = True  # a new client logs in: once, then as it answers
                    tries += 1
                    continue
                known = self._dialled.get(client) if client is not None else None
                endpoint = known.endpoint if known is not None else self._endpoint
                error = store_error(exc, endpoint, self._settings)
                if _timed_out(exc) and (known is None or not known.answered):
                    error = _busy_if_connectable(error, endpoint, self._settings)
                if isinstance(error, StoreRefusedError):
                    raise error from exc
                error.__cause__ = exc
                failures.append(error)
        raise next((f for f in failures if not isinstance(f, StoreUnavailableError)), failures[-1])

    def _connected(self) -> Any:
        if self._client is None:
            settings = self._settings
            self._endpoint = settings.endpoints[self._next_endpoint % len(settings.endpoints)]
            self._next_endpoint += 1
            host, port = self._endpoint
            creds = channel_credentials(settings) if settings.secure else None
            endpoint = etcd3.Endpoint(
                url_host(host), port, secure=settings.secure, creds=creds, opts=CHANNEL_OPTIONS
            )
            try:
                # With credentials, this already authenticates: the first call to etcd.
                # failover: a stub made on the endpoint after a call failed it (another thread's)
                # raises NoServerAvailableError, an outage, rather than ValueError.
                self._client = etcd3.MultiEndpointEtcd3Client(
                    endpoints=[endpoint],
                    failover=True,
                    timeout=settings.timeout,
                    user=settings.username,
                    password=settings.password,
                )
            except BaseException:
                endpoint.close()
                raise
            # With credentials, its login was answered.
            self._dialled[self._client] = _Dialled(self._endpoint, settings.username is not None)
            # etcd3 sends the login's token twice: as metadata of each call, which is what etcd
            # reads, and through call credentials, for which grpc starts a Python thread per
            # call. Measured here (TLS, reads and transactions of a small block): 0.79 ms of
            # CPU per call with them, 0.44 without.
            self._client.call_credentials = None
        return self._client


def channel_credentials(settings: EtcdSettings) -> grpc.ChannelCredentials:
    """TLS credentials from the configured files, read afresh for each client (they rotate).

    Without etcd_ca_cert_file, root_certificates is None: grpc then verifies etcd's certificate
    against its default trusted roots; nothing here ever skips the verification.
    """
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem_file(CA_KEY, settings.ca_cert),
        private_key=read_pem_file(KEY_KEY, settings.key),
        certificate_chain=read_pem_file(CERT_KEY, settings.cert),
    )


def read_pem_file(key: str, path: str | None) -> bytes | None:
    """The file `key` names, or code 7 naming the key and the path, never the content (a
    private key is secret)."""
    if path is None:
        return None
    try:
        content = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise invalid_config(f"ipam.{key}={path!r}: cannot read it ({reason})") from exc
    if b"-----BEGIN " not in content:
        raise invalid_config(f"ipam.{key}={path!r}: not a PEM file (no '-----BEGIN' line)")
    return content


def _decode(
    found: list[tuple[bytes, Any]], on_unreadable: OnUnreadable | None = None
) -> list[Block]:
    """The blocks of a range read; a key not in pyabouts' format raises, or is left out and
    told to `on_unreadable`."""
    return decoded_blocks(
        found,
        lambda kv: _block_of(kv[1].key.decode(errors="replace"), kv[0], kv[1].mod_revision),
        on_unreadable,
    )


def _block_of(key: str, value: bytes, revision: int) -> Block:
    try:
        parsed = parse_block_key(key)
        family, base = parsed.pool.family, parsed.base
        if not 0 <= base < 1 << (32 if family == 4 else 128) or base % BLOCK_SIZE:
            raise ValueError(f"{base:x} is not the base of an IPv{family} block")
        if block_key(parsed) != key:
            # Another spelling of a block's key (upper-case hex, another width, family or
            # quoting) read as that block would stand beside the key pyabouts writes it to.
            raise ValueError(
                f"not written as pyabouts writes that block's key, {block_key(parsed)}"
            )
        document = json.loads(value)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        return block_from_document(parsed, document, str(revision))
    except CniError as exc:
        raise CniError(exc.code, f"etcd key {key}: {exc.msg}", exc.details) from None
    except (ValueError, TypeError, OverflowError, UnicodeDecodeError) as exc:
        why = f"{type(exc).__name__} {exc}"
        raise CniError(CORRUPT_BLOCK, f"etcd key {key} is not a pyabouts block: {why}") from None


def _token_outlived(exc: Exception) -> bool:
    """Whether etcd refused a call for the login it carries, not for who made it: its token
    expired (simple tokens 300 s after their last use, JWTs 5 min after the login), or users
    or roles changed since it was issued. A client logs in once, when it is made; etcd's own
    client logs in again then, and so does this store."""
    rpc = exc if isinstance(exc, grpc.RpcError) else exc.__context__
    if not isinstance(rpc, grpc.RpcError):
        return False
    details = rpc.details() or ""
    return (rpc.code() == grpc.StatusCode.UNAUTHENTICATED and "invalid auth token" in details) or (
        rpc.code() == grpc.StatusCode.INVALID_ARGUMENT and "auth store is old" in details
    )


def store_error(exc: Exception, endpoint: tuple[str, int], settings: EtcdSettings) -> CniError:
    """The CniError for a failed call to etcd at `endpoint`: refused (102), a TLS failure said
    plainly (see tls_failure), busy (11, retried until the deadline) or unreachable (11)."""
    where = f"etcd at {netloc(*endpoint)}"
    rpc = exc if isinstance(exc, grpc.RpcError) else exc.__context__  # etcd3 wraps grpc's
    if not isinstance(rpc, grpc.RpcError):
        return StoreUnavailableError(f"{where} is unreachable: {type(exc).__name__} {exc}")
    details = rpc.details() or ""
    if rpc.code() in _REFUSALS:
        return StoreRefusedError(f"{where} refused the request: {details}")
    if rpc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and NO_SPACE in details:
        # Every write is refused until somebody makes room: no use retrying for a minute.
        return StoreRefusedError(f"{where} refused the write: {details}. {NO_SPACE_ADVICE}")
    if rpc.code() in _BUSY:
        return StoreBusyError(f"{where} is busy: {_last_error(details) or rpc.code().name}")
    if rpc.code() == grpc.StatusCode.UNAVAILABLE:
        tls = tls_failure(details, where, endpoint[0], settings)
        if tls is not None:
            return tls
    return StoreUnavailableError(f"{where} is unreachable: {_last_error(details)}")


@dataclass(slots=True)
class _Dialled:
    endpoint: tuple[str, int]
    answered: bool


def _timed_out(exc: Exception) -> bool:
    rpc = exc if isinstance(exc, grpc.RpcError) else exc.__context__
    return isinstance(rpc, grpc.RpcError) and rpc.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def _busy_if_connectable(
    busy: CniError, endpoint: tuple[str, int], settings: EtcdSettings
) -> CniError:
    """For a call of a client never answered that timed out: `busy` when etcd's port takes a
    TCP connection (a silent etcd: stopped, swapping, stuck on its disk), else unreachable
    (packets dropped, a host gone), which the outage grace and the agent's readiness apply
    to. grpc says DEADLINE_EXCEEDED for both: its channel was still connecting. Only for an
    endpoint given by its address: a name's lookup could take longer than the check."""
    wait = min(CONNECT_CHECK_SECONDS, settings.timeout)
    try:
        ipaddress.ip_address(endpoint[0])
    except ValueError:
        return busy
    try:
        socket.create_connection(endpoint, timeout=wait).close()
    except OSError as exc:
        return StoreUnavailableError(
            f"etcd at {netloc(*endpoint)} is unreachable: the call timed out, and no TCP "
            f"connection was made within {wait:g} s ({exc})"
        )
    return busy


def tls_failure(details: str, where: str, host: str, settings: EtcdSettings) -> CniError | None:
    """What a failed connection's grpc `details` say about TLS, as the error to report, or None.

    grpc says it only in text. Codes: 7 when the configuration (or etcd's certificate) must
    change, whatever the timing; 102 when etcd refused our certificate; 11 when the handshake
    broke off for a reason that may pass.
    """
    if not settings.secure:
        if "Socket closed" not in details:
            return None
        return StoreUnavailableError(
            f"{where} closed the connection ({_last_error(details)}): if etcd serves TLS there, "
            f"use https:// endpoints (and {CA_KEY})"
        )
    if "CERTIFICATE_VERIFY_FAILED" in details:
        reason = details.split("CERTIFICATE_VERIFY_FAILED", 1)[1].removesuffix(": OK").strip(": ")
        return CniError(
            INVALID_CONFIG,
            f"{where}: TLS handshake failed: etcd's server certificate is not trusted "
            f"(certificate verify failed: {reason or 'no reason given'}) - {_trust_hint(settings)}",
        )
    if "Hostname Verification" in details or "Peer name" in details:
        return CniError(
            INVALID_CONFIG,
            f"{where}: TLS handshake failed: etcd's server certificate is not valid for {host!r}: "
            f"name etcd in ipam.etcd_host as its certificate does (its subjectAltName)",
        )
    if "security handshaker" in details:
        return CniError(
            INVALID_CONFIG,
            f"{where}: TLS cannot be set up with the configured files: {CERT_KEY} must be a "
            f"certificate, {KEY_KEY} its own private key, and {CA_KEY} a CA certificate",
        )
    if "Unwrap failed" in details:  # TLS 1.3: etcd's alert comes after the handshake
        return StoreRefusedError(
            f"{where} closed the TLS connection after the handshake: most likely it refused "
            + (
                f"the client certificate ({CERT_KEY}): is it signed by a CA etcd trusts?"
                if settings.cert
                else f"a client without a certificate: set {CERT_KEY} and {KEY_KEY}"
            )
        )
    if "andshake" in details:  # "Tls handshake failed", "Handshake read failed": may pass
        return StoreUnavailableError(
            f"{where}: TLS handshake failed ({_last_error(details)}): does etcd serve TLS there?"
        )
    return None


def _trust_hint(settings: EtcdSettings) -> str:
    if settings.ca_cert:
        return f"is {CA_KEY} the CA that signed etcd's certificate?"
    return (
        f"no {CA_KEY} is set, so it was checked against the system's trusted roots: "
        f"set {CA_KEY} to the CA that signed etcd's certificate"
    )


def _last_error(details: str) -> str:
    """grpc's `details` without its preamble ("failed to connect to all addresses; ...")."""
    return details.rsplit("last error: ", 1)[-1]


def _transaction_parts(blocks: Sequence[Block]) -> Iterator[list[tuple[Block, str]]]:
    """The blocks with their stored text, in parts of at most TXN_BLOCKS blocks and, unless a
    part is one block, TXN_BYTES: etcd refuses a transaction of more than 128 operations of a
    kind (--max-txn-ops) or over 1.5 MiB (--max-request-bytes) by default, and a write of many
    blocks (a migration, a reconcile pass over a large pool) would else never be stored. An
    ADD's write is one part."""
    part: list[tuple[Block, str]] = []
    size = 0
    for block in blocks:
        text = block_json(block)
        if part and (len(part) == TXN_BLOCKS or size + len(text) > TXN_BYTES):
            yield part
            part, size = [], 0
        part.append((block, text))
        size += len(text)
    if part:
        yield part


def _write_part(part: Sequence[tuple[Block, str]], client: Any) -> WriteOutcome:
    """One transaction: every block of `part` stored if none changed since it was read."""
    blocks = [block for block, _ in part]
    txn = client.transactions
    compare = [
        txn.version(block_key(b.key)) == 0
        if b.revision is None
        else txn.mod(block_key(b.key)) == int(b.revision)
        for b in blocks
    ]
    puts = [txn.put(block_key(b.key), text) for b, text in part]
    # On a failed compare, the blocks as stored at that revision: which of them changed.
    gets = [txn.get(block_key(b.key)) for b in blocks]
    succeeded, responses = client.transaction(compare=compare, success=puts, failure=gets)
    if not succeeded:
        return WriteOutcome(conflicts=_stale_blocks(blocks, responses))
    return WriteOutcome(
        revisions={
            b.key: str(r.response_put.header.revision)
            for b, r in zip(blocks, responses, strict=True)
        }
    )


def _stale_blocks(blocks: Sequence[Block], stored: Sequence[Any]) -> list[BlockKey]:
    """The blocks whose stored revision is not theirs, from the failure branch's reads (one
    list of (value, metadata) per block: empty when the key is absent)."""
    stale = [
        block.key
        for block, found in zip(blocks, stored, strict=True)
        if (str(found[0][1].mod_revision) if found else None) != block.revision
    ]
    return stale or [b.key for b in blocks]  # a failed compare changed one: never expected
