"""A store that is up but does not answer is busy, not down: the plugin keeps trying past the
grace it gives an unreachable store, and the ADD succeeds once the store answers again.

The real servers are stopped with SIGSTOP, as a machine swapping or a server stuck in a long
pause would be: connections are still accepted (by the kernel), answers never come, and each
request of the plugin times out (5 s). An unreachable store is given up after OUTAGE_GRACE
(15 s); a silent one must not be, or a slow burst would fail pods that a moment later would
have been served.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from deploy.local.controlplane import ControlPlane
from deploy.local.netns import CniCall
from pyabouts.ipam.transaction import OUTAGE_GRACE
from pyabouts.plugin.backend import REQUEST_TIMEOUT_SECONDS
from tests.integration.etcd_fixtures import EtcdServer
from tests.integration.plugin_fixtures import etcd_ipam, kubernetes_ipam
from tests.integration.plugin_processes import cni, netconf
from tests.integration.stored_state import stored, stored_allocations

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# Past the time an unreachable store is given, counted as the old code counted it (from the end
# of the first request that timed out), with a request's length to spare.
SILENCE = REQUEST_TIMEOUT_SECONDS + OUTAGE_GRACE + REQUEST_TIMEOUT_SECONDS
IN_PROCESS = str(Path(sys.executable).parent / "pyabouts")  # the plugin itself, no agent


@contextlib.contextmanager
def silenced(pid: int | None) -> Iterator[None]:
    assert pid is not None, "the server is not a process of this test session"
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def add_while_silent(pid: int | None, ipam: dict[str, Any]) -> CniCall:
    """An ADD started while the server at `pid` is stopped, which it stays for SILENCE."""
    with ThreadPoolExecutor(1) as pool:
        with silenced(pid):
            call = pool.submit(cni, IN_PROCESS, "ADD", netconf(**ipam), "silent")
            time.sleep(SILENCE)
            assert not call.done(), call.result().result  # still trying, not given up
        return call.result(timeout=120)


def test_a_silent_apiserver_is_waited_for_and_the_add_succeeds(
    pyabouts_cluster: ControlPlane,
) -> None:
    network = f"silent-{uuid.uuid4().hex[:6]}"
    ipam = kubernetes_ipam(pyabouts_cluster, range="10.94.0.0/24", network_name=network)
    pid = pyabouts_cluster.pids()["kube-apiserver"]
    result = add_while_silent(pid, ipam).expect_success()
    assert result["ips"][0]["address"] == "10.94.0.1/24"
    assert stored(pyabouts_cluster, network) == {"10.94.0.1": "silent"}


def test_a_silent_etcd_is_waited_for_and_the_add_succeeds(etcd_server: EtcdServer) -> None:
    network = f"silent-{uuid.uuid4().hex[:6]}"
    ipam = etcd_ipam(etcd_server, range="10.95.0.0/24", network_name=network)
    result = add_while_silent(etcd_server.pid, ipam).expect_success()
    assert result["ips"][0]["address"] == "10.95.0.1/24"
    assert set(stored_allocations(etcd_server, network)) == {"10.95.0.0/24+1"}
