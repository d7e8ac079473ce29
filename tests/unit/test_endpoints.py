"""serving.endpoints: --listen forms, and an HTTP server that idle, slow or numerous clients
cannot take from a scraper. Servers listen on loopback ports the kernel picks."""

import argparse
import errno
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from pyabouts.serving import endpoints
from pyabouts.serving.endpoints import EndpointServer, serve_endpoints
from pyabouts.serving.listen import listen_argument, parse_listen

WAIT = 15.0  # seconds any test waits for an answer or a closed connection at most


class Healthy:
    def alive(self) -> bool:
        return True

    def ready(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("[::]:9646", ("::", 9646)),
        ("0.0.0.0:9646", ("0.0.0.0", 9646)),
        (":9646", ("", 9646)),
        ("127.0.0.1:9646", ("127.0.0.1", 9646)),
        ("[::1]:8080", ("::1", 8080)),
        ("[fd00:0::1]:1", ("fd00::1", 1)),
        ("localhost:0", ("localhost", 0)),
        ("fd00::1:9646", ("fd00::1", 9646)),  # a DaemonSet's $(HOST_IP):9646 on IPv6
        ("2001:DB8::A:80", ("2001:db8::a", 80)),
    ],
)
def test_listen_forms(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected
    assert listen_argument(listen) == listen


@pytest.mark.parametrize(
    "listen",
    ["9646", "::9646", "[::1]", "host:", "1.2.3.4:65536", "[nope]:80", ":-1", ":\uff19", "a:b:80"],
)
def test_listen_forms_refused(listen: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(listen)
    with pytest.raises(argparse.ArgumentTypeError):
        listen_argument(listen)


@pytest.fixture
def serving(request: pytest.FixtureRequest) -> Iterator[EndpointServer]:
    listen = getattr(request, "param", "127.0.0.1:0")
    server = serve_endpoints(listen, CollectorRegistry(), Healthy())
    yield server
    server.shutdown()
    server.server_close()


def get(port: int, path: str = "/healthz", host: str = "127.0.0.1") -> str:
    url = f"http://{host}:{port}{path}"
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        return str(response.read().decode())


def eventually_ok(port: int) -> bool:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            return get(port) == "ok"
        except urllib.error.HTTPError:
            time.sleep(0.1)
    return False


def port_of(server: EndpointServer) -> int:
    return int(server.server_address[1])


@pytest.mark.parametrize(
    ("serving", "hosts"),
    [
        ("[::1]:0", ["[::1]"]),
        ("[::]:0", ["[::1]", "127.0.0.1"]),
        (":0", ["[::1]", "127.0.0.1"]),
        ("0.0.0.0:0", ["127.0.0.1"]),
    ],
    indirect=["serving"],
)
def test_serves_ipv6_and_every_address(serving: EndpointServer, hosts: list[str]) -> None:
    for host in hosts:
        assert get(port_of(serving), "/healthz", host) == "ok"
        assert get(port_of(serving), "/readyz", host) == "ok"


def test_every_address_is_every_ipv4_address_on_a_node_without_ipv6(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kernel booted with ipv6.disable=1 has no AF_INET6 socket: ":port" still serves."""
    real_socket = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", no_ipv6)
    server = serve_endpoints(":0", CollectorRegistry(), Healthy())
    try:
        assert server.address_family == socket.AF_INET
        assert get(port_of(server), "/healthz", "127.0.0.1") == "ok"
    finally:
        server.shutdown()
        server.server_close()


def closed_within(conn: socket.socket, seconds: float) -> bool:
    """Whether the server closes `conn` within `seconds` (reading and discarding any answer)."""
    conn.settimeout(seconds)
    try:
        while conn.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_idle_connections_neither_block_a_scraper_nor_stay_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(endpoints, "IDLE_TIMEOUT_SECONDS", 1.0)
    server = serve_endpoints("127.0.0.1:0", CollectorRegistry(), Healthy())
    idle = [socket.create_connection(("127.0.0.1", port_of(server))) for _ in range(300)]
    try:
        assert get(port_of(server)) == "ok"  # with 300 connections open, sending nothing
        assert get(port_of(server), "/metrics") == ""  # an empty registry
        assert all(closed_within(conn, WAIT) for conn in idle)
    finally:
        for conn in idle:
            conn.close()
        server.shutdown()
        server.server_close()


def test_beyond_the_idle_limit_the_oldest_idle_connection_makes_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(endpoints, "MAX_IDLE_CONNECTIONS", 4)
    server = serve_endpoints("127.0.0.1:0", CollectorRegistry(), Healthy())
    idle = []
    try:
        for _ in range(5):
            idle.append(socket.create_connection(("127.0.0.1", port_of(server))))
            time.sleep(0.05)  # accepted in this order
        assert closed_within(idle[0], WAIT)
        assert get(port_of(server)) == "ok"
    finally:
        for conn in idle:
            conn.close()
        server.shutdown()
        server.server_close()


def test_a_request_trickled_a_byte_at_a_time_is_cut_off_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(endpoints, "REQUEST_DEADLINE_SECONDS", 1.0)
    server = serve_endpoints("127.0.0.1:0", CollectorRegistry(), Healthy())
    try:
        with socket.create_connection(("127.0.0.1", port_of(server))) as slow:
            started = time.monotonic()
            slow.sendall(b"GET /healthz HTTP/1.0\r\n")
            closed = False
            while not closed and time.monotonic() - started < WAIT:
                try:
                    slow.sendall(b"X")
                except OSError:
                    closed = True
                    break
                closed = closed_within(slow, 0.3)
            assert closed
        assert get(port_of(server)) == "ok"
    finally:
        server.shutdown()
        server.server_close()


def test_when_every_handler_is_busy_a_new_request_gets_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(endpoints, "MAX_HANDLERS", 2)
    monkeypatch.setattr(endpoints, "MAX_WAITING_REQUESTS", 0)
    monkeypatch.setattr(endpoints, "REQUEST_DEADLINE_SECONDS", 3.0)
    server = serve_endpoints("127.0.0.1:0", CollectorRegistry(), Healthy())
    address = ("127.0.0.1", port_of(server))
    holders = [socket.create_connection(address) for _ in range(2)]
    try:
        for holder in holders:  # begun, never finished: each holds a handler until its deadline
            holder.sendall(b"GET /healthz HTTP/1.0\r\n")
        answers: list[bytes] = []
        deadline = time.monotonic() + WAIT
        while b" 503 " not in b"".join(answers) and time.monotonic() < deadline:
            with socket.create_connection(address) as probe:
                probe.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                probe.settimeout(WAIT)
                answers.append(probe.recv(65536))
        assert answers[-1].startswith(b"HTTP/1.0 503 ")
        for holder in holders:
            holder.close()
        assert eventually_ok(port_of(server))  # handlers free again (deadline at the latest)
    finally:
        for holder in holders:
            holder.close()
        server.shutdown()
        server.server_close()
