"""What the IPPool store makes of a failing Kubernetes API: busy (retried until the deadline) or
unreachable (retried for the outage grace), on a stand-in for urllib3's connection pool."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import urllib3

from pyabouts.ipam.errors import StoreBusyError, StoreRefusedError, StoreUnavailableError
from pyabouts.ipam.pool import PoolId
from pyabouts.ipam.stores.kube_api import ApiCredentials, KubeApi
from pyabouts.ipam.stores.kubernetes import KubernetesStore

SERVER = "https://127.0.0.1:6443"
POOL = PoolId("blue", 4)


@dataclass
class Answer:
    status: int
    data: bytes
    reason: str = ""


class StandIn:
    """Answers every request with `outcome`: an Answer, or an exception to raise."""

    def __init__(self, outcome: Answer | Exception) -> None:
        self.outcome = outcome

    def request(self, method: str, url: str, **_: Any) -> Answer:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def clear(self) -> None:
        pass


def store_answering(outcome: Answer | Exception) -> KubernetesStore:
    api = KubeApi(ApiCredentials(server=SERVER, namespace="kube-system", insecure=True), timeout=5)
    api._http = StandIn(outcome)  # type: ignore[assignment]
    return KubernetesStore(api, "kube-system")


def status(code: int, reason: str, message: str = "no") -> Answer:
    body = {"kind": "Status", "status": "Failure", "reason": reason, "message": message}
    return Answer(code, json.dumps(body).encode())


def read_error(outcome: Answer | Exception) -> Exception:
    with pytest.raises(Exception) as raised:
        store_answering(outcome).read_blocks(POOL, 0, 511)
    return raised.value


def test_an_answer_that_does_not_come_in_time_is_busy() -> None:
    timeout = urllib3.exceptions.ReadTimeoutError(None, SERVER, "Read timed out.")  # type: ignore[arg-type]
    error = read_error(timeout)
    assert isinstance(error, StoreBusyError)
    assert (error.code, error.msg) == (
        11,
        f"Kubernetes API at {SERVER} did not answer in time: ReadTimeoutError",
    )


@pytest.mark.parametrize(
    "answer",
    [
        status(429, "TooManyRequests", "too many requests, please try again later"),
        status(504, "Timeout", "request did not complete within 60s"),
        status(500, "ServerTimeout", "the server cannot complete the request in time"),
    ],
)
def test_an_apiserver_that_says_it_is_overloaded_is_busy(answer: Answer) -> None:
    error = read_error(answer)
    assert isinstance(error, StoreBusyError)
    assert error.msg.startswith(f"Kubernetes API at {SERVER} answered {answer.status}: ")


def test_a_refused_connection_is_unreachable_not_busy() -> None:
    refused = urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
    error = read_error(refused)
    assert isinstance(error, StoreUnavailableError)
    assert not isinstance(error, StoreBusyError)
    assert "is unreachable: NewConnectionError" in error.msg


def test_a_server_error_that_is_not_overload_is_unavailable_not_busy() -> None:
    error = read_error(status(503, "ServiceUnavailable", "etcd is down"))
    assert isinstance(error, StoreUnavailableError)
    assert not isinstance(error, StoreBusyError)


def test_a_refusal_is_neither() -> None:
    error = read_error(status(403, "Forbidden", "ippools is forbidden"))
    assert isinstance(error, StoreRefusedError)
