"""Small real servers on loopback for the HTTP client's tests: an HTTP/1.1 server answering what
a test scripts (and counting the connections it was asked on), one streaming a watch's lines, one
that never answers, and a CONNECT proxy."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import select
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Scripted:
    """What the server answers (a status and a JSON body), and what it saw: each request's
    method, path and the client port it came from, and its User-Agent."""

    status: int = 200
    body: Any = field(default_factory=dict)
    text: str | None = None  # answered instead of `body`, as text/plain (an overload refusal)
    headers: dict[str, str] = field(default_factory=dict)  # more headers (Retry-After)
    byte_every: float = 0.0  # seconds between the body's bytes, when it dribbles them
    seen: list[tuple[str, str, int]] = field(default_factory=list)
    user_agents: list[str] = field(default_factory=list)
    close_after_answer: bool = False  # then it drops the connection (an idle timeout, say)
    closed: threading.Event = field(default_factory=threading.Event)  # set once it has
    # Requests on connections from these client ports get no answer, and no FIN either (the
    # server's host gone, as far as they can tell), until the server stops.
    gone_for: set[int] = field(default_factory=set)
    stopping: threading.Event = field(default_factory=threading.Event)
    together: int = 0  # no answer until this many requests have come (each on a connection)


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # kept alive unless told otherwise

    def log_message(self, format: str, *args: Any) -> None:
        pass  # not one line on stderr per request


class _Handler(_QuietHandler):
    server: _Server

    def do_GET(self) -> None:
        self._answer()

    def do_PUT(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        script = self.server.script
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        script.seen.append((self.command, self.path, self.client_address[1]))
        script.user_agents.append(self.headers.get("User-Agent", ""))
        if self.client_address[1] in script.gone_for:
            script.stopping.wait()
            self.close_connection = True
            return
        give_up = time.monotonic() + 5
        while len(script.seen) < script.together and time.monotonic() < give_up:
            time.sleep(0.005)
        plain = script.text is not None
        data = script.text.encode() if script.text is not None else json.dumps(script.body).encode()
        self.send_response(script.status)
        self.send_header("Content-Type", "text/plain" if plain else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in script.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.flush()
        pieces = [data[i : i + 1] for i in range(len(data))] if script.byte_every else [data]
        with contextlib.suppress(OSError):  # a client that gave up on a dribbled answer
            for piece in pieces:
                time.sleep(script.byte_every)
                self.wfile.write(piece)
                self.wfile.flush()
        if script.close_after_answer:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            script.closed.set()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: Scripted) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = script


@contextlib.contextmanager
def _serving(
    server: socketserver.TCPServer, before_stop: Callable[[], None] = lambda: None
) -> Iterator[str]:
    """`server`'s http:// URL, served on a thread of its own until the block ends."""
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        before_stop()
        server.shutdown()
        server.server_close()


def scripted_server(script: Scripted) -> contextlib.AbstractContextManager[str]:
    """An http:// URL answered as `script` says, until the block ends."""
    return _serving(_Server(script), before_stop=script.stopping.set)


class _StreamHandler(_QuietHandler):
    """Answers a GET with the server's lines, a chunk each, then says nothing until stopped."""

    server: _StreamServer

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in self.server.lines:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
        self.server.stopping.wait()


class _StreamServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, lines: list[bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _StreamHandler)
        self.lines = lines
        self.stopping = threading.Event()


def streaming_server(lines: list[bytes]) -> contextlib.AbstractContextManager[str]:
    """An http:// URL that answers a GET as a watch does: `lines` in chunks, then silence."""
    server = _StreamServer(lines)
    return _serving(server, before_stop=server.stopping.set)


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """An http:// URL whose server takes connections (the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class ProxyLog:
    """The CONNECT requests a proxy served: target and the credentials it was given."""

    tunnels: list[tuple[str, str]] = field(default_factory=list)


class _ProxyHandler(socketserver.StreamRequestHandler):
    server: _ProxyServer

    def handle(self) -> None:
        request = self.rfile.readline().decode().split()
        headers = {}
        while (line := self.rfile.readline().decode()) not in ("\r\n", "\n", ""):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(request) < 2 or request[0] != "CONNECT":
            self.wfile.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        credentials = headers.get("proxy-authorization", "")
        given = base64.b64decode(credentials.removeprefix("Basic ")).decode() if credentials else ""
        self.server.log.tunnels.append((request[1], given))
        if not self.server.allows(given):
            self.wfile.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
            return
        host, _, port = request[1].rpartition(":")
        with socket.create_connection((host.strip("[]"), int(port))) as upstream:
            self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.wfile.flush()
            _relay(self.connection, upstream)


def _relay(one: socket.socket, other: socket.socket) -> None:
    peers = {one: other, other: one}
    while True:
        readable, _, _ = select.select(list(peers), [], [], 30)
        if not readable:
            return
        for sock in readable:
            data = sock.recv(65536)
            if not data:
                return
            peers[sock].sendall(data)


class _ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, log: ProxyLog, allows: Callable[[str], bool]) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.log = log
        self.allows = allows


def connect_proxy(
    log: ProxyLog, allows: Callable[[str], bool] = lambda _: True
) -> contextlib.AbstractContextManager[str]:
    """An http:// proxy URL that tunnels CONNECT requests `allows` (given "user:password")."""
    return _serving(_ProxyServer(log, allows))
