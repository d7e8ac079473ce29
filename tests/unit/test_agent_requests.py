"""How the agent reads a request off its socket: a whole-request deadline, a size limit, the
peer's uid, and metric labels clients cannot mint. (tests/integration/
test_agent_hostile_clients.py runs the same against a real agent.)"""

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from pyabouts.ipam.errors import DECODE_FAILURE, TRY_AGAIN_LATER
from pyabouts.plugin.agent.server import (
    MAX_REQUEST_BYTES,
    PLUGIN_WAIT_MARGIN_SECONDS,
    ByteBudget,
    RequestError,
    RequestTooLargeError,
    RequestTooSlowError,
    command_label,
    peer_uid,
    plugin_bound_deadline,
    read_request,
)
from pyabouts.plugin.wire import DEADLINE_KEY


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with server, client:
        yield server, client


def in_background(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_a_whole_request_is_read_until_the_client_closes_its_write_end(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.sendall(b"pyabouts/1\nCNI_COMMAND=ADD\0\0{}")
    client.shutdown(socket.SHUT_WR)
    assert read_request(server, 5.0) == b"pyabouts/1\nCNI_COMMAND=ADD\0\0{}"


def test_a_request_trickled_in_is_cut_off_at_the_deadline_not_per_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.2):  # a byte well within any per-read timeout
            client.send(b"x")

    in_background(trickle)
    started = time.monotonic()
    with pytest.raises(RequestTooSlowError) as refused:
        read_request(server, 1.0)
    stop.set()
    assert time.monotonic() - started < 30  # bounded, and long before the bytes would end
    assert refused.value.code == TRY_AGAIN_LATER and refused.value.reason == "deadline"


def test_a_silent_client_is_cut_off_at_the_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, _ = pair
    with pytest.raises(RequestTooSlowError):
        read_request(server, 0.3)


def test_a_request_over_the_limit_is_refused_before_it_ends(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair

    def flood() -> None:
        chunk = b"x" * 65536
        try:
            for _ in range(MAX_REQUEST_BYTES // len(chunk) * 3):
                client.sendall(chunk)
        except OSError:
            pass  # the reader stopped reading and closed

    in_background(flood)
    with pytest.raises(RequestTooLargeError) as refused:
        read_request(server, 30.0)
    server.shutdown(socket.SHUT_RDWR)
    assert refused.value.code == DECODE_FAILURE and refused.value.reason == "too-large"


def test_the_peer_uid_is_the_connecting_process_uid(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, _ = pair
    assert peer_uid(server) == os.getuid()


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"])
def test_cni_commands_are_their_own_labels(command: str) -> None:
    assert command_label(command) == command


@pytest.mark.parametrize("command", ["", "add", "EVIL", "ADD ", "x" * 1000, "ADD\0"])
def test_anything_else_is_one_label(command: str) -> None:
    assert command_label(command) == "unknown"


@pytest.mark.parametrize("value", ["soon", "12.5", "9" * 400], ids=["word", "fraction", "huge"])
def test_a_plugin_deadline_that_is_not_unix_milliseconds_is_refused_as_malformed(
    value: str,
) -> None:
    env = {DEADLINE_KEY: value, "CNI_COMMAND": "ADD"}
    with pytest.raises(RequestError, match="is not Unix milliseconds") as refused:
        plugin_bound_deadline(env, time.monotonic() + 60)
    assert refused.value.code == DECODE_FAILURE
    assert DEADLINE_KEY not in env  # taken out either way: never handed to the handler


def test_a_plugin_deadline_ends_the_agents_earlier_less_the_margin() -> None:
    now = time.monotonic()
    gives_up = int((time.time() + 30) * 1000)
    bound = plugin_bound_deadline({DEADLINE_KEY: str(gives_up)}, now + 60)
    assert (
        now + 30 - PLUGIN_WAIT_MARGIN_SECONDS - 1
        < bound
        < now + 30 - PLUGIN_WAIT_MARGIN_SECONDS + 1
    )
    assert plugin_bound_deadline({}, now + 60) == now + 60  # a plugin that does not say


def test_requests_hold_at_most_the_budget_between_them_and_wait_their_turn() -> None:
    budget = ByteBudget(100)
    order: list[str] = []

    def big_second() -> None:
        with budget.held(60, time.monotonic() + 10):
            order.append("second")

    with budget.held(60, time.monotonic() + 10):
        waiting = in_background(big_second)
        with budget.held(40, time.monotonic() + 10):  # fits beside the first
            order.append("small")
        time.sleep(0.2)
        assert order == ["small"]  # the second 60 waits for the first
        order.append("first")
    waiting.join(10)
    assert order == ["small", "first", "second"]


def test_a_request_the_budget_never_frees_room_for_is_told_to_try_again() -> None:
    budget = ByteBudget(100)
    with budget.held(100, time.monotonic() + 10):
        started = time.monotonic()
        with pytest.raises(RequestTooSlowError) as refused, budget.held(1, started + 0.3):
            pass
        assert time.monotonic() - started < 5
    assert refused.value.code == TRY_AGAIN_LATER
    with budget.held(500, time.monotonic() + 1):  # more than the whole: the whole, alone
        pass
