"""Kept-alive HTTP/1.1 connections to one server, on the standard library's http.client.

Not urllib3: every ADD waits for one IPPool update, and over loopback to a kube-apiserver an
update through urllib3's PoolManager took some 0.6 ms longer than through http.client on a
kept-alive connection, with 0.55 ms of client CPU against 0.3 (README, "Where the time goes").
Importing it cost the in-process plugin another ~50 ms. What urllib3 gave the store (a pool of
kept-alive connections, a CONNECT proxy, a TLS server name) is the little below.
"""

from __future__ import annotations

import base64
import http.client
import select
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

# Raised when a kept-alive connection turns out closed by the server before it answered: the
# request is sent again once, on a new connection (the server read none of it, or refuses the
# second copy as a conflict, which the store's compare-and-swap already handles).
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class AnswerTimeoutError(TimeoutError):
    """Connected, and no answer in time (not even a TLS handshake): the server is up, and slow
    or stalled."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where requests go: the server (scheme, host, port, path prefix) and how to reach it."""

    scheme: str  # "https" or "http"
    host: str
    port: int
    prefix: str  # a path the server's URL carries (a proxying front end's), or ""
    context: ssl.SSLContext | None  # for https
    server_hostname: str | None = None  # the name its certificate must carry, if not `host`
    proxy: tuple[str, int, dict[str, str]] | None = None  # http proxy: host, port, headers

    @classmethod
    def parse(
        cls,
        server: str,
        *,
        context: ssl.SSLContext | None,
        server_hostname: str | None = None,
        proxy: str | None = None,
    ) -> Endpoint:
        """ValueError for a URL it cannot use (a scheme other than http(s), a proxy other than
        http://)."""
        url = urlsplit(server)
        if url.scheme not in ("https", "http") or not url.hostname:
            raise ValueError(f"server {server!r} is not an http(s):// URL")
        return cls(
            scheme=url.scheme,
            host=url.hostname,
            port=url.port or (443 if url.scheme == "https" else 80),
            prefix=url.path.rstrip("/"),
            context=context if url.scheme == "https" else None,
            server_hostname=server_hostname,
            proxy=_http_proxy(proxy) if proxy else None,
        )


def _http_proxy(proxy: str) -> tuple[str, int, dict[str, str]]:
    url = urlsplit(proxy)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"proxy-url {proxy!r}: only http:// proxies are supported")
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
    timeout: float  # for connecting, and for each read of the answer


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    reason: str
    data: bytes


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
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def exchange(self, request: Request) -> Answer:
        """Send `request` and read its whole answer. AnswerTimeoutError when the server took the
        request and did not answer in time; another OSError or http.client.HTTPException when no
        connection could be made (refused, TLS, the proxy) or the exchange broke."""
        reused = self._take()
        connection = reused or self._connected(request.timeout)
        try:
            return self._exchange_on(connection, request)
        except _STALE:
            if reused is None:
                raise
        # The server had closed the kept-alive connection: once more on a new one.
        return self._exchange_on(self._connected(request.timeout), request)

    def stream(
        self, target: str, *, headers: dict[str, str], connect_timeout: float, idle_timeout: float
    ) -> tuple[int, str, Iterator[bytes], Callable[[], None]]:
        """GET `target` on a connection of its own and leave its answer to be read: the status,
        the reason, its lines (AnswerTimeoutError after `idle_timeout` seconds without one),
        and what closes it."""
        connection = self._connected(connect_timeout)
        try:
            connection.sock.settimeout(idle_timeout)
            connection.request("GET", self.endpoint.prefix + target, headers=headers)
            response = connection.getresponse()
        except BaseException:
            connection.close()
            raise
        return response.status, response.reason, _lines(response), connection.close

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _exchange_on(self, connection: http.client.HTTPConnection, request: Request) -> Answer:
        try:
            connection.sock.settimeout(request.timeout)
            connection.request(
                request.method,
                self.endpoint.prefix + request.target,
                body=request.body,
                headers=request.headers,
            )
            response = connection.getresponse()
            answer = Answer(response.status, response.reason, response.read())
        except TimeoutError as exc:
            connection.close()
            raise AnswerTimeoutError(str(exc) or "timed out") from exc
        except BaseException:
            connection.close()
            raise
        if response.will_close:
            connection.close()
        else:
            self._give_back(connection)
        return answer

    def _take(self) -> http.client.HTTPConnection | None:
        """An idle connection still open, or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                connection = self._idle.pop()
            if not _dropped(connection):
                return connection
            connection.close()

    def _give_back(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self._kept:
                self._idle.append(connection)
                return
        connection.close()

    def _connected(self, timeout: float) -> http.client.HTTPConnection:
        attempts = self._connect_retries + 1
        for attempt in range(attempts):
            connection = self._new_connection(timeout)
            try:
                connection.connect()
            except (OSError, http.client.HTTPException):
                connection.close()
                if attempt + 1 == attempts:
                    raise
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
        if end.proxy:
            connection.set_tunnel(end.host, end.port, headers=end.proxy[2])
        return connection


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
