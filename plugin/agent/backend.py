"""The node agent's Backend: warm store clients, a pool cache, and coalesced writes.

One store client, with the agent's own credentials (plugin.agent.datastore), kept between
requests: the cost a plugin process pays on every call (imports, TLS, kubeconfig, the first read
of the pool) is paid once. Only an agent told to trust requests' datastore settings keeps one
client per distinct setting instead.
Every write is still a compare-and-swap on the datastore, so the cache can make a write
conflict, never succeed wrongly; other nodes' agents and in-process plugins stay safe to mix.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyabouts.ipam.coalescing import CoalescingTransactions
from pyabouts.ipam.config import ETCD_CONNECTION_KEYS, IpamConf, PluginConfig, load_config
from pyabouts.ipam.errors import CniError, StoreUnavailableError
from pyabouts.ipam.pool import Block, PoolId
from pyabouts.ipam.store import BlockFeed, OnUnreadable, PoolStore, ReachCheck, WriteOutcome
from pyabouts.ipam.stores import open_store
from pyabouts.ipam.stores.cached import CachedStore
from pyabouts.ipam.stores.write_behind import DeferringStore, PendingWrites
from pyabouts.ipam.transaction import conflict_backoff_max
from pyabouts.plugin.agent.datastore import AgentDatastore
from pyabouts.plugin.agent.datastore_health import DatastoreHealth
from pyabouts.plugin.agent.feed_follower import FeedFollower
from pyabouts.plugin.agent.metrics import AgentMetrics
from pyabouts.plugin.backend import REQUEST_TIMEOUT_SECONDS, config_with_named_flat_file
from pyabouts.plugin.cni import decode_netconf
from pyabouts.plugin.commands import SPEC_ATTACHMENTS, VALID_ATTACHMENTS

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# The IpamConf fields that say which store to talk to and how: one client per distinct value.
STORE_FIELDS = frozenset({"datastore", "etcd_host", "kubernetes"}) | ETCD_CONNECTION_KEYS
CLIENT_MAX_AGE_SECONDS = 600.0  # then a fresh client: kubeconfig tokens and certificates rotate
CLIENT_REOPEN_SECONDS = 10.0  # after a fresh client could not be opened, the old one serving on
# A pool read longer ago than this is read whole again (see CachedStore): a pod re-created on
# another node, or served in-process while this agent was unreachable, is seen within it.
POOL_MAX_AGE_SECONDS = 2.0
# While the store's feed (the IPPool watch) is live, a pool that old is compared with what the
# feed reported instead, and only blocks others wrote are read (see CachedStore); it is read
# whole this often all the same, in case the watch silently stopped delivering.
POOL_MAX_AGE_FED_SECONDS = 60.0
# Validated network configs kept, by their bytes. Only those a network sends unchanged on every
# call: not one larger than CACHED_NETCONF_BYTES, nor one with a key the runtime fills per call
# (a DEL's or CHECK's prevResult, a GC's attachments), each validated afresh. Kept small, since
# whoever writes a NAD chooses its size: validated, a config is several times its bytes.
CONFIGS_KEPT = 64
CACHED_NETCONF_BYTES = 8192
PER_CALL_KEYS = ("prevResult", VALID_ATTACHMENTS, SPEC_ATTACHMENTS)
# Pending writes left when the agent stops are stored for this long at most; what is left stays
# in the journal for the next agent.
FINAL_FLUSH_SECONDS = 10.0
# A flush that failed (the datastore down, say) is tried again after twice the wait before it,
# up to this: every node of a cluster has changes pending through an apiserver restart, and
# would else all retry at the flush interval. A tenth of MAX_PENDING_SECONDS, so that the node
# takes changes again within seconds of the datastore's return.
FLUSH_BACKOFF_MAX_SECONDS = 1.5
# What a readiness probe of etcd reads (see DatastoreHealth): one block of a pool no NAD would
# name; a read, so whatever it finds changes nothing.
PROBE_POOL = PoolId("pyabouts-readiness\0probe", 4)
# Each wait is this much shorter or longer, at random: agents started together (a DaemonSet's
# rollout) would else flush in step, and nodes whose slices share a block meet at every flush.
FLUSH_JITTER = 0.2


def flush_wait(every: float, failures: int, *, jitter: float = FLUSH_JITTER) -> float:
    """How long the flusher waits before its next flush, after `failures` failed in a row."""
    wait = min(every * 2.0 ** min(failures, 16), max(every, FLUSH_BACKOFF_MAX_SECONDS))
    return wait * random.uniform(1 - jitter, 1 + jitter)


class MeteredStore:
    """Counts writes and conflicts of the store under it, for the agent's metrics, and tells
    `health` whether the store answered each call."""

    def __init__(self, backing: PoolStore, metrics: AgentMetrics, health: DatastoreHealth) -> None:
        self._backing = backing
        self._metrics = metrics
        self._health = health

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        self._metrics.store_reads.inc()
        return self._answered(self._backing.read_blocks, pool, first, last)

    def read_all_blocks(self, *, on_unreadable: OnUnreadable | None = None) -> list[Block]:
        return self._answered(self._backing.read_all_blocks, on_unreadable=on_unreadable)

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        self._metrics.store_writes.inc()
        outcome = self._answered(self._backing.write_blocks, blocks)
        self._metrics.conflicts.inc(len(outcome.conflicts))
        return outcome

    def _answered(self, call: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            result = call(*args, **kwargs)
        except Exception as exc:
            self._health.failed(exc)
            raise
        self._health.answered()
        return result

    def close(self) -> None:
        self._backing.close()


@dataclass
class _Client:
    store: PoolStore  # the client itself, under the cache
    cache: CachedStore
    transactions: CoalescingTransactions
    follower: FeedFollower | None
    opened: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        self.cache.close()


class WarmBackend:
    """`datastore`: what the agent serves; None trusts each request's datastore settings."""

    configures_logging = False  # the agent's own logging, not each request's log_file
    spreads_nodes = True

    def __init__(self, metrics: AgentMetrics, node: str, datastore: AgentDatastore | None) -> None:
        self.node = node
        self._datastore = datastore
        self._metrics = metrics
        self._lock = threading.Lock()
        self._clients: dict[str, _Client] = {}
        self._retired: list[_Client] = []  # replaced clients, closed at the next replacement
        self._opening: dict[str, threading.Lock] = {}  # held by the request opening a client
        self._closed = False
        # A node's pods use a few networks, each sending the same config on every ADD:
        # validated once each (exceptions are not kept: a bad config is refused every time).
        self._own_config = functools.lru_cache(maxsize=CONFIGS_KEPT)(self._validated)
        self._pending: PendingWrites | None = None
        self._flusher: threading.Thread | None = None
        self._stop_flushing = threading.Event()
        self._flush_failures = 0  # flushes failed in a row (see flush_wait)
        self.health = DatastoreHealth(self._probe if datastore is not None else None)

    def write_behind(self, pending: PendingWrites, every: float) -> None:
        """Keep the writes `pending` defers (this node's slice blocks) and store them every
        `every` seconds, on a thread of its own; before the first client is opened."""
        assert self._datastore is not None and not self._clients
        self._pending = pending
        self._metrics.write_behind_pending.set_function(pending.pending_count)
        self._flusher = threading.Thread(
            target=self._flush_every, args=(every,), name="write-behind", daemon=True
        )
        self._flusher.start()

    def _flush_every(self, every: float) -> None:
        self._flush()  # at once: what an earlier agent left in the journal
        while not self._stop_flushing.wait(flush_wait(every, self._flush_failures)):
            self._flush()

    def _flush(self, *, last: bool = False) -> bool:
        """Store what is pending; whether nothing is left. `last`: the agent is stopping."""
        pending, own = self._pending, self._datastore
        if pending is None or own is None or not pending.needs_flush(repair_now=last):
            self._flush_failures = 0
            return True
        try:
            outcome = pending.flush(self._own_client(own).cache)
        except (CniError, OSError) as exc:  # the next round tries again; the journal keeps them
            log.warning("storing the pending changes failed: %s", getattr(exc, "msg", exc))
            self._flush_failures += 1
            return False
        except Exception:  # a bug: said whole, and tried again all the same
            log.exception("storing the pending changes failed")
            self._flush_failures += 1
            return False
        self._flush_failures = 0  # stored, or met another writer: the datastore answers
        return outcome.left == 0

    def config(self, raw: dict[str, Any], netconf: bytes) -> PluginConfig:
        if self._datastore is None:
            return config_with_named_flat_file(raw)
        if len(netconf) > CACHED_NETCONF_BYTES or any(key in raw for key in PER_CALL_KEYS):
            return load_config(raw, self._datastore.flat_file)
        return self._own_config(netconf)

    def _validated(self, netconf: bytes) -> PluginConfig:
        """A network config with the agent's own flat file (never a file a request names)."""
        assert self._datastore is not None  # only called for the agent's own datastore
        return load_config(decode_netconf(netconf), self._datastore.flat_file)

    @contextlib.contextmanager
    def transactions(
        self, ipam: IpamConf, pools: Sequence[PoolId], *, writes_by: float | None
    ) -> Iterator[CoalescingTransactions]:
        yield self._client(ipam).transactions

    def open_own_client(self) -> None:
        """Open the client of the agent's own datastore now, rather than at the first request:
        with IPPools, its TLS context is ready and its IPPool watch running before the node's
        first pod comes (an etcd client connects at its first request). No-op when requests
        name their datastore (trusted)."""
        own = self._datastore
        if own is not None:
            self._own_client(own)
            self.health.probe_soon()  # an etcd client has not connected yet

    def _probe(self) -> None:
        """A request to the agent's own datastore, past its cache (see DatastoreHealth)."""
        assert self._datastore is not None
        store = self._own_client(self._datastore).store
        if isinstance(store, ReachCheck):
            store.check_reach()
        else:
            store.read_blocks(PROBE_POOL, 0, 0)

    def cached_blocks(self) -> list[Block]:
        with self._lock:
            clients = list(self._clients.values())
        return [b for client in clients for b in client.cache.cached_blocks()]

    def close(self) -> None:
        self._stop_flushing.set()
        if self._flusher is not None:
            self._flusher.join()  # one flush at a time
        if self._pending is not None:
            give_up = time.monotonic() + FINAL_FLUSH_SECONDS
            # Tried again while changes are left; a journal that cannot be put right, once.
            while not self._flush(last=True) and self._pending.pending_count():
                if time.monotonic() >= give_up:
                    break
                time.sleep(0.2)
            left = self._pending.pending_count()
            if left:
                log.warning("%d pending changes left in the journal for the next agent", left)
            self._pending.close()
        with self._lock:
            self._closed = True  # a client being opened now is closed, not kept
            clients = [*self._clients.values(), *self._retired]
            self._clients.clear()
            self._retired.clear()
        for client in clients:
            client.close()

    def _client(self, ipam: IpamConf) -> _Client:
        own = self._datastore
        if own is not None:
            own.check_request(ipam)
            return self._own_client(own)
        return self._client_for(
            ipam.model_dump_json(include=set(STORE_FIELDS)),
            lambda *, timeout: open_store(ipam, timeout=timeout),
            ipam.datastore,
        )

    def _own_client(self, own: AgentDatastore) -> _Client:
        return self._client_for("own", own.open_store, own.settings.datastore)

    def _client_for(self, key: str, opener: Callable[..., PoolStore], datastore: str) -> _Client:
        with self._lock:
            client = self._clients.get(key)
            if client is not None and time.monotonic() - client.opened < CLIENT_MAX_AGE_SECONDS:
                return client
            opening = self._opening.setdefault(key, threading.Lock())
        # One request opens the fresh client, outside the lock: opening may run a kubeconfig's
        # exec plugin, for seconds. Meanwhile the others are served by the current client;
        # without one, they wait for it.
        if client is not None and not opening.acquire(blocking=False):
            return client
        if client is None:
            opening.acquire()
        try:
            return self._open_client(key, opener, datastore)
        finally:
            opening.release()

    def _open_client(self, key: str, opener: Callable[..., PoolStore], datastore: str) -> _Client:
        with self._lock:
            client = self._clients.get(key)
            if client is not None and time.monotonic() - client.opened < CLIENT_MAX_AGE_SECONDS:
                return client  # opened by the request this one waited for
        try:
            store = opener(timeout=REQUEST_TIMEOUT_SECONDS)
        except (CniError, OSError) as exc:
            if client is None:
                raise
            # A kubeconfig, CA or key file caught mid-rewrite, say: the client it has serves
            # on, and a fresh one is tried again a while later.
            log.warning(
                "a fresh store client could not be opened (%s); the current one serves on, and "
                "it is tried again in %g s",
                exc,
                CLIENT_REOPEN_SECONDS,
            )
            client.opened = time.monotonic() - CLIENT_MAX_AGE_SECONDS + CLIENT_REOPEN_SECONDS
            return client
        with self._lock:
            if self._closed:  # closed while it was opened: never served
                store.close()
                raise StoreUnavailableError("pyabouts-agent is stopping")
            stale, self._retired = self._retired, [client] if client else []
            if client is not None and client.follower is not None:
                client.follower.stop()  # its cache serves what is in flight; the new one follows
            feed = store if isinstance(store, BlockFeed) else None
            cache = CachedStore(
                MeteredStore(store, self._metrics, self.health),
                max_age=POOL_MAX_AGE_SECONDS,
                feed=feed,
                max_age_fed=POOL_MAX_AGE_FED_SECONDS,
                on_overtaken=self._metrics.conflicts.inc,
            )
            # Only the agent's own datastore: the journal names no other.
            pending = self._pending if key == "own" else None
            decided_on: PoolStore = DeferringStore(cache, pending) if pending else cache
            transactions = CoalescingTransactions(
                decided_on,
                self._metrics.batch_size.observe,
                recheck=cache.recheck,
                backoff_max=conflict_backoff_max(datastore),
            )
            follower = FeedFollower(feed, cache, self._metrics, self.health) if feed else None
            client = _Client(store, cache, transactions, follower)
            self._clients[key] = client
        if follower is not None:
            follower.start()
        for old in stale:
            old.close()
        log.info("store client opened")
        return client
