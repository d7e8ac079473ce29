"""`pyabouts-agent`: the node-local server the thin plugin hands its CNI requests to.

It serves each request with the same plugin.handler.handle_request as the in-process plugin,
on a WarmBackend, in a thread of its own. An answer is sent only once handle_request has
returned, that is after the datastore acknowledged the write; a client that goes away first
changes nothing (ADD is idempotent, and the runtime answers a failed ADD with DEL).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import socketserver
import threading
import time
from pathlib import Path
from types import FrameType

from controller.endpoints import record_pool_usage, serve_endpoints
from ipam.errors import DECODE_FAILURE
from plugin.agent_backend import WarmBackend
from plugin.agent_metrics import AgentMetrics
from plugin.handler import Reply, handle_request
from plugin.logs import LEVELS
from plugin.thin_client import AGENT_SOCKET, MAGIC

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4 << 20  # a network config is kilobytes; refuse what cannot be one
READ_TIMEOUT_SECONDS = 30.0  # a client that sends nothing for this long is gone


class RequestError(ValueError):
    pass


def decode_request(data: bytes) -> tuple[dict[str, str], bytes]:
    """The environment and config bytes of one request (see plugin.thin_client)."""
    if not data.startswith(MAGIC):
        raise RequestError("not a pyabouts request")
    body = data[len(MAGIC) :]
    env: dict[str, str] = {}
    while True:
        entry, nul, body = body.partition(b"\0")
        if not nul:
            raise RequestError("request ended inside its environment")
        if not entry:
            return env, body
        key, equals, value = entry.partition(b"=")
        if not equals:
            raise RequestError(f"environment entry without '=': {entry[:40]!r}")
        env[os.fsdecode(key)] = os.fsdecode(value)


def encode_reply(reply: Reply) -> bytes:
    return b"%d\0" % reply.exit_code + reply.stdout


def _error_code(reply: Reply) -> str:
    if reply.exit_code == 0:
        return "ok"
    try:
        return str(json.loads(reply.stdout).get("code", "unknown"))
    except ValueError:
        return "unknown"


class AgentServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = False  # server_close() waits for requests in flight
    block_on_close = True
    request_queue_size = 1024  # a node starting hundreds of pods at once

    def __init__(self, socket_path: Path, backend: WarmBackend, metrics: AgentMetrics) -> None:
        self.backend = backend
        self.metrics = metrics
        self.serving = threading.Event()
        _claim_socket_path(socket_path)
        super().__init__(str(socket_path), _RequestHandler)
        socket_path.chmod(0o600)  # only root (the runtime) may ask for addresses
        self.socket_path = socket_path

    def serve(self) -> None:
        self.serving.set()
        try:
            self.serve_forever(poll_interval=0.2)
        finally:
            self.serving.clear()

    def close(self) -> None:
        """Stop taking requests, let those in flight finish, remove the socket."""
        self.socket_path.unlink(missing_ok=True)
        self.server_close()
        self.backend.close()

    def alive(self) -> bool:
        return self.serving.is_set()

    def ready(self) -> bool:
        return self.serving.is_set() and self.socket_path.exists()

    def refresh_pool_usage(self) -> None:
        record_pool_usage(self.metrics.pool_addresses, self.backend.cached_blocks())


class _RequestHandler(socketserver.BaseRequestHandler):
    server: AgentServer

    def handle(self) -> None:
        started = time.monotonic()
        metrics = self.server.metrics
        metrics.in_flight.inc()
        command = "unknown"
        try:
            data = self._read_request()
            if not data:  # a connect-and-close probe (readiness checks): nothing to answer
                return
            try:
                env, stdin = decode_request(data)
            except RequestError as exc:
                reply = _refusal(str(exc))
            else:
                command = env.get("CNI_COMMAND", "unknown")
                reply = handle_request(env, stdin, self.server.backend)
            self.request.sendall(encode_reply(reply))
            metrics.requests.labels(command, _error_code(reply)).inc()
        except OSError as exc:  # the client went away: it will hear nothing, and retry
            log.warning("%s request: client gone before the answer (%s)", command, exc)
            metrics.requests.labels(command, "client-gone").inc()
        finally:
            metrics.in_flight.dec()
            metrics.latency.labels(command).observe(time.monotonic() - started)

    def _read_request(self) -> bytes:
        sock: socket.socket = self.request
        sock.settimeout(READ_TIMEOUT_SECONDS)
        chunks, size = [], 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_REQUEST_BYTES:
                raise OSError(f"request over {MAX_REQUEST_BYTES} bytes")
        return b"".join(chunks)


def _refusal(message: str) -> Reply:
    error = {"cniVersion": "1.0.0", "code": DECODE_FAILURE, "msg": message}
    return Reply(1, json.dumps(error).encode())


def _claim_socket_path(path: Path) -> None:
    """Make `path` free to bind: refuse if another agent answers there, remove a stale one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # left by an agent that died: nobody listens
        return
    finally:
        probe.close()
    raise SystemExit(f"pyabouts-agent: another agent is serving {path}")


def _import_request_path() -> None:
    """Import now what requests would import on first use, so the first pod pays nothing."""
    import ipam.stores.etcd  # noqa: PLC0415
    import ipam.stores.kubernetes  # noqa: F401, PLC0415
    import plugin.commands  # noqa: F401, PLC0415


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pyabouts-agent", description=__doc__)
    parser.add_argument("--socket", type=Path, default=Path(AGENT_SOCKET))
    parser.add_argument(
        "--listen", default=":9646", help="host:port of /metrics, /healthz, /readyz"
    )
    parser.add_argument("--log-level", default="info", choices=sorted(LEVELS))
    parser.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        help="spreads nodes over a range's blocks (default: $NODE_NAME, else the host name)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=LEVELS[args.log_level],
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
    )
    _import_request_path()
    metrics = AgentMetrics()
    server = AgentServer(args.socket, WarmBackend(metrics, args.node_name), metrics)
    serve_endpoints(args.listen, metrics.registry, server, before_scrape=server.refresh_pool_usage)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing requests in flight, then stopping", signum)
        threading.Thread(target=server.shutdown, name="shutdown", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("serving CNI requests on %s for node %s", args.socket, args.node_name)
    server.serve()
    server.close()
    log.info("stopped")


if __name__ == "__main__":
    main()
