"""Write-behind of a node's slice blocks on the real apiserver, through the node shim: the
agent answers from its journal and stores within --write-behind; killed with answers unstored,
it leaves them in the journal, the thin plugin then refuses to serve in-process rather than give
one of them again, and the next agent stores them first and gives none of them again; stopped,
it stores what is pending before it exits."""

import contextlib
import fcntl
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netaddr
import pytest

from deploy.local.agent_process import AgentProcess
from deploy.local.controlplane import ControlPlane
from deploy.local.node_shim import built_shim
from pyabouts.ipam.errors import TRY_AGAIN_LATER
from pyabouts.plugin.install import install_shim, install_thin_plugin
from pyabouts.plugin.wire import JOURNAL_LOCK, PENDING_JOURNAL
from tests.integration.plugin_fixtures import kubernetes_datastore, kubernetes_ipam
from tests.integration.plugin_processes import Node, make_nodes, metric, run_plugins
from tests.integration.stored_state import owners_on

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def writing_behind(cluster: ControlPlane, tmp_path: Path, count: int) -> Iterator[list[Node]]:
    """`count` nodes whose agents serve their own flat file's datastore and write their slices
    behind, storing every 60 s only: what they answered stays unstored for the test's length
    unless they stop."""
    agents: list[AgentProcess] = []

    def start(directory: Path) -> AgentProcess:
        config = directory / "pyabouts.conf"
        agent = AgentProcess(directory, config=config, extra_args=["--write-behind", "60"])
        agents.append(agent.start())
        return agent

    try:
        yield make_nodes(tmp_path, count, kubernetes_datastore(cluster), start)
    finally:
        for agent in agents:
            agent.stop()


@pytest.fixture
def node(pyabouts_cluster: ControlPlane, tmp_path: Path) -> Iterator[Node]:
    with writing_behind(pyabouts_cluster, tmp_path, 1) as [found]:
        yield found


def address(outcome: tuple[int, Any]) -> str:
    code, result = outcome
    assert code == 0, result
    return str(result["ips"][0]["address"].split("/")[0])


def wait_stored(cluster: ControlPlane, network: str, containers: set[str]) -> set[str]:
    """The containers stored as holding an address of `network`, once they are `containers`
    (or after 15 s, whatever they are then)."""
    give_up = time.monotonic() + 15
    while True:
        found = {o.container_id for o in owners_on(cluster, network).values()}
        if found == containers or time.monotonic() > give_up:
            return found
        time.sleep(0.1)


def test_answers_kept_in_the_journal_survive_the_agent_and_are_stored_by_the_next(
    pyabouts_cluster: ControlPlane, node: Node, tmp_path: Path
) -> None:
    assert node.agent is not None
    agent = node.agent
    shim = str(install_shim(tmp_path / "bin", built_shim(), socket_path=str(agent.socket)))
    network = f"wb-{uuid.uuid4().hex[:6]}"
    ipam = kubernetes_ipam(
        pyabouts_cluster, range="10.96.0.0/22", node_slice_size="/24", network_name=network
    )

    def add(*containers: str) -> list[str]:
        return [address(o) for o in run_plugins(shim, "ADD", ipam, [node], list(containers))]

    (first,) = add("c1")  # takes the node's slice: stored before the answer
    slice_of_node = netaddr.IPNetwork(f"{first}/24")
    assert set(owners_on(pyabouts_cluster, network)) == {first}
    kept = add("c2", "c3", "c4")
    assert len({first, *kept}) == 4
    assert all(netaddr.IPAddress(a) in slice_of_node for a in kept)
    # Answered, and not stored: in the agent's journal, beside its socket.
    assert set(owners_on(pyabouts_cluster, network)) == {first}
    assert metric(agent, "pyabouts_agent_write_behind_pending") == 3
    journal = agent.socket.parent / PENDING_JOURNAL

    def journaled() -> int:
        """The changes the journal holds, after its head (a batch's share a line)."""
        lines = journal.read_text().splitlines()[1:]
        return sum(len(json.loads(line)["changes"]) for line in lines)

    assert journaled() == 3

    agent.kill()  # a crash: nothing stored on the way out
    assert journaled() == 3
    # The thin plugin finds no agent and a journal holding answers: it does not serve them
    # again in-process, where none of them is in the IPPools yet.
    thin = str(install_thin_plugin(tmp_path / "thin", socket_path=str(agent.socket)))
    ((code, error),) = run_plugins(thin, "ADD", ipam, [Node(node.flat_file)], ["c5"])
    assert code == 1 and error["code"] == TRY_AGAIN_LATER, error
    assert str(journal) in error["msg"] and "start it again" in error["msg"]
    # Nor beside an agent that is starting or stopping (it holds the journal's lock).
    with open(agent.socket.parent / JOURNAL_LOCK, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the agent holds it
        ((code, error),) = run_plugins(thin, "ADD", ipam, [Node(node.flat_file)], ["c5"])
    assert code == 1 and error["code"] == TRY_AGAIN_LATER, error
    assert "starting or stopping" in error["msg"]
    assert set(owners_on(pyabouts_cluster, network)) == {first}

    agent.start()  # stores what the journal holds at once, not after its first 60 s
    assert wait_stored(pyabouts_cluster, network, {"c1", "c2", "c3", "c4"}) == {
        "c1",
        "c2",
        "c3",
        "c4",
    }
    (fifth,) = add("c5")
    assert fifth not in {first, *kept} and netaddr.IPAddress(fifth) in slice_of_node
    ((code, result),) = run_plugins(shim, "DEL", ipam, [node], ["c3"])
    assert code == 0, result
    # Both kept: stored within 60 s, or when the agent stops.
    still = {o.container_id for o in owners_on(pyabouts_cluster, network).values()}
    assert still == {"c1", "c2", "c3", "c4"}

    agent.stop()  # SIGTERM: what is pending is stored before it exits
    stored = {o.container_id: a for a, o in owners_on(pyabouts_cluster, network).items()}
    assert stored == {"c1": first, "c2": kept[0], "c4": kept[2], "c5": fifth}
    assert json.loads(journal.read_text().splitlines()[0])["node"] == node.name
    assert len(journal.read_text().splitlines()) == 1  # nothing left for the next agent


def test_nodes_whose_slices_share_a_block_each_store_their_answers_behind_into_it(
    pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    """Slices of /26 in a range of one block: two nodes' slices in one IPPool. Each node's
    ADDs after the first are answered and not stored; each agent's SIGTERM stores its own,
    the second over the first's write of the block."""
    network = f"wb-{uuid.uuid4().hex[:6]}"
    ipam = kubernetes_ipam(
        pyabouts_cluster, range="10.97.0.0/24", node_slice_size="/26", network_name=network
    )
    with writing_behind(pyabouts_cluster, tmp_path, 2) as nodes:
        shims = []
        for n, each in enumerate(nodes):
            assert each.agent is not None
            socket = str(each.agent.socket)
            shims.append(str(install_shim(tmp_path / f"bin-{n}", built_shim(), socket_path=socket)))

        def add(n: int, *containers: str) -> dict[str, str]:
            outcomes = run_plugins(shims[n], "ADD", ipam, [nodes[n]], list(containers))
            return {c: address(o) for c, o in zip(containers, outcomes, strict=True)}

        firsts = add(0, "a1") | add(1, "b1")  # each takes its slice: stored before the answer
        assert set(owners_on(pyabouts_cluster, network)) == set(firsts.values())
        kept = add(0, "a2", "a3") | add(1, "b2", "b3")
        assert set(owners_on(pyabouts_cluster, network)) == set(firsts.values())
        for each in nodes:
            assert each.agent is not None
            assert metric(each.agent, "pyabouts_agent_write_behind_pending") == 2
        answered = firsts | kept
        slices = {c: netaddr.IPNetwork(f"{a}/26") for c, a in answered.items()}
        assert slices["a1"] != slices["b1"]
        assert {slices[c] for c in ("a1", "a2", "a3")} == {slices["a1"]}
        assert {slices[c] for c in ("b1", "b2", "b3")} == {slices["b1"]}
        for each in nodes:
            assert each.agent is not None
            each.agent.stop()  # SIGTERM: what is pending is stored before it exits
        stored = {o.container_id: a for a, o in owners_on(pyabouts_cluster, network).items()}
        assert stored == answered
