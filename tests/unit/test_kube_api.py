"""What the IPPool store makes of a failing Kubernetes API, over real sockets on loopback: busy
(retried until the deadline) or unreachable (retried for the outage grace); and what the HTTP
client under it keeps: connections alive between requests, a path prefix, a CONNECT proxy."""

from __future__ import annotations

import contextlib
import http.client
import json
import ssl
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from pyabouts.ipam.errors import (
    INVALID_CONFIG,
    CniError,
    StoreBusyError,
    StoreRefusedError,
    StoreUnavailableError,
)
from pyabouts.ipam.pool import PoolId
from pyabouts.ipam.stores import http_connections
from pyabouts.ipam.stores.kube_api import USER_AGENT, ApiCredentials, KubeApi
from pyabouts.ipam.stores.kubernetes import KubernetesStore
from tests.local_http import (
    ProxyLog,
    Scripted,
    closed_port,
    connect_proxy,
    scripted_server,
    silent_server,
    streaming_server,
)

POOL = PoolId("blue", 4)
LIST = {"kind": "IPPoolList", "metadata": {"resourceVersion": "7"}, "items": []}


def api_at(server: str, *, timeout: float = 5.0, proxy: str | None = None) -> KubeApi:
    credentials = ApiCredentials(server=server, namespace="kube-system", proxy=proxy)
    return KubeApi(credentials, timeout=timeout)


def status(code: int, reason: str, message: str = "no") -> Scripted:
    body = {"kind": "Status", "status": "Failure", "reason": reason, "message": message}
    return Scripted(status=code, body=body)


@contextlib.contextmanager
def store_answering(script: Scripted) -> Iterator[tuple[KubernetesStore, str]]:
    with scripted_server(script) as server:
        yield KubernetesStore(api_at(server), "kube-system"), server


def read_error(script: Scripted) -> tuple[Exception, str]:
    with store_answering(script) as (store, server), pytest.raises(Exception) as raised:
        store.read_blocks(POOL, 0, 511)
    return raised.value, server


@pytest.mark.parametrize("scheme", ["http", "https"])  # https: not even a TLS handshake
def test_an_answer_that_does_not_come_in_time_is_busy(scheme: str) -> None:
    with silent_server() as plain:
        server = plain.replace("http:", f"{scheme}:")
        store = KubernetesStore(api_at(server, timeout=1.0), "kube-system")
        with pytest.raises(StoreBusyError) as raised:
            store.read_blocks(POOL, 0, 511)
    assert (raised.value.code, raised.value.msg) == (
        11,
        f"Kubernetes API at {server} did not answer in time: AnswerTimeoutError",
    )


@pytest.mark.parametrize(
    "answer",
    [
        status(429, "TooManyRequests", "too many requests, please try again later"),
        status(504, "Timeout", "request did not complete within 60s"),
        status(500, "ServerTimeout", "the server cannot complete the request in time"),
    ],
)
def test_an_apiserver_that_says_it_is_overloaded_is_busy(answer: Scripted) -> None:
    error, server = read_error(answer)
    assert isinstance(error, StoreBusyError)
    assert error.msg.startswith(f"Kubernetes API at {server} answered {answer.status}: ")


def test_a_plain_text_overload_refusal_is_busy_for_as_long_as_it_asks() -> None:
    """kube-apiserver's max-in-flight and priority-and-fairness refusals, and its answers while
    shutting down, are text (Go's http.Error), not Status objects, with a Retry-After."""
    text = "Too many requests, please try again later.\n"
    error, server = read_error(Scripted(status=429, text=text, headers={"Retry-After": "5"}))
    assert isinstance(error, StoreBusyError)
    assert error.msg == f"Kubernetes API at {server} answered 429: {text.strip()}"
    assert error.retry_after == 5.0


def test_a_proxy_s_plain_text_error_is_not_taken_for_nonsense() -> None:
    error, server = read_error(Scripted(status=403, text="<html>denied by policy</html>"))
    assert isinstance(error, StoreRefusedError)
    assert error.msg == f"Kubernetes API at {server}: Forbidden: <html>denied by policy</html>"


def test_an_answer_sent_a_byte_at_a_time_ends_at_the_deadline() -> None:
    """Each byte comes well within the timeout, the whole answer well past it: the call ends
    at its deadline, not when the server stops sending."""
    script = Scripted(body={"kind": "IPPoolList", "items": []}, byte_every=0.25)
    assert len(json.dumps(script.body)) * script.byte_every > 8  # seconds to send it all
    with scripted_server(script) as server:
        store = KubernetesStore(api_at(server, timeout=1.0), "kube-system")
        started = time.monotonic()
        with pytest.raises(StoreBusyError) as raised:
            store.read_blocks(POOL, 0, 511)
        took = time.monotonic() - started
    assert "did not answer in time" in raised.value.msg
    assert took < 4.0  # the deadline (1 s) and a read's slack, far from the 8 s of sending


def test_an_answer_that_closes_its_connection_is_read_whole() -> None:
    """ "Connection: close": http.client lets go of the socket before the body is read, which
    the answer's own reader keeps open (a LIST big enough to take many reads)."""
    body = {**LIST, "padding": "x" * 300_000}
    with scripted_server(Scripted(body=body, headers={"Connection": "close"})) as server:
        api = api_at(server)
        for _ in range(2):  # and on a new connection after it
            assert api.request("GET", "/apis")["padding"] == body["padding"]


def test_a_refused_connection_is_unreachable_not_busy() -> None:
    store = KubernetesStore(api_at(f"http://127.0.0.1:{closed_port()}"), "kube-system")
    with pytest.raises(StoreUnavailableError) as raised:
        store.read_blocks(POOL, 0, 511)
    assert not isinstance(raised.value, StoreBusyError)
    assert "is unreachable: ConnectionRefusedError" in raised.value.msg


def test_a_server_error_that_is_not_overload_is_unavailable_not_busy() -> None:
    error, _ = read_error(status(503, "ServiceUnavailable", "etcd is down"))
    assert isinstance(error, StoreUnavailableError)
    assert not isinstance(error, StoreBusyError)


def test_an_expired_list_is_read_again_not_a_refusal() -> None:
    # A continue token older than etcd's compaction: the list is taken again (code 11).
    error, _ = read_error(status(410, "Expired", "The provided continue parameter is too old"))
    assert isinstance(error, StoreUnavailableError) and not isinstance(error, StoreBusyError)


def test_a_refusal_is_neither() -> None:
    error, _ = read_error(status(403, "Forbidden", "ippools is forbidden"))
    assert isinstance(error, StoreRefusedError)


def test_one_connection_serves_request_after_request() -> None:
    script = Scripted(body=LIST)
    with scripted_server(script) as server:
        api = api_at(server)
        for _ in range(3):
            assert api.request("GET", "/apis/x") == LIST
    assert len({port for _, _, port in script.seen}) == 1
    assert script.user_agents == [USER_AGENT] * 3  # the manager in an IPPool's managedFields


def counting_sends(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The method of each request the client sends (or tries to), counted as it sends."""
    sent: list[str] = []
    send = http_connections.Connections._send

    def counted(self: Any, connection: Any, request: Any, deadline: float, **kw: Any) -> Any:
        sent.append(request.method)
        return send(self, connection, request, deadline, **kw)

    monkeypatch.setattr(http_connections.Connections, "_send", counted)
    return sent


def closed_by_now(script: Scripted) -> None:
    """Once the server has closed the connection, and its FIN has had time to come."""
    assert script.closed.wait(5)
    time.sleep(0.05)


@pytest.mark.parametrize("seen_before_sending", [True, False])
def test_a_connection_the_server_closed_while_idle_is_replaced(
    monkeypatch: pytest.MonkeyPatch, seen_before_sending: bool
) -> None:
    """Seen closed when taken from the pool, and not used; or, closed just after that look,
    found closed only by the request, which is then sent once more on a new connection."""
    if not seen_before_sending:
        monkeypatch.setattr(http_connections, "_dropped", lambda _: False)
    sent = counting_sends(monkeypatch)
    script = Scripted(body=LIST, close_after_answer=True)
    with scripted_server(script) as server:
        api = api_at(server)
        assert api.request("GET", "/apis/x") == LIST
        closed_by_now(script)
        assert api.request("PUT", "/apis/y", body={"a": 1}) == LIST
    assert [(method, path) for method, path, _ in script.seen] == [
        ("GET", "/apis/x"),
        ("PUT", "/apis/y"),
    ]
    assert len({port for _, _, port in script.seen}) == 2
    assert sent == (["GET", "PUT"] if seen_before_sending else ["GET", "PUT", "PUT"])


def test_a_create_the_closed_connection_may_have_delivered_is_not_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A POST is not idempotent: sent whole, it is not sent again for want of an answer (the
    store's transaction tries again, and a create that did land then conflicts)."""
    monkeypatch.setattr(http_connections, "_dropped", lambda _: False)
    sent = counting_sends(monkeypatch)
    script = Scripted(body=LIST, close_after_answer=True)
    with scripted_server(script) as server:
        api = api_at(server)
        api.request("GET", "/apis/x")
        closed_by_now(script)
        with pytest.raises(StoreUnavailableError, match="unreachable: RemoteDisconnected"):
            api.request("POST", "/apis/y")  # no body: all of it goes in one send
    assert sent == ["GET", "POST"]
    assert [method for method, _, _ in script.seen] == ["GET"]


def test_a_create_that_broke_while_being_sent_is_sent_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server had closed the connection and read none of it: safe to send again."""
    monkeypatch.setattr(http_connections, "_dropped", lambda _: False)
    sent = counting_sends(monkeypatch)
    script = Scripted(body=LIST, close_after_answer=True)
    request = http.client.HTTPConnection.request
    broken: list[bool] = []

    def breaking(self: http.client.HTTPConnection, method: str, *args: Any, **kw: Any) -> None:
        if method == "POST" and not broken:
            broken.append(True)
            raise BrokenPipeError(32, "Broken pipe")
        request(self, method, *args, **kw)

    monkeypatch.setattr(http.client.HTTPConnection, "request", breaking)
    with scripted_server(script) as server:
        api = api_at(server)
        api.request("GET", "/apis/x")
        closed_by_now(script)
        assert api.request("POST", "/apis/y", body={"a": 1}) == LIST
    assert sent == ["GET", "POST", "POST"]
    assert [method for method, _, _ in script.seen] == ["GET", "POST"]


def test_a_request_it_cannot_write_does_not_quote_its_headers() -> None:
    script = Scripted(body=LIST)
    with scripted_server(script) as server, pytest.raises(StoreUnavailableError) as raised:
        credentials = ApiCredentials(
            server=server, namespace="kube-system", authorization=lambda: "Bearer s\n"
        )
        KubeApi(credentials, timeout=1).request("GET", "/apis/x")
    assert not script.seen
    assert "Bearer" not in raised.value.msg
    assert raised.value.msg.endswith("is unreachable: ValueError")


def test_credentials_that_cannot_be_read_now_are_unavailable_not_a_bug() -> None:
    """A token file being replaced, or an exec plugin that failed: code 11, and the transaction
    tries again, rather than an internal error (code 103) out of the plugin."""

    def unreadable() -> str:
        raise FileNotFoundError(2, "No such file or directory", "/var/run/token")

    script = Scripted(body=LIST)
    with scripted_server(script) as server, pytest.raises(StoreUnavailableError) as raised:
        credentials = ApiCredentials(
            server=server, namespace="kube-system", authorization=unreadable
        )
        KubernetesStore(KubeApi(credentials, timeout=1), "kube-system").read_blocks(POOL, 0, 511)
    assert not script.seen
    assert "could not be read" in raised.value.msg and "/var/run/token" in raised.value.msg


def test_a_closed_client_keeps_no_connection() -> None:
    script = Scripted(body=LIST)
    with scripted_server(script) as server:
        api = api_at(server)
        api.request("GET", "/apis/x")
        api.close()
        api.request("GET", "/apis/x")
        api.request("GET", "/apis/x")
    assert len({port for _, _, port in script.seen}) == 3


def test_a_watch_yields_each_event_as_it_comes_and_breaks_when_it_falls_silent() -> None:
    events = [{"type": "ADDED", "object": {"n": i}} for i in range(3)]
    with streaming_server([json.dumps(e).encode() + b"\n" for e in events]) as server:
        watch = api_at(server).watch("/apis/x", {}, accept="application/json", idle_timeout=2)
        assert [next(watch) for _ in events] == events
        with pytest.raises(StoreUnavailableError, match="broke: AnswerTimeoutError"):
            next(watch)


def test_a_server_url_with_a_path_prefixes_every_request() -> None:
    script = Scripted(body=LIST)
    with scripted_server(script) as server:
        api_at(server + "/k8s/clusters/c-1/").request("GET", "/apis/x", query={"limit": 5})
    assert [path for _, path, _ in script.seen] == ["/k8s/clusters/c-1/apis/x?limit=5"]


def test_requests_go_through_the_proxy_with_its_credentials() -> None:
    script, log = Scripted(body=LIST), ProxyLog()
    only_u = connect_proxy(log, lambda given: given == "u:p w")
    with scripted_server(script) as server, only_u as proxy:
        proxied = proxy.replace("http://", "http://u:p%20w@")
        assert api_at(server, proxy=proxied).request("GET", "/apis/x") == LIST
    assert log.tunnels == [(server.removeprefix("http://"), "u:p w")]
    assert len(script.seen) == 1


def test_a_proxy_that_refuses_the_tunnel_leaves_the_api_unreachable() -> None:
    refusing = connect_proxy(ProxyLog(), lambda _: False)
    with scripted_server(Scripted()) as server, refusing as proxy:
        store = KubernetesStore(api_at(server, proxy=proxy), "kube-system")
        with pytest.raises(StoreUnavailableError, match="Tunnel connection failed: 407"):
            store.read_blocks(POOL, 0, 511)


@pytest.mark.parametrize(
    ("server", "proxy"),
    [
        ("ftp://api:6443", None),
        ("https://api:6443", "socks5://proxy:1080"),
        ("https://api:6443", "https://user:secret@proxy:3128"),
    ],
)
def test_a_url_it_cannot_use_is_a_configuration_error(server: str, proxy: str | None) -> None:
    with pytest.raises(CniError) as raised:
        api_at(server, proxy=proxy)
    assert raised.value.code == INVALID_CONFIG
    assert "secret" not in raised.value.msg  # it is logged


def test_an_ipv6_server_behind_a_proxy_is_refused_where_python_cannot_tunnel_to_it() -> None:
    """Python 3.11's http.client writes CONNECT fd00::1:6443, which proxies misread."""
    server, proxy = "https://[fd00::1]:6443", "http://proxy:3128"
    if sys.version_info < (3, 12):
        with pytest.raises(CniError, match=r"IPv6 server behind a proxy needs Python 3\.12"):
            api_at(server, proxy=proxy)
    else:
        assert api_at(server, proxy=proxy).server == server


def test_the_scheme_is_read_whatever_its_case() -> None:
    """HTTPS:// is https://: TLS, never the token in clear text."""
    api = api_at("HTTPS://api:6443")
    assert isinstance(api._http.endpoint.context, ssl.SSLContext)


NOT_A_CERTIFICATE = "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    "credentials",
    [
        ApiCredentials("https://api:6443", "kube-system", ca_pem=NOT_A_CERTIFICATE),
        ApiCredentials("https://api:6443", "kube-system", client_cert_pem="C", client_key_pem="K"),
        ApiCredentials("https://api:6443", "kube-system", ca_pem="Zertifikat \u00fcber"),
    ],
)
def test_tls_material_it_cannot_use_is_a_configuration_error(credentials: ApiCredentials) -> None:
    """A kubeconfig whose CA is not a certificate, or whose client key is not its
    certificate's: code 7, not 103 ("a bug", SSLError)."""
    with pytest.raises(CniError) as raised:
        KubeApi(credentials, timeout=1)
    assert raised.value.code == INVALID_CONFIG
    assert "kubeconfig's certificate-authority or client certificate" in raised.value.msg


def test_kept_connections_to_a_server_gone_without_a_word_cost_one_timeout_not_one_each() -> None:
    """The apiserver's host powers off behind a Service: the kept connections answer nothing
    (no FIN, no RST). The first request on one times out; the others kept are dropped with
    it, and the next request connects afresh (to a server alive), instead of trying each."""
    script = Scripted(body=LIST, together=4)
    with scripted_server(script) as server:
        api = api_at(server, timeout=1.0)
        connections = api._http
        with ThreadPoolExecutor(4) as burst:  # four requests at once: four kept connections
            list(burst.map(lambda _: api.request("GET", "/apis/x"), range(4)))
        assert len(connections._idle) == 4
        script.gone_for = {port for _, _, port in script.seen}
        with pytest.raises(StoreBusyError):  # it did not answer in time
            api.request("GET", "/apis/x")
        started = time.monotonic()
        assert api.request("GET", "/apis/x") == LIST
        assert time.monotonic() - started < 0.5
        assert script.seen[-1][2] not in script.gone_for


def test_a_connection_idle_too_long_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_connections, "IDLE_KEPT_SECONDS", 0.2)
    script = Scripted(body=LIST)
    with scripted_server(script) as server:
        api = api_at(server, timeout=1.0)
        assert api.request("GET", "/apis/x") == LIST
        time.sleep(0.3)
        script.gone_for = {port for _, _, port in script.seen}  # it would answer nothing
        assert api.request("GET", "/apis/x") == LIST
    assert len({port for _, _, port in script.seen}) == 2
