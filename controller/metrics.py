"""The controller's Prometheus metrics."""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from pyabouts.controller.reconciler import PassSummary
from pyabouts.ipam.pool import Block
from pyabouts.serving.endpoints import pool_usage_gauge, record_pool_usage


class ReconcilerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reclaimed = Counter(
            "pyabouts_reconciler_reclaimed",
            "Addresses given back, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.leaks_found = Counter(
            "pyabouts_reconciler_leaks_found",
            "Leaked addresses found, by reason (freed, or changed meanwhile and kept).",
            ["reason"],
            registry=self.registry,
        )
        self.slices_freed = Counter(
            "pyabouts_reconciler_node_slices_freed",
            "Node slices given back: their node was gone and no address of them was given.",
            registry=self.registry,
        )
        self.blocks_removed = Counter(
            "pyabouts_reconciler_empty_blocks_deleted",
            "Stored blocks deleted because they held nothing (see the README, Reconciler).",
            registry=self.registry,
        )
        self.errors = Counter(
            "pyabouts_reconciler_errors",
            "Passes that failed, or left leaks unfreed (a block refused, the datastore down).",
            registry=self.registry,
        )
        self.passes = Counter(
            "pyabouts_reconciler_passes",
            "Reconcile passes: full (listing every pod) or targeted (deleted pods).",
            ["kind"],
            registry=self.registry,
        )
        self.unreadable = Gauge(
            "pyabouts_reconciler_unreadable_blocks",
            "Stored blocks the last pass left out: not in pyabouts' format (see the log).",
            registry=self.registry,
        )
        self.leader = Gauge(
            "pyabouts_reconciler_leader",
            "1 while this replica holds the Lease and acts.",
            registry=self.registry,
        )
        self.pool_addresses = pool_usage_gauge(self.registry)
        self.last_pass = Gauge(
            "pyabouts_reconciler_last_pass_timestamp_seconds",
            "When the last pass ended.",
            registry=self.registry,
        )

    def record_pass(self, kind: str, summary: PassSummary) -> None:
        self.passes.labels(kind).inc()
        for reason, count in summary.by_reason().items():
            self.reclaimed.labels(reason).inc(count)
        for leak in summary.leaks:
            self.leaks_found.labels(leak.reason.value).inc()
        self.slices_freed.inc(len(summary.slices_freed))
        if not summary.dry_run:
            self.blocks_removed.inc(len(summary.blocks_removed))
        self.unreadable.set(len(summary.unreadable))
        self.last_pass.set(time.time())
        if kind == "full":
            self.record_pools(summary.blocks)

    def record_pools(self, blocks: Sequence[Block]) -> None:
        """Per-pool usage from a pass's snapshot (what it freed shows in the next one)."""
        record_pool_usage(self.pool_addresses, blocks)
