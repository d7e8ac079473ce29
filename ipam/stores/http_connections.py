"""Kept-alive HTTP/1.1 connections to one server, on the standard library's http.client.

Not urllib3: every ADD waits for one IPPool update, and an agent serving ADDs through urllib3
answered each 0.5 ms later and spent 0.6 ms more CPU on it (README, "The Kubernetes datastore");
importing it cost the in-process plugin another ~50 ms. What urllib3 gave the store (a pool of
kept-alive connections, a CONNECT proxy, a TLS server name) is the little below. Not kept from
it: https:// and socks proxies, and an IPv6 server behind a proxy before Python 3.12 (whose
http.client writes the CONNECT line without the brackets): each is refused as it is configured.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

# What a kept-alive connection the server had closed raises: on sending, or on waiting for the
# answer's first line. Either way no answer came, and the request is sent once more on a new
# connection: always if it broke while being sent (a server that closed the connection reads
# none of it), else only if it is idempotent (the server may have carried it out).
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
# A connection idle longer is closed, not used: a server that went away without a word (its
# host powered off behind a Service) leaves kept connections that answer nothing, each costing
# a request its whole timeout. Under kube-apiserver's own idle limit (90 s), so that a quiet
# node's next request does not meet a connection the server is closing.
IDLE_KEPT_SECONDS = 85.0


class AnswerTimeoutError(TimeoutError):
    """Connected, and no answer in time (not even a TLS handshake): the server is up, and slow
    or stalled."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where requests go: the server (scheme, host, port, path prefix) and how to reach it."""

    host: str
    port: int
    prefix: str  # a path the server's URL carries (a proxying front end's), or ""
    context: ssl.SSLContext | None  # None: plain http://
    server_hostname: str | None = None  # the name its certificate must carry, if not `host`
    proxy: tuple[str, int, dict[str, str]] | None = None  # http proxy: host, port, headers

    @classmethod
    def parse(
        cls,
        server: str,
        *,
        tls: Callable[[], ssl.SSLContext],
        server_hostname: str | None = None,
        proxy: str | None = None,
    ) -> Endpoint:
        """`tls` makes the context of an https:// server. ValueError for a URL it cannot use (a
        scheme other than http(s), a proxy other than http://)."""
        url = urlsplit(server)  # the scheme lowercased: HTTPS:// is https://
        if url.scheme not in ("https", "http") or not url.hostname:
            raise ValueError(f"server {server!r} is not an http(s):// URL")
        if proxy and ":" in url.hostname and sys.version_info < (3, 12):
            raise ValueError("an IPv6 server behind a proxy needs Python 3.12 or later")
        return cls(
            host=url.hostname,
            port=url.port or (443 if url.scheme == "https" else 80),
            prefix=url.path.rstrip("/"),
            context=tls() if url.scheme == "https" else None,
            server_hostname=server_hostname,
            proxy=_http_proxy(proxy) if proxy else None,
        )


def _http_proxy(proxy: str) -> tuple[str, int, dict[str, str]]:
    url = urlsplit(proxy)
    if url.scheme != "http" or not url.hostname:
        where = f"{url.scheme}://{url.hostname or ''}"  # not its credentials: errors are logged
        raise ValueError(f"proxy-url {where}...: only http:// proxies are supported")
    headers = {}
    if url.username is not None:
        secret = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(secret).decode()
    return url.hostname, url.port or 80, headers


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # path and query
    body: bytes | None
    headers: dict[str, str]
    timeout: float  # seconds for the whole exchange: connecting, sending, the whole answer


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    reason: str
    data: bytes
    retry_after: float | None = None  # seconds the server asked to wait (Retry-After), if any


# The deadline of the exchange the calling thread is reading the answer of (see _AnswerByDeadline).
_reading = threading.local()


class _ReadsByDeadline(io.RawIOBase):
    """The socket's own reader (sock.makefile's SocketIO, as http.client reads it), each read
    given only the time left before `deadline`. Like http.client's, it keeps the socket open
    until it is closed itself: an answer saying "Connection: close" is read after its
    connection let go of the socket."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._raw = sock.makefile("rb", buffering=0)
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(_left(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _AnswerByDeadline(http.client.HTTPResponse):
    """An answer read whole by its exchange's deadline: a socket timeout bounds each read
    alone, and a server (or a proxy) that sends its answer a few bytes at a time would keep the
    call for as long as it keeps sending."""

    def __init__(
        self,
        sock: socket.socket,
        debuglevel: int = 0,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(sock, debuglevel, method, url)
        deadline: float | None = getattr(_reading, "deadline", None)
        if deadline is not None:  # None: a proxy's answer to CONNECT, or a watch (idle timeouts)
            reader = io.BufferedReader(_ReadsByDeadline(sock, deadline))
            self.fp.close()  # the reader that reads with the socket's timeout alone
            self.fp = reader  # type: ignore[assignment]  # typeshed: over a socket's stream only


class _TlsConnection(http.client.HTTPSConnection):
    """An HTTPS connection that checks the certificate for `name`: the server's host behind a
    proxy, or a kubeconfig's tls-server-name."""

    def __init__(
        self, host: str, port: int, *, timeout: float, context: ssl.SSLContext, name: str
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._tls = context
        self._name = name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP (and the proxy's tunnel), no TLS yet
        try:
            self.sock = self._tls.wrap_socket(self.sock, server_hostname=self._name)
        except TimeoutError as exc:  # connected, and no handshake: a server up but stalled
            self.close()
            raise AnswerTimeoutError(f"TLS handshake: {exc}") from exc


class Connections:
    """Requests to one Endpoint, each on a connection of its own, kept alive for the next.

    Thread-safe: a connection serves one request at a time and waits, idle, in a stack (the
    most recently used first, as it is the least likely to have been closed by the server).
    """

    def __init__(self, endpoint: Endpoint, *, kept: int, connect_retries: int = 0) -> None:
        self.endpoint = endpoint
        self._kept = kept
        self._connect_retries = connect_retries
        self._idle: list[tuple[http.client.HTTPConnection, float]] = []  # and since when
        self._closed = False
        self._lock = threading.Lock()

    def exchange(self, request: Request) -> Answer:
        """Send `request` and read its whole answer. AnswerTimeoutError when the server took the
        request and did not answer in time; another OSError or http.client.HTTPException when no
        connection could be made (refused, TLS, the proxy) or the exchange broke."""
        deadline = time.monotonic() + request.timeout
        reused = self._take()
        connection = reused or self._connected(deadline)
        try:
            try:
                response = self._send(connection, request, deadline, reused=reused is not None)
            except _StaleConnectionError:
                connection = self._connected(deadline)  # the server had closed it idle
                reused = None
                response = self._send(connection, request, deadline, reused=False)
            return self._read(connection, response)
        except AnswerTimeoutError:
            if reused is not None:
                # The kept connections went to the same server, which may be gone without a
                # word: the next requests connect afresh (a Service sends them to one alive).
                self._drop_idle()
            raise

    def stream(
        self, target: str, *, headers: dict[str, str], connect_timeout: float, idle_timeout: float
    ) -> tuple[int, str, Iterator[bytes], Callable[[], None]]:
        """GET `target` on a connection of its own and leave its answer to be read: the status,
        the reason, its lines (AnswerTimeoutError after `idle_timeout` seconds without one),
        and what closes it."""
        connection = self._connected(time.monotonic() + connect_timeout)
        with _closed_on_failure(connection):
            connection.sock.settimeout(idle_timeout)
            connection.request("GET", self.endpoint.prefix + target, headers=headers)
            response = connection.getresponse()

        def close() -> None:
            response.close()  # holds the socket itself when the server said Connection: close
            connection.close()

        return response.status, response.reason, _lines(response), close

    def clear(self) -> None:
        """Close the idle connections, and from now on each one as its request ends."""
        with self._lock:
            self._closed = True
        self._drop_idle()

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection, _ in idle:
            connection.close()

    def _send(
        self,
        connection: http.client.HTTPConnection,
        request: Request,
        deadline: float,
        *,
        reused: bool,
    ) -> http.client.HTTPResponse:
        """Send `request` and read its answer's status line and headers. _StaleConnectionError
        when a reused connection turns out closed and the request may be sent again."""
        unsent = True
        try:
            with _closed_on_failure(connection):
                connection.sock.settimeout(_left(deadline))
                connection.request(
                    request.method,
                    self.endpoint.prefix + request.target,
                    body=request.body,
                    headers=request.headers,
                )
                unsent = False
                _reading.deadline = deadline
                try:
                    return connection.getresponse()
                finally:
                    _reading.deadline = None
        except _STALE as exc:
            if reused and (unsent or request.method in _IDEMPOTENT):
                raise _StaleConnectionError from exc
            raise

    def _read(
        self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> Answer:
        with _closed_on_failure(connection):
            data = response.read()
        answer = Answer(response.status, response.reason, data, _retry_after(response))
        if response.will_close:
            connection.close()
        else:
            self._give_back(connection)
        return answer

    def _take(self) -> http.client.HTTPConnection | None:
        """An idle connection still open, idle IDLE_KEPT_SECONDS at most, or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                connection, since = self._idle.pop()
            if time.monotonic() - since <= IDLE_KEPT_SECONDS and not _dropped(connection):
                return connection
            connection.close()

    def _give_back(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._kept:
                self._idle.append((connection, time.monotonic()))
                return
        connection.close()

    def _connected(self, deadline: float) -> http.client.HTTPConnection:
        attempts = self._connect_retries + 1
        for attempt in range(attempts):
            connection = self._new_connection(_left(deadline))
            try:
                connection.connect()
            except (OSError, http.client.HTTPException):
                connection.close()
                if attempt + 1 == attempts or time.monotonic() >= deadline:
                    raise  # this error, not a bare "no time left" for the next try
            else:
                return connection
        raise AssertionError("unreachable")  # the loop returns or raises

    def _new_connection(self, timeout: float) -> http.client.HTTPConnection:
        end = self.endpoint
        host, port = (end.proxy[0], end.proxy[1]) if end.proxy else (end.host, end.port)
        connection: http.client.HTTPConnection
        if end.context is not None:
            connection = _TlsConnection(
                host,
                port,
                timeout=timeout,
                context=end.context,
                name=end.server_hostname or end.host,
            )
        else:
            connection = http.client.HTTPConnection(host, port, timeout=timeout)
        connection.response_class = _AnswerByDeadline
        if end.proxy:
            connection.set_tunnel(end.host, end.port, headers=end.proxy[2])
        return connection


class _StaleConnectionError(Exception):
    """The request found its kept-alive connection closed, got no answer, and may be sent
    again."""


@contextlib.contextmanager
def _closed_on_failure(connection: http.client.HTTPConnection) -> Iterator[None]:
    """Close `connection` if the block fails: half an exchange leaves it unusable. A timeout
    once connected is the server's: AnswerTimeoutError."""
    try:
        yield
    except TimeoutError as exc:
        connection.close()
        raise AnswerTimeoutError(str(exc) or "timed out") from exc
    except BaseException:
        connection.close()
        raise


def _left(deadline: float) -> float:
    """The seconds left before `deadline`; AnswerTimeoutError once none are (the server took
    them: connecting always starts with time left)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise AnswerTimeoutError("no time left")
    return left


def _retry_after(response: http.client.HTTPResponse) -> float | None:
    """The seconds a Retry-After header asks for (kube-apiserver sends whole seconds; a date,
    which it never sends, is not read)."""
    value = response.getheader("Retry-After")
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


def _lines(response: http.client.HTTPResponse) -> Iterator[bytes]:
    try:
        while line := response.readline():
            yield line
    except TimeoutError as exc:
        raise AnswerTimeoutError(str(exc) or "timed out") from exc


def _dropped(connection: http.client.HTTPConnection) -> bool:
    """Whether an idle kept-alive connection was closed (or spoke out of turn): readable."""
    sock = connection.sock
    if sock is None:
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))
