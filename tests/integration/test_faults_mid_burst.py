"""Faults in the middle of a burst lose nothing.

300 ADDs from three nodes (one real agent each, called through the node shim)
while one agent, kube-apiserver, the apiserver's etcd or the etcd datastore is killed with
SIGKILL and started again, with ADDs still unanswered at that moment. Then every pod is retried
as kubelet would (the failed sandbox torn down with DEL, again if need be, and a new one set up
with ADD) until it has an answer; afterwards no address is held twice, every pod holds exactly
the one address it was answered, and the DELs of every pod leave the store empty, with nothing
left for a reconciler pass to find.
"""

import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deploy.local.agent_process import running_agent
from deploy.local.controlplane import ControlPlane, start_control_plane
from deploy.local.etcd_server import running_etcd
from deploy.local.install import install_pyabouts
from deploy.local.node_shim import built_shim
from pyabouts.ipam.config import flat_file_settings
from pyabouts.ipam.stores import open_store
from pyabouts.ipam.stores.flat_file import read_own_flat_file
from pyabouts.plugin.install import install_shim
from tests.integration.plugin_processes import (
    FLAT_FILE_NAME,
    Node,
    finish,
    make_nodes,
    start_plugins,
)
from tests.integration.stored_state import owners_in

pytestmark = [
    pytest.mark.integration,
    pytest.mark.xdist_group("processes"),
    pytest.mark.machine_wide,  # hundreds of processes at once
    pytest.mark.timeout(900),
]

PODS = 300
NODES = 3
ANSWERED_BEFORE_THE_FAULT = 20
RETRY_ROUNDS = 8
RETRY_PAUSE_S = 1.0  # between a pod's sandbox attempts (kubelet backs off longer)


@dataclass
class Burst:
    exe: str
    nodes: list[Node]
    ipam: dict[str, Any]
    kubeconfig: Path  # for the reconciler's look at pods

    @property
    def network(self) -> str:
        return str(self.ipam["network_name"])

    def held(self) -> dict[str, tuple[str, str]]:
        """address -> (pod, containerID) of every allocation of the burst's network."""
        settings = flat_file_settings(read_own_flat_file(str(self.nodes[0].flat_file)))
        store = open_store(settings, timeout=30)
        try:
            owners = owners_in(store, self.network)
            return {address: (o.pod, o.container_id) for address, o in owners.items()}
        finally:
            store.close()

    def run(self, command: str, calls: list[tuple[int, str]]) -> list[tuple[int, Any]]:
        """Each (pod index, container) call at once, pod i on node i % NODES; the outcomes."""
        started = [
            start_plugins(
                self.exe,
                command,
                self.ipam,
                [self.nodes[i % NODES]],
                [container],
                pods=[pod_name(i)],
            )[0]
            for i, container in calls
        ]
        return finish(started)

    def reconcile(self) -> dict[str, Any]:
        exe = Path(sys.executable).parent / "pyabouts-reconciler"
        argv = [str(exe), "--config", str(self.nodes[0].flat_file), "--kubeconfig"]
        # Its pods are gone from the API and from their nodes alike (no kubelet runs them):
        # nothing to wait for beyond the gone grace.
        argv = [*argv, str(self.kubeconfig), "--stop-grace", "0"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        summary: dict[str, Any] = json.loads(done.stdout)
        return summary


def pod_name(index: int) -> str:
    return f"pod-{index:03d}"


def burst_through_a_fault(burst: Burst, fault: Callable[[], None]) -> None:
    """The fault strikes as soon as ANSWERED_BEFORE_THE_FAULT ADDs have their answer: while the
    burst is still starting if they are answered that soon (then the rest start after it; a
    burst started whole first was at times answered whole before the fault came), else once
    it has started."""
    containers = {i: f"{pod_name(i)}-s0" for i in range(PODS)}
    started: list[subprocess.Popen[bytes]] = []
    unanswered: int | None = None  # at the moment the fault struck

    def strike_once_enough_are_answered() -> None:
        nonlocal unanswered
        done = sum(proc.poll() is not None for proc in started)
        if unanswered is None and done >= ANSWERED_BEFORE_THE_FAULT:
            unanswered = len(started) - done
            fault()

    for i, c in containers.items():
        started += start_plugins(
            burst.exe, "ADD", burst.ipam, [burst.nodes[i % NODES]], [c], pods=[pod_name(i)]
        )
        strike_once_enough_are_answered()
    while unanswered is None:
        time.sleep(0.005)
        strike_once_enough_are_answered()
    outcomes = dict(enumerate(finish(started)))
    assert unanswered > 0, "the fault came after every ADD had its answer"
    failed_by_fault = [i for i, (code, _) in outcomes.items() if code != 0]

    # As kubelet: a sandbox whose ADD failed is torn down (DEL), and a new one is set up; a
    # teardown that fails (the store not back yet) is tried again in the next round.
    for attempt in range(1, RETRY_ROUNDS + 1):
        failed = [i for i, (code, _) in outcomes.items() if code != 0]
        if not failed:
            break
        time.sleep(RETRY_PAUSE_S)
        deleted = burst.run("DEL", [(i, containers[i]) for i in failed])
        torn_down = [i for i, (code, _) in zip(failed, deleted, strict=True) if code == 0]
        containers |= {i: f"{pod_name(i)}-s{attempt}" for i in torn_down}
        redone = burst.run("ADD", [(i, containers[i]) for i in torn_down])
        outcomes |= dict(zip(torn_down, redone, strict=True))
    assert [o for o in outcomes.values() if o[0] != 0] == []

    answered = {
        outcomes[i][1]["ips"][0]["address"].split("/")[0]: (f"burst/{pod_name(i)}", containers[i])
        for i in range(PODS)
    }
    assert len(answered) == PODS, "an address was answered twice"
    assert burst.held() == answered  # each pod holds exactly its answer; nothing else is held

    deleted = burst.run("DEL", list(containers.items()))
    assert [code for code, _ in deleted] == [0] * PODS, [r for c, r in deleted if c][:3]
    assert burst.held() == {}
    summary = burst.reconcile()
    assert [a for a in summary["addresses"] if a["network"] == burst.network] == []
    assert burst.held() == {}
    print(f"{len(failed_by_fault)} of {PODS} ADDs failed by the fault; {unanswered} unanswered")


@contextlib.contextmanager
def agents_burst(
    tmp_path: Path, datastore: dict[str, Any], kubeconfig: Path, cidr: str
) -> Iterator[Burst]:
    """Three nodes, each with an agent of its own that serves the node's flat file."""
    with contextlib.ExitStack() as stack:
        nodes = make_nodes(
            tmp_path,
            NODES,
            datastore,
            lambda d: stack.enter_context(running_agent(d, config=d / FLAT_FILE_NAME)),
        )
        shim = install_shim(tmp_path / "bin", built_shim(), socket_path="/nonexistent")
        ipam = {"range": cidr, "network_name": f"fault-{uuid.uuid4().hex[:6]}"}
        yield Burst(str(shim), nodes, ipam, kubeconfig)


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[ControlPlane]:
    """A control plane of this test's own, since the test kills it."""
    cluster = start_control_plane(tmp_path / "controlplane")
    try:
        install_pyabouts(cluster)
        yield cluster
    finally:
        cluster.stop()


def kubernetes_datastore(cluster: ControlPlane) -> dict[str, Any]:
    return {"datastore": "kubernetes", "kubernetes": {"kubeconfig": str(cluster.kubeconfig)}}


def test_an_agent_killed_mid_burst_loses_nothing(
    tmp_path: Path, pyabouts_cluster: ControlPlane
) -> None:
    store = kubernetes_datastore(pyabouts_cluster)
    with agents_burst(tmp_path, store, pyabouts_cluster.kubeconfig, "10.110.0.0/23") as burst:
        agent = burst.nodes[1].agent
        assert agent is not None

        def kill_and_restart_an_agent() -> None:
            agent.kill()
            agent.start()  # as its DaemonSet would

        burst_through_a_fault(burst, kill_and_restart_an_agent)


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_the_control_plane_killed_mid_burst_loses_nothing(
    tmp_path: Path, own_cluster: ControlPlane, component: str
) -> None:
    store = kubernetes_datastore(own_cluster)
    with agents_burst(tmp_path, store, own_cluster.kubeconfig, "10.111.0.0/23") as burst:

        def kill_and_restart() -> None:
            own_cluster.kill(component)
            time.sleep(1)
            own_cluster.start_again(component)

        burst_through_a_fault(burst, kill_and_restart)


def test_the_etcd_datastore_killed_mid_burst_loses_nothing(
    tmp_path: Path, pyabouts_cluster: ControlPlane
) -> None:
    with running_etcd(tmp_path / "etcd") as etcd:
        store = {"datastore": "etcd", "etcd_host": etcd.endpoint}
        with agents_burst(tmp_path, store, pyabouts_cluster.kubeconfig, "10.112.0.0/23") as burst:

            def kill_and_restart_etcd() -> None:
                etcd.kill()
                time.sleep(1)
                etcd.start_again()

            burst_through_a_fault(burst, kill_and_restart_etcd)
