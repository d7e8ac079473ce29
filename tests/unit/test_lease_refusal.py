"""A reconciler replica the API refuses its Lease (401/403, on reading, creating or updating it)
says so in its log and is not ready: the leader election alone would stand it by as ready for
ever, never acting."""

from __future__ import annotations

import datetime
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client import V1Lease, V1LeaseSpec
from kubernetes.client.exceptions import ApiException
from kubernetes.leaderelection.leaderelectionrecord import LeaderElectionRecord

from pyabouts.controller.controller import CheckedLeaseLock, _stand_by, stop_when_lease_lapses
from pyabouts.serving.endpoints import Health
from tests.local_http import silent_server

REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}


class LeaseApi:
    """The Lease API calls LeaseLock makes, each answering with an ApiException of the status
    set for it (`statuses`, by call), or with nothing (a success) when none is set."""

    def __init__(self, **statuses: int) -> None:
        self.statuses = statuses

    def _answer(self, call: str) -> Any:
        status = self.statuses.get(call)
        if status is not None:
            raise ApiException(status=status, reason=REASONS.get(status, ""))
        return SimpleNamespace(metadata=SimpleNamespace(annotations={}), spec=None)

    def read_namespaced_lease(self, name: str, namespace: str, **options: Any) -> Any:
        return self._answer("read")

    def create_namespaced_lease(self, namespace: str, body: Any, **options: Any) -> Any:
        return self._answer("create")

    def replace_namespaced_lease(self, name: str, namespace: str, body: Any, **options: Any) -> Any:
        return self._answer("replace")


def record() -> LeaderElectionRecord:
    now = str(datetime.datetime.now())  # as the election writes it
    return LeaderElectionRecord("replica-0", "15", now, now)  # type: ignore[no-untyped-call]


def test_a_refused_lease_is_logged_once_and_known_until_it_is_granted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = LeaseApi(read=403)
    lock: Any = CheckedLeaseLock("other-lease", "kube-system", "replica-0", api, timeout=5)
    assert not lock.consulted.is_set()
    found, _ = lock.get("other-lease", "kube-system")
    lock.get("other-lease", "kube-system")
    assert not found and lock.refused == "403 Forbidden" and lock.consulted.is_set()
    errors = [r for r in caplog.records if "refuses this replica the Lease" in r.getMessage()]
    assert len(errors) == 1 and "kube-system/other-lease" in errors[0].getMessage()
    api.statuses = {"read": 404}  # granted: the Lease is merely not there yet
    lock.get("other-lease", "kube-system")
    assert lock.refused is None


@pytest.mark.parametrize("call", ["create", "replace"])
def test_a_lease_it_may_read_but_not_write_is_refused_too(call: str) -> None:
    """A Role granting get alone: the Lease is read, and its creation or update is refused,
    which LeaseLock swallows."""
    api = LeaseApi(**{call: 403})
    lock: Any = CheckedLeaseLock("other-lease", "kube-system", "replica-0", api, timeout=5)
    if call == "create":
        written = lock.create("other-lease", "kube-system", record())
    else:
        lock.lease_reference = V1Lease(spec=V1LeaseSpec())  # as a read of it left it
        written = lock.update("other-lease", "kube-system", record())
    assert written is False and lock.refused == "403 Forbidden"
    lock.get("other-lease", "kube-system")  # each try of the election reads first
    assert lock.refused == "403 Forbidden"  # which grants nothing about writing
    api.statuses = {}  # granted
    if call == "create":
        assert lock.create("other-lease", "kube-system", record()) is True
    else:
        assert lock.update("other-lease", "kube-system", record()) is True
    assert lock.refused is None


def wait_until(condition: Any, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return bool(condition())


@pytest.mark.parametrize(("status", "ready"), [(403, False), (401, False), (404, True)])
def test_a_follower_is_ready_once_it_read_its_lease_unless_refused(
    status: int, ready: bool
) -> None:
    lock: Any = CheckedLeaseLock(
        "other-lease", "kube-system", "replica-0", LeaseApi(read=status), timeout=5
    )
    health = Health(stale_after=60)
    beats: list[bool] = []
    beat = health.beat

    def counted(*, ready: bool | None = None) -> None:
        beats.append(bool(ready))
        beat(ready=ready)

    controller = SimpleNamespace(leading=threading.Event(), stop=threading.Event(), health=health)
    health.beat = counted  # type: ignore[method-assign]
    stand_by = threading.Thread(target=_stand_by, args=(controller, lock))
    stand_by.start()
    try:
        assert wait_until(lambda: len(beats) >= 2)
        assert not any(beats)  # not ready before it has read its Lease
        lock.get("other-lease", "kube-system")
        seen = len(beats)
        assert wait_until(lambda: len(beats) > seen)  # a beat since the Lease was read
        assert health.ready() == ready
    finally:
        controller.stop.set()
        stand_by.join()


def test_a_lease_call_the_api_never_answers_fails_within_the_timeout() -> None:
    """A connection left half-open (a failover): the call fails as LeaseLock takes a failure,
    so the leader's renew loop reaches its deadline and stops leading, instead of hanging in
    the call while its control loop acts on after another replica took the Lease."""
    with silent_server() as server:
        configuration = k8s.Configuration(host=server)
        api = k8s.CoordinationV1Api(k8s.ApiClient(configuration))
        lock: Any = CheckedLeaseLock("lease", "kube-system", "replica-0", api, timeout=0.5)
        started = time.monotonic()
        found, failure = lock.get("lease", "kube-system")
        took = time.monotonic() - started
    assert not found and isinstance(failure, ApiException) and failure.status == 0
    assert took < 5, took
    assert not lock.consulted.is_set()  # no answer: neither ready nor refused by it


def test_a_successful_write_of_the_lease_is_its_renewal_and_a_read_is_not() -> None:
    api = LeaseApi(replace=409)
    lock: Any = CheckedLeaseLock("lease", "kube-system", "replica-0", api, timeout=5)
    lock.lease_reference = V1Lease(spec=V1LeaseSpec())
    lock.get("lease", "kube-system")
    lock.update("lease", "kube-system", record())  # refused
    assert lock.renewed_at == float("-inf")
    api.statuses = {}
    before = time.monotonic()
    assert lock.update("lease", "kube-system", record()) is True
    assert lock.renewed_at >= before


def test_the_leader_stops_once_its_lease_went_unrenewed_too_long() -> None:
    """The watchdog of a leader whose renewals stopped succeeding (each Lease call within its
    timeout, but the election's last try may begin just before its deadline): it stops the
    replica once the last renewal is older than the renew deadline and a retry, and not
    before."""
    lock: Any = SimpleNamespace(namespace="kube-system", name="lease", renewed_at=0.0)
    stop = threading.Event()
    exits: list[tuple[float, str]] = []
    lock.renewed_at = time.monotonic()
    watchdog = threading.Thread(
        target=stop_when_lease_lapses,
        args=(lock, stop, 1.0, lambda why: exits.append((time.monotonic(), why))),
    )
    watchdog.start()
    for _ in range(6):  # renewed every 0.25 s for 1.5 s: no exit
        time.sleep(0.25)
        lock.renewed_at = time.monotonic()
    assert exits == []
    last = lock.renewed_at  # then no renewal any more
    watchdog.join(10)
    assert len(exits) == 1 and "kube-system/lease went unrenewed" in exits[0][1]
    assert 1.0 <= exits[0][0] - last < 5.0
    stop.set()


def test_a_stopped_controller_stops_its_lease_watchdog() -> None:
    lock: Any = SimpleNamespace(namespace="kube-system", name="lease", renewed_at=time.monotonic())
    stop = threading.Event()
    watchdog = threading.Thread(target=stop_when_lease_lapses, args=(lock, stop, 60.0, print))
    watchdog.start()
    stop.set()
    watchdog.join(5)
    assert not watchdog.is_alive()
