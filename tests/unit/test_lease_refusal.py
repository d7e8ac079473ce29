"""A reconciler replica the API refuses its Lease (401/403) says so in its log and is not ready:
the leader election alone would stand it by as ready for ever, never acting."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from kubernetes.client.exceptions import ApiException

from pyabouts.controller.controller import CheckedLeaseLock, _stand_by
from pyabouts.serving.endpoints import Health


class LeaseApi:
    """read_namespaced_lease answering with `status` (an ApiException) until told otherwise."""

    def __init__(self, status: int) -> None:
        self.status = status

    def read_namespaced_lease(self, name: str, namespace: str) -> Any:
        raise ApiException(
            status=self.status, reason={403: "Forbidden", 404: "Not Found"}.get(self.status, "")
        )


def lock_with(api: LeaseApi) -> CheckedLeaseLock:
    lock = CheckedLeaseLock("other-lease", "kube-system", "replica-0")
    lock.api_instance = cast(Any, api)  # a fake of the one call LeaseLock.get makes
    return lock


def test_a_refused_lease_is_logged_once_and_known_until_it_is_granted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = LeaseApi(403)
    lock = lock_with(api)
    assert not lock.consulted.is_set()
    found, _ = lock.get("other-lease", "kube-system")
    lock.get("other-lease", "kube-system")
    assert not found and lock.refused == "403 Forbidden" and lock.consulted.is_set()
    errors = [r for r in caplog.records if "refuses this replica the Lease" in r.getMessage()]
    assert len(errors) == 1 and "kube-system/other-lease" in errors[0].getMessage()
    api.status = 404  # granted: the Lease is merely not there yet
    lock.get("other-lease", "kube-system")
    assert lock.refused is None


@pytest.mark.parametrize(("status", "ready"), [(403, False), (401, False), (404, True)])
def test_a_follower_is_ready_once_it_read_its_lease_unless_refused(
    status: int, ready: bool
) -> None:
    lock = lock_with(LeaseApi(status))
    controller = SimpleNamespace(
        leading=threading.Event(), stop=threading.Event(), health=Health(stale_after=60)
    )
    stand_by = threading.Thread(target=_stand_by, args=(controller, lock))
    stand_by.start()
    try:
        time.sleep(0.5)
        assert not controller.health.ready()  # not before it has read its Lease
        lock.get("other-lease", "kube-system")
        time.sleep(1.0)  # the stand-by beats every 0.2 s until the Lease was read
        assert controller.health.ready() == ready
    finally:
        controller.stop.set()
        stand_by.join()
