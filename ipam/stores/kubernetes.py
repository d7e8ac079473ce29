"""The Kubernetes datastore: one IPPool custom resource per block, updated on resourceVersion.

Blocks of a pool are found by a label; a create that finds the object already there, or a
replace on a stale resourceVersion, is a conflict (409), never an overwrite. No Lease or any
other lock is taken: writers of different pools never touch the same object.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import netaddr

from pyabouts.ipam.config import IpamConf
from pyabouts.ipam.errors import (
    CORRUPT_BLOCK,
    INVALID_CONFIG,
    CniError,
    StoreBusyError,
    StoreRefusedError,
    StoreUnavailableError,
)
from pyabouts.ipam.pool import Block, BlockKey, PoolId
from pyabouts.ipam.store import ChangeSink, OnUnreadable, WriteOutcome, decoded_blocks
from pyabouts.ipam.stores.codec import (
    block_cidr,
    block_from_document,
    block_json,
    json_with_member,
)
from pyabouts.ipam.stores.kube_api import (
    METADATA_LIST,
    METADATA_ONLY,
    ApiCredentials,
    ApiStatusError,
    KubeApi,
)
from pyabouts.ipam.stores.kubeconfig import credentials_from_configuration, read_kubeconfig

if TYPE_CHECKING:
    from kubernetes.client import Configuration

GROUP = "pyabouts.io"
VERSION = "v1alpha1"
PLURAL = "ippools"
POOL_LABEL = "pyabouts.io/pool"
NETWORK_LABEL = "pyabouts.io/network"
FAMILY_LABEL = "pyabouts.io/family"
# IPPools per list request. A full IPPool is at most ~30 KiB, and a page must arrive whole
# within the request timeout: 100 of them is at most ~3 MiB. Their metadata alone is small.
LIST_PAGE = 100
METADATA_LIST_PAGE = 500
# A watch ends after this long (the server closes it; the feed watches again from where it
# was); and a connection silent for longer than WATCH_IDLE_SECONDS is taken for dead: the
# server sends a bookmark about every minute on a quiet watch.
WATCH_SECONDS = 300
WATCH_IDLE_SECONDS = 150.0
# A watch answered these is refused as a request would be (RBAC without `watch`, say): the
# agent is not ready, rather than falling back, unseen, to reading each pool every 2 s.
WATCH_REFUSALS = frozenset({401, 403, 404})
# The readiness probe's watch (check_reach): the server ends it after a second; one silent
# for this long is taken for dead, so that a stalled server cannot stall readiness with it.
PROBE_WATCH_SECONDS = 1
PROBE_WATCH_IDLE_SECONDS = 5.0
_LABEL_SAFE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
# The prefix object_name gives a network whose name is not DNS-safe.
_DIGEST_PREFIX = re.compile(r"^net-[0-9a-f]{10}$")


def pool_label(pool: PoolId) -> str:
    """A label value naming the pool: a digest, since network names are free text."""
    text = f"{pool.network}\0{pool.family}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def object_name(key: BlockKey) -> str:
    """e.g. "blue-10.50.0.0-24"; a digest stands in for names that are not DNS-safe."""
    pool = key.pool
    prefix = pool.network if _LABEL_SAFE.fullmatch(pool.network) else f"net-{pool_label(pool)[:10]}"
    address = netaddr.IPAddress(key.base, pool.family)
    text = str(address) if pool.family == 4 else address.format(netaddr.ipv6_verbose)
    prefixlen = block_cidr(key).split("/")[1]
    return f"{prefix}-{text.replace(':', '-')}-{prefixlen}"


class KubernetesStore:
    """PoolStore on IPPool custom resources in one namespace."""

    def __init__(self, api: KubeApi, namespace: str) -> None:
        self._api = api
        self._namespace = namespace
        self._collection = ippools_path(namespace)

    @classmethod
    def from_config(cls, ipam: IpamConf, *, timeout: float) -> KubernetesStore:
        """Read the kubeconfig afresh (tokens rotate); its context names the namespace."""
        path = ipam.kubernetes.kubeconfig
        if not path:
            raise CniError(
                INVALID_CONFIG,
                "invalid network config: ipam.kubernetes.kubeconfig is required for datastore "
                "'kubernetes' (inline or in the flat file)",
            )
        return cls.from_credentials(read_kubeconfig(path), timeout=timeout)

    @classmethod
    def from_credentials(
        cls, credentials: ApiCredentials, *, timeout: float, retries: int = 0
    ) -> KubernetesStore:
        """`retries`: more tries at connecting when a connection cannot be made; 0 where
        run_transaction retries under its deadline."""
        return cls(KubeApi(credentials, timeout=timeout, retries=retries), credentials.namespace)

    @classmethod
    def from_configuration(
        cls, configuration: Configuration, namespace: str, *, timeout: float
    ) -> KubernetesStore:
        """The store a `kubernetes` client configuration reaches (in-cluster, say)."""
        credentials = credentials_from_configuration(configuration, namespace)
        retries = configuration.retries if isinstance(configuration.retries, int) else 0
        return cls.from_credentials(credentials, timeout=timeout, retries=retries)

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        low = BlockKey.of(pool, first).base
        if BlockKey.of(pool, last).base == low:  # one block (a conflict's re-read): one GET
            return self._get(BlockKey(pool, low))
        listed = self._list(label_selector=f"{POOL_LABEL}={pool_label(pool)}")
        return [b for b in listed if low <= b.key.base <= last]

    def read_all_blocks(self, *, on_unreadable: OnUnreadable | None = None) -> list[Block]:
        return self._list(on_unreadable=on_unreadable)

    def check_reach(self) -> None:
        """A LIST of one IPPool's metadata, then a watch from it of a second at most: refused
        where the apiserver does not serve the CRD, or the credentials may not list or watch
        the namespace's IPPools (the agent's feed, follow_changes, does both). (A GET of a
        block nobody created answers 404 with or without the CRD.)"""
        listed = self._call("GET", self._collection, query={"limit": 1}, accept=METADATA_LIST)
        query: dict[str, str | int | None] = {
            "resourceVersion": str(listed["metadata"]["resourceVersion"]),
            "timeoutSeconds": PROBE_WATCH_SECONDS,
        }
        events = self._api.watch(
            self._collection, query, accept=METADATA_ONLY, idle_timeout=PROBE_WATCH_IDLE_SECONDS
        )
        with contextlib.closing(events):
            try:
                next(events, None)  # its answer's status; then an event, or its end
            except ApiStatusError as exc:
                raise self._api_error(exc) from exc

    def _get(self, key: BlockKey) -> list[Block]:
        try:
            item = self._call("GET", f"{self._collection}/{object_name(key)}", absent_ok=True)
        except _Absent:
            return []
        block = block_of_ippool(item)
        if block.key != key:
            # Two pools, one object name: one network named like the other's digest name.
            raise CniError(
                INVALID_CONFIG,
                f"IPPool {object_name(key)} holds a block of network {block.key.pool.network!r}, "
                f"and network {key.pool.network!r} names its block alike: rename one of them "
                "(network_name)",
            )
        return [block]

    def _list(
        self, label_selector: str | None = None, *, on_unreadable: OnUnreadable | None = None
    ) -> list[Block]:
        """The IPPools of the namespace (that match `label_selector`) as blocks, in pages; one
        not in pyabouts' format raises, or is left out and told to `on_unreadable`."""
        pages = self._pages(label_selector=label_selector)
        items = (item for page in pages for item in page.get("items") or [])
        blocks = decoded_blocks(items, block_of_ippool, on_unreadable)
        return sorted(blocks, key=lambda b: b.key)

    def _pages(
        self, *, label_selector: str | None = None, metadata_only: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Each page of a list of the IPPools (of their metadata alone, if `metadata_only`); a
        paged list is one snapshot, and every page carries its resourceVersion."""
        accept = METADATA_LIST if metadata_only else "application/json"
        limit = METADATA_LIST_PAGE if metadata_only else LIST_PAGE
        token = ""
        while True:
            query = {"limit": limit, "continue": token or None, "labelSelector": label_selector}
            page = self._call("GET", self._collection, query=query, accept=accept)
            yield page
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                return

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        # One object at a time (the API has no multi-object transaction), in the order given,
        # until one conflicts: what follows was decided on a stale view (a node slice's address
        # after a registry entry another node took first) and is decided again before it is
        # written. The allocator's decisions are idempotent: the retry completes a partial write.
        outcome = WriteOutcome()
        for block in blocks:
            revision = self._write(block)
            if revision is None:
                outcome.conflicts.append(block.key)
                break
            outcome.revisions[block.key] = revision
        return outcome

    def remove_block(self, block: Block) -> bool:
        """BlockRemoval: a DELETE on the block's resourceVersion (a precondition the API checks:
        409 when the IPPool changed since)."""
        if block.revision is None or _DIGEST_PREFIX.fullmatch(block.key.pool.network):
            return False  # such a network's blocks are written still, never created again
        preconditions = {"resourceVersion": block.revision}
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": preconditions}
        path = f"{self._collection}/{object_name(block.key)}"
        try:
            self._call("DELETE", path, body=body, absent_ok=True)
        except (_Conflict, _Absent):
            return False
        return True

    def close(self) -> None:
        self._api.close()

    # -- BlockFeed: a watch of the IPPools' metadata ----------------------------------------

    def pool_tag(self, pool: PoolId) -> str:
        return pool_label(pool)

    def block_tag(self, key: BlockKey) -> str:
        return object_name(key)

    def follow_changes(self, sink: ChangeSink, stop: threading.Event) -> None:
        """List the IPPools' metadata, then watch it from there (names, labels and
        resourceVersions only: a block's content is read when the cache needs it), watching
        again from the last event each time the server ends a watch."""
        revisions: dict[tuple[str, str], str] = {}
        since = ""
        for page in self._pages(metadata_only=True):
            since = str(page["metadata"]["resourceVersion"])
            for item in page.get("items") or []:
                tagged = _tagged(item.get("metadata") or {})
                if tagged:
                    revisions[tagged[0], tagged[1]] = tagged[2]
        sink.feed_listed(revisions)
        while not stop.is_set():
            query: dict[str, str | int | None] = {
                "resourceVersion": since,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": WATCH_SECONDS,
            }
            opened, heard = time.monotonic(), False
            events = self._api.watch(
                self._collection, query, accept=METADATA_ONLY, idle_timeout=WATCH_IDLE_SECONDS
            )
            with contextlib.closing(events):  # closed at once when we stop early
                try:
                    for event in events:
                        heard = True
                        since = _report(event, sink) or since
                        if stop.is_set():
                            return
                except ApiStatusError as exc:
                    if exc.status in WATCH_REFUSALS:  # as any request's: the agent not ready
                        raise self._api_error(exc) from exc
                    raise
            if not heard and time.monotonic() - opened < WATCH_SECONDS / 2:
                # Ended early with nothing said (a proxy in the way?): not again at once.
                raise StoreUnavailableError("the IPPool watch ended at once, with no event")

    def _write(self, block: Block) -> str | None:
        """The new resourceVersion, or None on a conflict."""
        if block.revision is None and _DIGEST_PREFIX.fullmatch(block.key.pool.network):
            # It would be stored under the name of the network whose digest it is (and take
            # its blocks, or fail on them); blocks it has already are read and written still.
            raise CniError(
                INVALID_CONFIG,
                f"network_name {block.key.pool.network!r} has the form of the names pyabouts "
                "gives the IPPools of networks whose names are not DNS-safe: no new block of it "
                "is created; choose another network_name",
            )
        body = self._object_json(block)
        try:
            # Only the new resourceVersion is needed from the answer.
            if block.revision is None:
                stored = self._call("POST", self._collection, body=body, accept=METADATA_ONLY)
            else:
                path = f"{self._collection}/{object_name(block.key)}"
                stored = self._call("PUT", path, body=body, replacing=True, accept=METADATA_ONLY)
        except _Conflict:
            return None
        return str(stored["metadata"]["resourceVersion"])

    def _object_json(self, block: Block) -> str:
        """The IPPool of `block` as JSON text; its spec is block_json's."""
        return json_with_member(ippool_envelope(block, self._namespace), "spec", block_json(block))

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str | int | None] | None = None,
        body: dict[str, Any] | str | None = None,
        replacing: bool = False,
        absent_ok: bool = False,
        accept: str = "application/json",
    ) -> dict[str, Any]:
        """Call the API; with `replacing`, a 404 means the object went away: a conflict; with
        `absent_ok`, it is _Absent (a block nobody created yet)."""
        try:
            return self._api.request(method, path, query=query, body=body, accept=accept)
        except ApiStatusError as exc:
            if replacing and exc.status == 404:
                raise _Conflict from exc
            if absent_ok and exc.status == 404:
                raise _Absent from exc
            raise self._api_error(exc) from exc

    def _api_error(self, exc: ApiStatusError) -> Exception:
        status = exc.status
        where = f"Kubernetes API at {self._api.server}"
        if status == 409:
            return _Conflict()  # already created, or a stale resourceVersion
        if status == 404:
            return StoreRefusedError(
                f"{where}: not found ({exc.message}): is the IPPool CRD installed "
                f"(kubectl apply -k deploy/), and does namespace {self._namespace} exist?"
            )
        if status == 401:
            return StoreRefusedError(f"{where}: Unauthorized: the kubeconfig's credentials")
        if status == 403:
            return StoreRefusedError(f"{where}: Forbidden: {exc.message}")
        if exc.busy:  # up, but overloaded: retried until the deadline
            message = f"{where} answered {status}: {exc.message}"
            return StoreBusyError(message, retry_after=exc.retry_after)
        if status >= 500 or status == 410:  # 410: a list's continue token expired: list again
            return StoreUnavailableError(f"{where} answered {status}: {exc.message}")
        return StoreRefusedError(
            f"{where} refused the request ({status}): {exc.message}", content=True
        )


def ippools_path(namespace: str) -> str:
    """The API path of the IPPools of `namespace`."""
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"


def ippool_envelope(block: Block, namespace: str) -> dict[str, Any]:
    """The IPPool of `block` but its spec: metadata (name, labels, resourceVersion), status."""
    # Resting and reserved addresses are not allocated, nor free to give.
    allocated = sum(1 for owner in block.entries.values() if owner.in_use)
    metadata: dict[str, Any] = {
        "name": object_name(block.key),
        "namespace": namespace,
        "labels": {
            POOL_LABEL: pool_label(block.key.pool),
            FAMILY_LABEL: str(block.key.pool.family),
            NETWORK_LABEL: _label_value(block.key.pool.network),
        },
    }
    if block.revision is not None:
        metadata["resourceVersion"] = block.revision
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "IPPool",
        "metadata": metadata,
        "status": {
            "allocated": allocated,
            "free": max(0, block.capacity - len(block.entries)),
        },
    }


def block_of_ippool(item: dict[str, Any]) -> Block:
    """The block an IPPool object holds, as listed or read (CniError 104 naming the IPPool when
    malformed)."""
    metadata = item.get("metadata") or {}
    name = metadata.get("name", "?") if isinstance(metadata, dict) else "?"
    try:
        spec = item.get("spec", {})
        network = netaddr.IPNetwork(spec["cidr"])
        pool = PoolId(str(spec.get("network", "")), family=4 if network.version == 4 else 6)
        key = BlockKey(pool, int(network.first))
        block = block_from_document(key, spec, str(metadata["resourceVersion"]))
    except CniError as exc:
        raise CniError(exc.code, f"IPPool {name}: {exc.msg}", exc.details) from None
    except (KeyError, TypeError, ValueError, AttributeError, netaddr.AddrFormatError) as exc:
        why = f"{type(exc).__name__} {exc}"
        raise CniError(CORRUPT_BLOCK, f"IPPool {name} is not a pyabouts block: {why}") from None
    if name != object_name(key):
        # spec.cidr or spec.network edited by hand: read as the block it now names, it would
        # stand beside that block's own IPPool, and its own block's owners would be unseen.
        raise CniError(
            CORRUPT_BLOCK,
            f"IPPool {name} is not a pyabouts block: it holds {network} of network "
            f"{pool.network!r}, whose IPPool is named {object_name(key)} (edited by hand?)",
        )
    return block


def _tagged(metadata: dict[str, Any]) -> tuple[str, str, str] | None:
    """(pool tag, block tag, resourceVersion) of an IPPool's metadata; None for one that is
    not a block (no pool label)."""
    pool = (metadata.get("labels") or {}).get(POOL_LABEL)
    name, revision = metadata.get("name"), metadata.get("resourceVersion")
    if not (pool and isinstance(pool, str) and isinstance(name, str) and isinstance(revision, str)):
        return None
    return pool, name, revision


def _report(event: dict[str, Any], sink: ChangeSink) -> str | None:
    """Tell `sink` what a watch event says; the resourceVersion to watch on from, if any.
    An ERROR event (410 Gone: too old to watch from) ends the feed: it lists again."""
    kind, item = event.get("type"), event.get("object") or {}
    if kind == "ERROR":
        raise StoreUnavailableError(f"IPPool watch ended: {item.get('message', item)}")
    tagged = _tagged(item.get("metadata") or {})
    if kind in ("ADDED", "MODIFIED", "DELETED") and tagged:
        sink.feed_changed(*tagged, deleted=kind == "DELETED")
    revision = (item.get("metadata") or {}).get("resourceVersion")
    return revision if isinstance(revision, str) else None


class _Conflict(Exception):  # noqa: N818 - an outcome, not an error
    """The object changed since it was read."""


class _Absent(Exception):  # noqa: N818 - an outcome, not an error
    """The object does not exist."""


def _label_value(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63].strip("-_.")
    return cleaned
