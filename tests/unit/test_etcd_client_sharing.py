"""One EtcdStore serves the agent's threads (batches of several pools, the write-behind flusher):
a call that fails must not break the calls other threads have on the same client."""

import socket
import threading
from typing import Any

import grpc
import pytest

from pyabouts.ipam.errors import StoreBusyError, StoreUnavailableError
from pyabouts.ipam.stores.etcd import EtcdStore, _Dialled
from pyabouts.ipam.stores.etcd_settings import EtcdSettings


class Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset"


class SharedClient:
    """What etcd3's client does once closed: refuse every call (grpc's closed channel)."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def call(self) -> str:
        if self.closed:
            raise ValueError("Cannot invoke RPC on closed channel!")
        return "answered"


def test_a_call_that_fails_leaves_the_calls_other_threads_have_on_the_client() -> None:
    store = EtcdStore(EtcdSettings(endpoints=(("127.0.0.1", 1),), timeout=1))
    shared = SharedClient()
    store._client = shared  # as connected by an earlier call
    started, failed = threading.Event(), threading.Event()
    answers: list[Any] = []

    def slow(client: SharedClient) -> str:
        started.set()
        failed.wait(5)  # another thread's call fails meanwhile
        return client.call()

    def failing(client: SharedClient) -> str:
        raise Unavailable()

    waiting = threading.Thread(target=lambda: answers.append(store._call(slow)))
    waiting.start()
    started.wait(5)
    with pytest.raises(StoreUnavailableError):
        store._call(failing)  # one endpoint: no other to try
    failed.set()
    waiting.join(5)
    assert answers == ["answered"]
    assert store._client is not shared  # the next call starts afresh


def test_a_call_on_a_client_another_thread_found_failing_is_an_outage_not_a_bug() -> None:
    """etcd3 marks the endpoint of a call that failed UNAVAILABLE and drops the client's stubs;
    a thread that took the client before the store dropped it makes a stub afresh on the failed
    endpoint. That must be the store's outage (retried), not a ValueError (code 103)."""
    store = EtcdStore(EtcdSettings(endpoints=(("127.0.0.1", 1),), timeout=1))
    try:
        client = store._connected()  # grpc connects lazily: nothing is dialled yet
        client.endpoint_in_use.fail()
        client._clear_old_stubs()
        with pytest.raises(StoreUnavailableError, match="NoServerAvailableError"):
            store._call(lambda taken: taken.kvstub)
    finally:
        store.close()


class TimedOut(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "Deadline Exceeded"


def times_out(client: SharedClient) -> str:
    raise TimedOut()


def test_a_first_call_that_timed_out_is_busy_only_where_etcd_takes_a_connection() -> None:
    """grpc times out a channel still connecting too: an etcd cut off (packets dropped) would be
    retried as busy for the whole deadline, and the agent would stay ready."""
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen(8)  # a silent etcd: the kernel takes connections, nothing answers
        closed.bind(("127.0.0.1", 0))  # held, never listening: connections are refused
        silent, cut_off = listening.getsockname(), closed.getsockname()

        store = EtcdStore(EtcdSettings(endpoints=(silent,), timeout=1))
        store._client = SharedClient()  # dialled, never answered
        with pytest.raises(StoreBusyError):
            store._call(times_out)

        store = EtcdStore(EtcdSettings(endpoints=(cut_off,), timeout=1))
        store._client = SharedClient()
        with pytest.raises(StoreUnavailableError) as unreachable:
            store._call(times_out)
        assert not isinstance(unreachable.value, StoreBusyError)
        message = unreachable.value.msg
        assert message.startswith(f"etcd at 127.0.0.1:{cut_off[1]} is unreachable: the call ")

        # The endpoint looked at is the failed client's, though another was dialled since.
        client = SharedClient()
        store._client, store._dialled[client], store._endpoint = (
            client,
            _Dialled(cut_off, False),
            silent,
        )
        with pytest.raises(StoreUnavailableError) as unreachable:
            store._call(times_out)
        assert not isinstance(unreachable.value, StoreBusyError)

        # A client that was answered before and times out now: busy, without a look at the port.
        store._client = SharedClient()
        assert store._call(lambda client: client.call()) == "answered"
        with pytest.raises(StoreBusyError):
            store._call(times_out)

    # A name is not looked up for the check (its lookup could outlast it): busy, as before.
    named = EtcdStore(EtcdSettings(endpoints=(("etcd.invalid", 2379),), timeout=1))
    named._client = SharedClient()
    with pytest.raises(StoreBusyError):
        named._call(times_out)
