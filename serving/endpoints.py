"""/metrics, /healthz and /readyz for pyabouts' long-running processes (the reconciler's
controller and the node agent), and the pool-usage gauge both export."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from pyabouts.ipam.pool import Block
from pyabouts.ipam.pool_report import pool_usage
from pyabouts.serving.listen import parse_listen
from pyabouts.serving.workers import BoundedWorkers

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

IDLE_TIMEOUT_SECONDS = 5.0  # a connection that has sent nothing for this long is dropped
REQUEST_DEADLINE_SECONDS = 5.0  # to send a whole request once begun; also each write's timeout
MAX_HANDLERS = 32  # requests answered at once
MAX_WAITING_REQUESTS = 32  # begun requests waiting for a handler; beyond, 503 at once
MAX_IDLE_CONNECTIONS = 256  # beyond, the oldest idle connection is dropped for the newcomer
BUSY_REPLY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


def pool_usage_gauge(registry: CollectorRegistry) -> Gauge:
    return Gauge(
        "pyabouts_pool_addresses",
        "Addresses of each pool: total (that its ranges may give, over the whole of each range), "
        "used, reserved (for a StatefulSet's pod: sticky_statefulsets), cooling (released and "
        "resting: release_cooldown), free.",
        ["network", "family", "state"],
        registry=registry,
    )


def record_pool_usage(gauge: Gauge, blocks: Sequence[Block]) -> None:
    """Set `gauge` (pool_usage_gauge) to the usage of the pools of `blocks`, and only those."""
    gauge.clear()
    for usage in pool_usage(blocks, now=int(time.time())):
        labels = {"network": usage.pool.network, "family": str(usage.pool.family)}
        gauge.labels(**labels, state="total").set(usage.total)
        gauge.labels(**labels, state="used").set(usage.used)
        gauge.labels(**labels, state="reserved").set(usage.reserved)
        gauge.labels(**labels, state="cooling").set(usage.cooling)
        gauge.labels(**labels, state="free").set(usage.free)


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
) -> EndpointServer:
    """Serve /metrics, /healthz and /readyz on `listen` (see parse_listen) in a thread;
    `before_scrape` brings figures that are cheaper to compute on demand up to date."""

    class Handler(_DeadlineRequestHandler):
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

    host, port = parse_listen(listen)
    server = _every_address(port, Handler) if not host else EndpointServer((host, port), Handler)
    server.start()
    return server


def _every_address(port: int, handler: type[socketserver.BaseRequestHandler]) -> EndpointServer:
    """A server on every address of the node: IPv6 and IPv4 on one socket, or IPv4 alone on a
    node without IPv6 (kubelet probes a host-network pod on the node's first address, which
    is IPv6 on an IPv6-only or IPv6-first cluster)."""
    try:
        return EndpointServer(("::", port), handler)
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
        return EndpointServer(("0.0.0.0", port), handler)


class _DeadlineRequestHandler(BaseHTTPRequestHandler):
    """One HTTP/1.0 request per connection, which must arrive whole within
    REQUEST_DEADLINE_SECONDS of its first byte, however slowly it trickles."""

    timeout = REQUEST_DEADLINE_SECONDS  # each write's

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # replaced by one that keeps to the deadline
        deadline = time.monotonic() + REQUEST_DEADLINE_SECONDS
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline))

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.connection.settimeout(self.timeout)  # reads left it at what remained of theirs
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # probes every few seconds would drown the log


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes until `deadline` (time.monotonic()), then TimeoutError."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class EndpointServer(HTTPServer):
    """An HTTPServer that gives a connection a handler only once its request begins to arrive.

    Until then a connection waits in a selector, costing a file descriptor and no thread, and
    is dropped after IDLE_TIMEOUT_SECONDS, or earlier (oldest first) when MAX_IDLE_CONNECTIONS
    wait. So idle or half-open connections cannot keep a scraper from its answer, and at most
    MAX_HANDLERS requests are answered at once.
    """

    def __init__(
        self, address: tuple[str, int], handler: type[socketserver.BaseRequestHandler]
    ) -> None:
        self.request_queue_size = 128  # the listen backlog (5 by default)
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        # Before the bind: a bind that fails calls server_close(), which stops the workers.
        self._workers = BoundedWorkers(MAX_HANDLERS, MAX_WAITING_REQUESTS, "endpoints")
        super().__init__(address, handler)
        self._idle: dict[socket.socket, float] = {}  # accepted at, oldest first
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="endpoints", daemon=True)

    def server_bind(self) -> None:
        if self.server_address[0] == "::":  # every address, IPv4 too, as Go's [::]:port
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Stop accepting and drop the idle connections; server_close() then waits for the
        requests being answered."""
        self._stopping.set()
        self._thread.join()

    def server_close(self) -> None:
        super().server_close()
        self._workers.stop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("endpoint request from %s failed", client_address, exc_info=True)

    def _serve(self) -> None:
        self.socket.setblocking(False)
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select(timeout=0.5):
                    if key.data is None:
                        self._accept(selector)
                    else:
                        self._dispatch(selector, *key.data)
                self._drop_idle(selector, time.monotonic() - IDLE_TIMEOUT_SECONDS)
            for conn in list(self._idle):
                self._drop(selector, conn)

    def _accept(self, selector: selectors.BaseSelector) -> None:
        try:
            conn, address = self.socket.accept()
        except BlockingIOError:  # gone before we took it
            return
        except OSError as exc:  # out of file descriptors, say: the idle ones go first
            log.warning("endpoints: cannot accept a connection: %s", exc)
            self._drop_oldest(selector)
            return
        if len(self._idle) >= MAX_IDLE_CONNECTIONS:
            self._drop_oldest(selector)
        self._idle[conn] = time.monotonic()
        selector.register(conn, selectors.EVENT_READ, (conn, address))

    def _dispatch(
        self, selector: selectors.BaseSelector, conn: socket.socket, address: Any
    ) -> None:
        """The request has begun to arrive (or the client closed): hand it to a handler."""
        selector.unregister(conn)
        del self._idle[conn]
        refuse = partial(self._refuse, conn)
        if not self._workers.try_submit(partial(self._handle, conn, address), refuse):
            refuse()

    def _handle(self, conn: socket.socket, address: Any) -> None:
        try:
            self.finish_request(conn, address)
        except Exception:
            self.handle_error(conn, address)
        finally:
            self.shutdown_request(conn)

    def _refuse(self, conn: socket.socket) -> None:
        conn.setblocking(False)  # a best-effort answer: never wait for a client
        with contextlib.suppress(OSError):
            conn.send(BUSY_REPLY)
        self.shutdown_request(conn)

    def _drop_idle(self, selector: selectors.BaseSelector, accepted_before: float) -> None:
        for conn, accepted in list(self._idle.items()):
            if accepted >= accepted_before:
                break
            self._drop(selector, conn)

    def _drop_oldest(self, selector: selectors.BaseSelector) -> None:
        if self._idle:
            self._drop(selector, next(iter(self._idle)))

    def _drop(self, selector: selectors.BaseSelector, conn: socket.socket) -> None:
        selector.unregister(conn)
        del self._idle[conn]
        conn.close()
