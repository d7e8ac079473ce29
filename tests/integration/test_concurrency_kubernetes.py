"""Many `pyabouts` processes at once on IPPools in a real kube-apiserver: contention, processes
killed mid-write, and the apiserver restarted mid-run."""

import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from deploy.local.controlplane import ControlPlane
from tests.integration.plugin_fixtures import NodeAgents, kubernetes_datastore
from tests.integration.plugin_processes import (
    addresses_of,
    conflicts_counted,
    finish,
    make_nodes,
    run_as_the_runtime_would,
    run_plugins,
    start_plugins,
)
from tests.integration.stored_state import conflicts_at_the_apiserver, stored

# Hundreds of interpreters at once: never beside each other on the two cores, and given time.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.xdist_group("processes"),
    pytest.mark.machine_wide,  # hundreds of plugin processes at once
    pytest.mark.timeout(1800),
]


def assert_pool_matches(
    cluster: ControlPlane, network: str, outcomes: list[tuple[int, Any]], pods: list[str]
) -> None:
    """No address answered twice; every answered ADD is stored as answered; whatever else is
    stored belongs to a container that was really started."""
    given = addresses_of(outcomes, pods)
    held = stored(cluster, network)
    assert set(held.values()) <= set(pods)
    for address, container in given.items():
        assert held[address] == container


# Each in-process plugin call spends ~0.5 s of CPU starting up; 400 interpreters at once on this
# machine's two cores starve each other past the deadline (the node agent is the answer to that).
# 50 in flight is the concurrency the speed benchmark uses. Even so, a call may answer 11 ("try
# again later") under this load; the runtime retries those, and so does the test.
IN_FLIGHT = 50


def test_400_concurrent_from_8_nodes_into_a_23(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane, tmp_path: Path, node_agents: NodeAgents
) -> None:
    network = f"burst-{uuid.uuid4().hex[:6]}"
    ipam = {"range": "10.70.0.0/23", "network_name": network}
    nodes = make_nodes(tmp_path, 8, kubernetes_datastore(pyabouts_cluster), node_agents)
    pods = [f"pod-{i:03d}" for i in range(400)]
    conflicts_before = conflicts_at_the_apiserver(pyabouts_cluster)

    added, _ = run_as_the_runtime_would(pyabouts_exe, "ADD", ipam, nodes, pods, in_flight=IN_FLIGHT)
    assert [code for code, _ in added] == [0] * 400, [r for c, r in added if c][:3]
    given = addresses_of(added, pods)
    assert len(given) == 400
    assert stored(pyabouts_cluster, network) == given
    # The pool really was contended (the apiserver refused writes as conflicting), and retries
    # resolved it.
    assert conflicts_at_the_apiserver(pyabouts_cluster) > conflicts_before
    if node_agents is not None:  # and the agents' metrics say so too
        assert conflicts_counted(nodes) > 0

    deleted, _ = run_as_the_runtime_would(
        pyabouts_exe, "DEL", ipam, nodes, pods, in_flight=IN_FLIGHT
    )
    assert [code for code, _ in deleted] == [0] * 400, [r for c, r in deleted if c][:3]
    assert stored(pyabouts_cluster, network) == {}


def test_a_burst_on_one_node_never_fails_from_contention(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane, tmp_path: Path, node_agents: NodeAgents
) -> None:
    """Issue 12: 300 ADDs then 300 DELs, 50 at once, on one node, each answered first time.

    In-process, this starves the two cores (the apiserver's answers slow down too) and keeps the
    node's queue fifty deep. Writers that gave up waiting after a fixed time used to race each
    other, and now and then one lost every race until its deadline (code 11)."""
    network = f"one-node-{uuid.uuid4().hex[:6]}"
    ipam = {"range": "10.73.0.0/23", "network_name": network}
    nodes = make_nodes(tmp_path, 1, kubernetes_datastore(pyabouts_cluster), node_agents)
    pods = [f"pod-{i:03d}" for i in range(300)]
    conflicts_before = conflicts_at_the_apiserver(pyabouts_cluster)

    added = run_plugins(pyabouts_exe, "ADD", ipam, nodes, pods, in_flight=IN_FLIGHT)
    assert [r for c, r in added if c] == []  # no retries: none may fail
    assert stored(pyabouts_cluster, network) == addresses_of(added, pods)

    deleted = run_plugins(pyabouts_exe, "DEL", ipam, nodes, pods, in_flight=IN_FLIGHT)
    assert [r for c, r in deleted if c] == []
    assert stored(pyabouts_cluster, network) == {}
    if node_agents is None:  # the node's processes took turns: not one write lost a race
        assert conflicts_at_the_apiserver(pyabouts_cluster) == conflicts_before


def test_killed_plugins_leave_no_duplicate_and_no_stranger(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane, tmp_path: Path, node_agents: NodeAgents
) -> None:
    network = f"kill-{uuid.uuid4().hex[:6]}"
    ipam = {"range": "10.71.0.0/24", "network_name": network}
    nodes = make_nodes(tmp_path, 4, kubernetes_datastore(pyabouts_cluster), node_agents)
    pods = [f"pod-{i:03d}" for i in range(120)]

    started = start_plugins(pyabouts_exe, "ADD", ipam, nodes, pods)
    if nodes[0].agent is None:
        time.sleep(4)  # let them get going, then kill a third of those still running
    else:  # thin plugins are quick: kill as soon as the first have answered
        while not any(proc.poll() is not None for proc in started):
            time.sleep(0.002)
    victims = [proc for i, proc in enumerate(started) if i % 3 == 0 and proc.poll() is None]
    for proc in victims:
        proc.send_signal(signal.SIGKILL)
    outcomes = finish(started)

    # A victim may have answered between the look and the signal: it counts as a survivor.
    killed = sum(1 for code, _ in outcomes if code == -signal.SIGKILL)
    assert 0 < killed <= len(victims), "no process was still running to be killed"
    survivors = [(c, r) for c, r in outcomes if c != -signal.SIGKILL]
    assert all(code == 0 for code, _ in survivors), [r for c, r in survivors if c][:3]
    assert_pool_matches(pyabouts_cluster, network, outcomes, pods)


def test_an_apiserver_restart_mid_run_leaves_a_consistent_pool(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane, tmp_path: Path, node_agents: NodeAgents
) -> None:
    network = f"restart-{uuid.uuid4().hex[:6]}"
    ipam = {"range": "10.72.0.0/24", "network_name": network}
    nodes = make_nodes(tmp_path, 4, kubernetes_datastore(pyabouts_cluster), node_agents)
    pods = [f"pod-{i:03d}" for i in range(120)]

    started = start_plugins(pyabouts_exe, "ADD", ipam, nodes, pods)
    time.sleep(3)
    pyabouts_cluster.restart_apiserver()
    outcomes = finish(started)

    codes = Counter(0 if code == 0 else result["code"] for code, result in outcomes)
    assert set(codes) <= {0, 11}, codes  # success, or "try again later": never a crash
    assert codes[0] > 0
    assert_pool_matches(pyabouts_cluster, network, outcomes, pods)

    # The runtime retries what failed, then tears everything down: the pool ends empty.
    retried = [pod for (code, _), pod in zip(outcomes, pods, strict=True) if code != 0]
    again, _ = run_as_the_runtime_would(
        pyabouts_exe, "ADD", ipam, nodes, retried, in_flight=IN_FLIGHT
    )
    assert all(c == 0 for c, _ in again), [r for c, r in again if c][:3]
    deleted, _ = run_as_the_runtime_would(
        pyabouts_exe, "DEL", ipam, nodes, pods, in_flight=IN_FLIGHT
    )
    assert all(c == 0 for c, _ in deleted), [r for c, r in deleted if c][:3]
    assert stored(pyabouts_cluster, network) == {}
