"""The node agent's Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pyabouts.serving.endpoints import pool_usage_gauge

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


#: The count of blocks a write found changed (the benchmark reads it from /metrics).
CONFLICTS_METRIC = "pyabouts_agent_conflicts"


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pyabouts_agent_requests",
            "CNI requests served, by command and result ('ok' or the CNI error code).",
            ["command", "result"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pyabouts_agent_request_seconds",
            "Time from a request's arrival to its answer, by command.",
            ["command"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "pyabouts_agent_requests_in_flight", "Requests being served.", registry=self.registry
        )
        self.waiting = Gauge(
            "pyabouts_agent_requests_waiting",
            "Requests accepted and queued for a worker (all --max-requests busy).",
            registry=self.registry,
        )
        self.rejected = Counter(
            "pyabouts_agent_rejected",
            "Connections and requests answered with an error before being served, by reason: "
            "peer (its uid is not allowed), busy (every worker busy, the queue full), stopping, "
            "malformed, too-large, deadline (not sent whole in time), late (queued for a worker "
            "past the command's deadline).",
            ["reason"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "pyabouts_agent_batch_size",
            "Decisions stored together in one optimistic write.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.store_writes = Counter(
            "pyabouts_agent_store_writes", "Optimistic writes sent.", registry=self.registry
        )
        self.store_reads = Counter(
            "pyabouts_agent_store_reads", "Pool reads sent (cache misses).", registry=self.registry
        )
        self.conflicts = Counter(
            CONFLICTS_METRIC,
            "Blocks a write found changed by somebody else, or did not send because the watch "
            "of the IPPools showed them changed (then read afresh and decided again).",
            registry=self.registry,
        )
        self.feed_live = Gauge(
            "pyabouts_agent_block_feed_live",
            "1 while the watch of the IPPools tells the agent which blocks others write (then an "
            "idle pool is not read again before use), 0 while it is down or not offered (etcd).",
            registry=self.registry,
        )
        self.write_behind_pending = Gauge(
            "pyabouts_agent_write_behind_pending",
            "Address changes of this node's slice blocks answered and kept in its journal, not "
            "stored yet (stored every --write-behind seconds).",
            registry=self.registry,
        )
        self.write_behind_clashes = Counter(
            "pyabouts_agent_write_behind_clashes",
            "Addresses this node gave from its slice before storing them, found stored as held by "
            "somebody else meanwhile (a config of the range without node_slice_size?).",
            registry=self.registry,
        )
        self.feed_breaks = Counter(
            "pyabouts_agent_block_feed_breaks",
            "Times the watch of the IPPools broke and was started again.",
            registry=self.registry,
        )
        self.pool_addresses = pool_usage_gauge(self.registry)
