"""One EtcdStore serves the agent's threads (batches of several pools, the write-behind flusher):
a call that fails must not break the calls other threads have on the same client."""

import threading
from typing import Any

import grpc
import pytest

from pyabouts.ipam.errors import StoreUnavailableError
from pyabouts.ipam.stores.etcd import EtcdStore
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
