"""/metrics, /healthz and /readyz for pyabouts' long-running processes (the reconciler's
controller and the node agent), and the pool-usage gauge both export."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from ipam.pool import Block


def pool_usage_gauge(registry: CollectorRegistry) -> Gauge:
    return Gauge(
        "pyabouts_pool_addresses",
        "Addresses of each pool's stored blocks: total (that its ranges may give), used, free.",
        ["network", "family", "scope", "state"],
        registry=registry,
    )


def record_pool_usage(gauge: Gauge, blocks: Sequence[Block]) -> None:
    """Set `gauge` (pool_usage_gauge) to the usage of the pools of `blocks`, and only those."""
    totals: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for block in blocks:
        pool = block.key.pool
        counts = totals[(pool.network, str(pool.family), pool.scope)]
        counts[0] += block.capacity
        counts[1] += len(block.entries)
    gauge.clear()
    for (network, family, scope), (total, used) in totals.items():
        labels = {"network": network, "family": family, "scope": scope}
        gauge.labels(**labels, state="total").set(total)
        gauge.labels(**labels, state="used").set(used)
        gauge.labels(**labels, state="free").set(max(0, total - used))


class Liveness(Protocol):
    def alive(self) -> bool: ...

    def ready(self) -> bool: ...


class Health:
    """Liveness: the control loop came round recently. Readiness: it has made its first pass,
    or it stands by as a follower."""

    def __init__(self, stale_after: float) -> None:
        self._lock = threading.Lock()
        self._beat = time.monotonic()
        self._ready = False
        self._stale_after = stale_after

    def beat(self, *, ready: bool | None = None) -> None:
        with self._lock:
            self._beat = time.monotonic()
            if ready is not None:
                self._ready = ready

    def alive(self) -> bool:
        with self._lock:
            return time.monotonic() - self._beat < self._stale_after

    def ready(self) -> bool:
        with self._lock:
            return self._ready and time.monotonic() - self._beat < self._stale_after


def serve_endpoints(
    listen: str,
    registry: CollectorRegistry,
    health: Liveness,
    before_scrape: Callable[[], None] | None = None,
) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on `listen` ("host:port" or ":port") in a thread;
    `before_scrape` brings figures that are cheaper to compute on demand up to date."""
    host, _, port = listen.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                if before_scrape is not None:
                    before_scrape()
                self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                self._answer(*(200, b"ok") if health.alive() else (503, b"stalled"))
            elif self.path == "/readyz":
                self._answer(*(200, b"ok") if health.ready() else (503, b"not ready"))
            else:
                self._answer(404, b"not found")

        def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes every few seconds would drown the log

    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
    threading.Thread(target=server.serve_forever, name="endpoints", daemon=True).start()
    return server
