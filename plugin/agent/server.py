"""`pyabouts-agent`: the node-local server the thin plugin hands its CNI requests to.

It serves each request with the same plugin.handler.handle_request as the in-process plugin,
on a WarmBackend, on one of a fixed number of worker threads. An answer is sent only once
handle_request has returned, that is after the datastore acknowledged the write. A client that
goes away first leaves its ADD served (ADD is idempotent), and the runtime answers a failed ADD
with DEL, which waits for it (attachments.AddsInFlight). A client that is not root, slow, too
big or one too many is answered with a CNI error at once (see Limits and docs/errors.md).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import logging
import os
import signal
import socket
import socketserver
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from pyabouts.ipam.errors import DECODE_FAILURE, PEER_NOT_ALLOWED, TRY_AGAIN_LATER, CniError
from pyabouts.ipam.stores.write_behind import MAX_PENDING_SECONDS, PendingWrites
from pyabouts.plugin import wire
from pyabouts.plugin.agent.attachments import AddsInFlight
from pyabouts.plugin.agent.backend import WarmBackend
from pyabouts.plugin.agent.datastore import agent_datastore
from pyabouts.plugin.agent.metrics import AgentMetrics
from pyabouts.plugin.commands import DEADLINE_SECONDS
from pyabouts.plugin.handler import Reply, handle_request
from pyabouts.plugin.logs import LEVELS
from pyabouts.plugin.thin_client import AGENT_SOCKET
from pyabouts.plugin.wire import JOURNAL_LOCK, PENDING_JOURNAL
from pyabouts.serving.endpoints import record_pool_usage, serve_endpoints
from pyabouts.serving.listen import listen_argument, unix_socket_argument
from pyabouts.serving.workers import BoundedWorkers

log = logging.getLogger(__name__)

# A request is kilobytes: a network config, a GC's list of a node's attachments. Whoever
# writes a NAD chooses its size, though, and decoded, JSON holds up to about 25 times its bytes
# ("[{},{},...]"): so one request is refused past MAX_REQUEST_BYTES, and those over
# LARGE_REQUEST_BYTES served at once hold REQUEST_BYTES_IN_FLIGHT at most between them (about
# 50 MiB decoded; the small ones, 64 at most, 100 MiB at the very worst; under the DaemonSet's
# 256Mi); one that would hold more waits for others to end, within its deadline. Small ones
# never wait for large ones.
MAX_REQUEST_BYTES = 1 << 20
REQUEST_BYTES_IN_FLIGHT = 2 << 20
LARGE_REQUEST_BYTES = 64 << 10  # larger than any config seen, and than most GCs' lists
REQUEST_DEADLINE_SECONDS = 10.0  # to send a whole request (the thin client sends it at once)
MAX_REQUESTS = 64  # served at once: plenty to coalesce, and never a thread per connection
MAX_WAITING = 1024  # accepted requests queued for a worker; beyond, code 11 at once
ALLOWED_UIDS = frozenset({0})  # the container runtime runs CNI plugins as root
# --write-behind: off unless asked for; when asked without a figure, this (many changes in a
# write, stored well within the agent's 2 s pool cache age).
DEFAULT_WRITE_BEHIND_SECONDS = 0.25
MIN_WRITE_BEHIND_SECONDS = 0.05
MAX_WRITE_BEHIND_SECONDS = 60.0
# How often what an earlier agent left in the journal is stored, when --write-behind is off.
JOURNAL_FLUSH_SECONDS = 0.25
COMMANDS = frozenset({"ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"})
# A request makes thousands of container objects (a block read again is hundreds of entries).
# With a collection for cycles whenever 700 more of them are alive than after the last one, as
# Python has it, the agents spent 3.1% of their CPU in the collector in the 1000-ADD race on
# etcd (timed with gc.callbacks); at 10,000, 1.1%. What cycles hold waits that much longer to
# be freed: the older generations are collected after as many young collections as before.
GC_YOUNG_THRESHOLD = 10_000
# A command ends this long before its plugin stops waiting (wire.DEADLINE_KEY): room for a
# store request under way and the reply.
PLUGIN_WAIT_MARGIN_SECONDS = 10.0


@dataclass(frozen=True)
class Limits:
    """Who may ask the agent, and how much one client and all of them together may take."""

    allowed_uids: frozenset[int] = ALLOWED_UIDS
    request_deadline: float = REQUEST_DEADLINE_SECONDS
    max_requests: int = MAX_REQUESTS
    max_waiting: int = MAX_WAITING
    command_deadline: float = DEADLINE_SECONDS  # from accept: time queued for a worker counts


class RequestError(ValueError):
    """A request the agent will not serve: answered with CNI error `code`, counted as `reason`
    in pyabouts_agent_rejected_total."""

    code = DECODE_FAILURE
    reason = "malformed"


class RequestTooLargeError(RequestError):
    reason = "too-large"


class RequestTooSlowError(RequestError):
    code = TRY_AGAIN_LATER  # a client stalled on a loaded node may well succeed next time
    reason = "deadline"


class PluginGaveUpError(RequestError):
    code = TRY_AGAIN_LATER  # the plugin has answered code 11 already, or is about to
    reason = "plugin-gave-up"


def plugin_bound_deadline(env: dict[str, str], deadline: float) -> float:
    """`deadline` (monotonic), ended earlier where the request says its plugin stops waiting
    (wire.DEADLINE_KEY, taken out of `env`) less PLUGIN_WAIT_MARGIN_SECONDS; PluginGaveUpError
    when that is past: nothing is to be carried out for a call its runtime was told failed."""
    text = env.pop(wire.DEADLINE_KEY, None)
    if text is None:  # a plugin of before it
        return deadline
    try:
        gives_up = int(text) / 1000
    except (ValueError, OverflowError):  # not digits; past what a float holds
        raise RequestError(f"{wire.DEADLINE_KEY}={text[:20]!r} is not Unix milliseconds") from None
    now = time.monotonic()
    bound = now + gives_up - time.time() - PLUGIN_WAIT_MARGIN_SECONDS
    if bound <= now:
        raise PluginGaveUpError(
            "the plugin stopped waiting for this request before pyabouts-agent took it up (was "
            "the agent stalled?): not served"
        )
    return min(deadline, bound)


def read_request(sock: socket.socket, seconds: float) -> bytes:
    """All that the client sends until it closes its write end, which must happen within
    `seconds` in all, however the bytes trickle in, and within MAX_REQUEST_BYTES."""
    deadline = time.monotonic() + seconds
    too_slow = RequestTooSlowError(f"the request did not arrive whole within {seconds:g} s")
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise too_slow
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise too_slow from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise RequestTooLargeError(f"request over {MAX_REQUEST_BYTES} bytes")
        chunks.append(chunk)


class ByteBudget:
    """Bytes that the requests being served may hold between them: each takes its size for as
    long as it is served, waiting for others to give theirs back when too few are left."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._left = total
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def held(self, size: int, deadline: float) -> Iterator[None]:
        """`size` bytes (the whole budget at most) while the block runs; RequestTooSlowError
        when they are not free by `deadline` (monotonic)."""
        size = min(size, self._total)
        with self._changed:
            free = self._changed.wait_for(
                lambda: self._left >= size, timeout=max(0.0, deadline - time.monotonic())
            )
            if not free:
                raise RequestTooSlowError(
                    "pyabouts-agent is busy with large requests: this one waited its whole "
                    "deadline for their memory"
                )
            self._left -= size
        try:
            yield
        finally:
            with self._changed:
                self._left += size
                self._changed.notify_all()


def encode_reply(reply: Reply) -> bytes:
    return wire.encode_reply(reply.exit_code, reply.stdout)


def command_label(command: str) -> str:
    """`command` as a metric label: a CNI command, else "unknown", so that clients cannot add
    label values (each one a time series kept for ever)."""
    return command if command in COMMANDS else "unknown"


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process that connected `sock` (as it was at connect())."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return int(uid)


def _error_code(reply: Reply) -> str:
    if reply.exit_code == 0:
        return "ok"
    try:
        return str(json.loads(reply.stdout).get("code", "unknown"))
    except ValueError:
        return "unknown"


class AgentServer(socketserver.UnixStreamServer):
    """Accepts connections in serve()'s thread, refuses peers whose uid is not allowed, and
    hands the rest to a fixed pool of workers through a bounded queue (answering code 11 at
    once when that is full), so a flood of connections costs a refusal each, not a thread."""

    request_queue_size = 1024  # the listen backlog: a node starting hundreds of pods at once

    def __init__(
        self,
        socket_path: Path,
        backend: WarmBackend,
        metrics: AgentMetrics,
        limits: Limits | None = None,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.limits = limits or Limits()
        self.serving = threading.Event()
        self._workers = BoundedWorkers(self.limits.max_requests, self.limits.max_waiting, "request")
        self.request_bytes = ByteBudget(REQUEST_BYTES_IN_FLIGHT)
        self.adds_in_flight = AddsInFlight()
        _claim_socket_path(socket_path)
        super().__init__(str(socket_path), _RequestHandler)
        socket_path.chmod(0o600)  # the agent's user (root) alone may even connect
        self.socket_path = socket_path

    def serve(self) -> None:
        self.serving.set()
        try:
            self.serve_forever(poll_interval=0.2)
        finally:
            self.serving.clear()

    def close(self) -> None:
        """Stop taking requests, let those in flight finish (those still queued are answered
        code 11), remove the socket."""
        self.socket_path.unlink(missing_ok=True)
        self.server_close()
        self._workers.stop()
        self.backend.close()

    def alive(self) -> bool:
        return self.serving.is_set()

    def ready(self) -> bool:
        """Serving its socket, and its datastore answers (see DatastoreHealth)."""
        return self.serving.is_set() and self.socket_path.exists() and self.backend.health.ready()

    def refresh_pool_usage(self) -> None:
        record_pool_usage(self.metrics.pool_addresses, self.backend.cached_blocks())

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Serve only the allowed uids (root: the runtime); refuse anyone else at once."""
        uid = peer_uid(request)
        if uid in self.limits.allowed_uids:
            return True
        allowed = ", ".join(map(str, sorted(self.limits.allowed_uids)))
        log.warning("refused a client running as uid %d (allowed: %s)", uid, allowed)
        message = f"pyabouts-agent serves uid {allowed} only; this client runs as uid {uid}"
        self._refuse(request, "peer", PEER_NOT_ALLOWED, message)
        return False  # socketserver closes it

    def process_request(self, request: Any, client_address: Any) -> None:
        """Queue the request for a worker; when all are busy and the queue is full, code 11.
        Its command's deadline runs from now: the time it waits for a worker counts."""
        self.metrics.waiting.inc()
        deadline = time.monotonic() + self.limits.command_deadline
        serve = partial(self._serve_one, request, client_address, deadline)
        if not self._workers.try_submit(serve, partial(self._drop, request)):
            self.metrics.waiting.dec()
            limits = self.limits
            busy = f"{limits.max_requests} requests in flight and {limits.max_waiting} waiting"
            self._refuse_and_close(request, "busy", f"pyabouts-agent is busy ({busy})")

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("serving a request failed")

    def _serve_one(self, request: socket.socket, client_address: Any, deadline: float) -> None:
        self.metrics.waiting.dec()
        if time.monotonic() >= deadline:
            # Queued past its whole deadline: its client may have given up, and the runtime
            # sent its DEL already; an ADD served now could hold an address for nobody.
            waited = f"{self.limits.command_deadline:g} s"
            message = f"pyabouts-agent was busy: the request waited {waited} for a worker"
            self._refuse_and_close(request, "late", message)
            return
        try:
            _RequestHandler(request, client_address, self, deadline)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def _drop(self, request: socket.socket) -> None:
        """A request still queued when the agent stops: the runtime will try again."""
        self.metrics.waiting.dec()
        self._refuse_and_close(request, "stopping", "pyabouts-agent stopped before serving it")

    def _refuse_and_close(self, request: socket.socket, reason: str, message: str) -> None:
        self._refuse(request, reason, TRY_AGAIN_LATER, message)
        self.shutdown_request(request)

    def _refuse(self, request: socket.socket, reason: str, code: int, message: str) -> None:
        """Answer CNI error `code` without reading the request or waiting for the client: the
        reply is far smaller than a fresh connection's buffer."""
        self.metrics.rejected.labels(reason).inc()
        request.setblocking(False)
        with contextlib.suppress(OSError):
            request.send(encode_reply(_refusal(code, message)))


class _RequestHandler(socketserver.BaseRequestHandler):
    server: AgentServer

    def __init__(
        self, request: Any, client_address: Any, server: AgentServer, deadline: float | None = None
    ) -> None:
        # The command's, from when the request was accepted (socketserver's own call: now).
        self.deadline = deadline or time.monotonic() + server.limits.command_deadline
        super().__init__(request, client_address, server)

    def handle(self) -> None:
        started = time.monotonic()
        metrics = self.server.metrics
        metrics.in_flight.inc()
        command = "unknown"
        try:
            answer = self._answer()
            if answer is None:  # a connect-and-close probe (readiness checks): nothing to answer
                return
            command, reply = answer
            self.request.settimeout(self.server.limits.request_deadline)
            self.request.sendall(encode_reply(reply))
            metrics.requests.labels(command, _error_code(reply)).inc()
        except OSError as exc:  # the client went away: it will hear nothing, and retry
            log.warning("%s request: client gone before the answer (%s)", command, exc)
            metrics.requests.labels(command, "client-gone").inc()
        finally:
            metrics.in_flight.dec()
            metrics.latency.labels(command).observe(time.monotonic() - started)

    def _answer(self) -> tuple[str, Reply] | None:
        """The request's command (as a metric label) and its reply; None when the client sent
        nothing at all."""
        try:
            data = read_request(self.request, self.server.limits.request_deadline)
            if not data:
                return None
            large = len(data) > LARGE_REQUEST_BYTES  # only those share the budget
            budget = (
                self.server.request_bytes.held(len(data), self.deadline)
                if large
                else contextlib.nullcontext()
            )
            with budget:
                try:
                    env, stdin = _decode_request(data)
                    deadline = plugin_bound_deadline(env, self.deadline)
                    command = command_label(env.get("CNI_COMMAND", ""))
                    with self.server.adds_in_flight.serving(env, deadline) as servable:
                        if not servable:
                            return command, _refusal(TRY_AGAIN_LATER, ADD_STILL_SERVED)
                        reply = handle_request(env, stdin, self.server.backend, deadline=deadline)
                    return command, reply
                finally:
                    if large:
                        # What it decoded can outlive it in reference cycles (an error's
                        # traceback holds its frames) until the collector runs: freed now,
                        # before its bytes go back to the budget.
                        gc.collect()
        except RequestError as exc:
            log.warning("refused a request: %s", exc)
            self.server.metrics.rejected.labels(exc.reason).inc()
            return "unknown", _refusal(exc.code, str(exc))


def _decode_request(data: bytes) -> tuple[dict[str, str], bytes]:
    try:
        return wire.decode_request(data)
    except wire.WireError as exc:
        raise RequestError(str(exc)) from None


ADD_STILL_SERVED = (
    "pyabouts-agent still serves an ADD of this container's interface (its caller gave up): "
    "the DEL waits for it, and waited past its deadline"
)


def _refusal(code: int, message: str) -> Reply:
    error = {"cniVersion": "1.0.0", "code": code, "msg": message}
    return Reply(1, json.dumps(error).encode())


def _claim_socket_path(path: Path) -> None:
    """Make `path` free to bind: refuse if another agent answers there, remove a stale one."""
    _make_private(path.parent)
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


def _make_private(directory: Path) -> None:
    """Make the socket's directory root's alone (0700), whoever created it and how; but not a
    shared one such as /tmp (sticky), which others need."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if directory.stat().st_mode & stat.S_ISVTX:
        log.warning("%s is shared (sticky): left as it is; give the socket a directory", directory)
        return
    directory.chmod(0o700)


def _add_limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        metavar="UID",
        help="a uid whose processes may call the agent (repeatable; default: 0, the runtime); "
        "the socket's file modes let only the agent's own user connect at all",
    )
    parser.add_argument(
        "--max-requests",
        type=_int_at_least(1),
        default=MAX_REQUESTS,
        help=f"requests served at once (default: {MAX_REQUESTS})",
    )
    parser.add_argument(
        "--max-waiting",
        type=_int_at_least(0),
        default=MAX_WAITING,
        help=f"requests queued beyond those; more get code 11 (default: {MAX_WAITING})",
    )
    parser.add_argument(
        "--request-deadline",
        type=_seconds,
        default=REQUEST_DEADLINE_SECONDS,
        help=f"seconds a client has to send its whole request (default: "
        f"{REQUEST_DEADLINE_SECONDS:g})",
    )
    parser.add_argument(
        "--command-deadline",
        type=_seconds,
        default=DEADLINE_SECONDS,
        help="seconds a request has, from when it is accepted, to be served (retries and time "
        f"queued for a worker included; then code 11) (default: {DEADLINE_SECONDS:g})",
    )


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(
        allowed_uids=frozenset(args.allow_uid) if args.allow_uid else ALLOWED_UIDS,
        request_deadline=args.request_deadline,
        max_requests=args.max_requests,
        max_waiting=args.max_waiting,
        command_deadline=args.command_deadline,
    )


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text} is below {minimum}")
        return int(text)

    return parse


def _write_behind_seconds(text: str) -> float:
    seconds = float(text)
    if not (seconds == 0 or MIN_WRITE_BEHIND_SECONDS <= seconds <= MAX_WRITE_BEHIND_SECONDS):
        raise argparse.ArgumentTypeError(
            f"{text} is neither 0 (off) nor between {MIN_WRITE_BEHIND_SECONDS:g} and "
            f"{MAX_WRITE_BEHIND_SECONDS:g} seconds"
        )
    return seconds


def _socket_path(text: str) -> Path:
    return Path(unix_socket_argument(text))


def _seconds(text: str) -> float:
    if not float(text) > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return float(text)


def _take_up_journal(backend: WarmBackend, metrics: AgentMetrics, args: argparse.Namespace) -> None:
    """Store behind the writes of this node's slice blocks (--write-behind), and what an
    earlier agent left pending in the journal beside the socket in any case."""
    journal = args.socket.parent / PENDING_JOURNAL
    try:
        # For good (closed at exit): a thin plugin finding no agent serves in-process only
        # when it can take this lock, so never beside an agent starting or stopping here.
        lock = os.open(args.socket.parent / JOURNAL_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        every = args.write_behind or JOURNAL_FLUSH_SECONDS
        pending = PendingWrites(
            journal,
            args.node_name,
            defer=args.write_behind > 0,
            # A flush interval's worth and twice more: a flush that waits for the datastore.
            max_pending=max(MAX_PENDING_SECONDS, 3 * every),
            on_clash=metrics.write_behind_clashes.inc,
        )
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot take up the journal {journal}: {exc}") from exc
    backend.write_behind(pending, every=every)


def _import_request_path() -> None:
    """Import now what requests would import on first use, so the first pod pays nothing."""
    import pyabouts.ipam.stores.etcd  # noqa: PLC0415
    import pyabouts.ipam.stores.kubernetes  # noqa: PLC0415
    import pyabouts.plugin.commands  # noqa: F401, PLC0415


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pyabouts-agent", description=__doc__)
    parser.add_argument(
        "--socket",
        type=_socket_path,
        default=Path(AGENT_SOCKET),
        help="its directory is made 0700: give it one of its own",
    )
    parser.add_argument(
        "--listen",
        type=listen_argument,
        default=":9646",
        help="host:port, [ipv6]:port or :port of /metrics, /healthz, /readyz",
    )
    _add_limit_flags(parser)
    parser.add_argument("--log-level", default="info", choices=sorted(LEVELS))
    parser.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME") or socket.gethostname().lower(),
        help="recorded in each allocation (CNI GC is scoped to it), and spreads nodes over a "
        "range's blocks (default: $NODE_NAME, else the host name, lower-cased as kubelet has it)",
    )
    parser.add_argument(
        "--config",
        help="the agent's own flat file: its datastore settings (datastore, etcd_*, "
        "kubernetes.kubeconfig), and what requests leave empty; default: IPPools through "
        "--kubeconfig, else the pod's service account",
    )
    parser.add_argument("--kubeconfig", help="for IPPools (default: the --config file's)")
    parser.add_argument(
        "--write-behind",
        type=_write_behind_seconds,
        nargs="?",
        const=DEFAULT_WRITE_BEHIND_SECONDS,
        default=0.0,
        metavar="SECONDS",
        help="under node slices, answer a change of this node's own slice blocks once it is in "
        "the journal beside the socket, and store it within SECONDS (given without a figure: "
        f"{DEFAULT_WRITE_BEHIND_SECONDS:g}); only where every config of a sliced network has "
        "the same range and node_slice_size, and no plugin serves the node in-process while "
        "its agent runs (see the README). Default (or 0): off, every write stored before its "
        "answer",
    )
    parser.add_argument(
        "--trust-request-datastore",
        action="store_true",
        help="use the datastore settings, kubeconfig and flat file each request names, as the "
        "in-process plugin does: for tests and single-user hosts only, never where others write "
        "NetworkAttachmentDefinitions",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=LEVELS[args.log_level],
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
    )
    _import_request_path()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    datastore = None
    if not args.trust_request_datastore:
        try:
            datastore = agent_datastore(args.config, args.kubeconfig)
        except CniError as exc:
            raise SystemExit(f"pyabouts-agent: {exc.msg}") from None
        log.info("serving %s", datastore.describe())
    metrics = AgentMetrics()
    backend = WarmBackend(metrics, args.node_name, datastore)
    try:
        server = AgentServer(args.socket, backend, metrics, _limits(args))  # the socket is ours
    except OSError as exc:  # its directory cannot be made private, say
        backend.close()
        raise SystemExit(f"pyabouts-agent: cannot serve on {args.socket}: {exc}") from None
    try:
        if datastore is not None:
            _take_up_journal(backend, metrics, args)
        backend.open_own_client()
    except CniError as exc:
        server.close()
        raise SystemExit(f"pyabouts-agent: {exc.msg}") from None
    except (OSError, ValueError) as exc:  # a CA or client key that TLS cannot load, say
        server.close()
        raise SystemExit(f"pyabouts-agent: {exc}") from None
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
