"""The benchmark's count of the agent contenders' conflicts: what their agents' /metrics say,
summed over the nodes."""

from pathlib import Path
from typing import Any, cast

from prometheus_client import generate_latest

from bench.contenders import (
    AgentServed,
    NodeAgents,
    NodeSetup,
    PyaboutsAgent,
    PyaboutsAgentEtcd,
)
from deploy.local.agent_process import AgentProcess
from pyabouts.plugin.agent.metrics import AgentMetrics


class MetricsOnlyAgent:
    """What NodeAgents asks of a running agent for this: its socket and its /metrics."""

    def __init__(self, directory: Path, conflicts: int) -> None:
        self.socket = directory / "agent.sock"
        self.agent_metrics = AgentMetrics()
        self.agent_metrics.conflicts.inc(conflicts)

    def metrics(self) -> str:
        return generate_latest(self.agent_metrics.registry).decode()


def test_the_agents_conflicts_are_summed_from_their_metrics(tmp_path: Path) -> None:
    started: list[MetricsOnlyAgent] = []

    def start(directory: Path, datastore: dict[str, Any]) -> AgentProcess:
        started.append(MetricsOnlyAgent(directory, conflicts=3 + len(started)))
        return cast(AgentProcess, started[-1])

    agents = NodeAgents(tmp_path, start=start, shim=None)
    setup = NodeSetup(netconf=b"{}", stderr_path=tmp_path / "stderr.log")
    for node in (0, 1, 0):  # node 0's agent serves its later calls too
        agents.serve(setup, node, {})
    assert len(started) == 2
    assert agents.conflicts() == 3 + 4
    started[0].agent_metrics.conflicts.inc(5)  # the counter's growth is what a phase reports
    assert agents.conflicts() == 3 + 4 + 5


def test_every_agent_contender_reports_its_agents_count_not_the_apiservers() -> None:
    # On IPPools the apiserver's 409s miss the writes the agents did not send because their
    # watch showed them bound to be refused; the agents count both.
    assert PyaboutsAgent.count_conflicts is AgentServed.count_conflicts
    assert PyaboutsAgentEtcd.count_conflicts is AgentServed.count_conflicts
