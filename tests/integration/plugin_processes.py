"""Many `pyabouts` processes at once, as kubelet would start them on several nodes.

A simulated node is what differs between nodes for the plugin: its own flat file (the
datastore settings) and its own log file. Every call is a separate interpreter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.local.agent_process import AgentProcess
from deploy.local.netns import CniCall, run_cni
from pyabouts.plugin.commands import DEADLINE_SECONDS

FLAT_FILE_NAME = "pyabouts.conf"


@dataclass(frozen=True)
class Node:
    flat_file: Path
    agent: AgentProcess | None = None  # the node's pyabouts-agent, in agent mode

    @property
    def log(self) -> Path:
        return self.flat_file.parent / "pyabouts.log"

    @property
    def name(self) -> str:
        """What its calls record as their node: its agent's --node-name, or NODE_NAME."""
        return self.flat_file.parent.name


def make_nodes(
    tmp_path: Path,
    count: int,
    datastore: dict[str, Any],
    agents: Callable[[Path], AgentProcess] | None = None,
) -> list[Node]:
    """`count` nodes whose flat files hold `datastore`, with a verbose log and a run_dir (the
    node-local queue's locks) of their own, and each its own agent when `agents` starts them."""
    nodes = []
    for n in range(count):
        flat = tmp_path / f"node-{n}" / FLAT_FILE_NAME
        flat.parent.mkdir(parents=True, exist_ok=True)
        log = flat.parent / "pyabouts.log"
        node = {"log_file": str(log), "log_level": "verbose", "run_dir": str(flat.parent / "run")}
        flat.write_text(json.dumps(datastore | node))
        nodes.append(Node(flat, agents(flat.parent) if agents else None))
    return nodes


def start_plugins(
    exe: str,
    command: str,
    ipam: dict[str, Any],
    nodes: Sequence[Node],
    containers: Sequence[str],
    *,
    pods: Sequence[str] = (),
) -> list[subprocess.Popen[bytes]]:
    """Start one plugin process per container, round-robin over the nodes, and hand each its
    config at once (so they all really run at the same time); do not wait for them. Container
    i belongs to pod `pods[i]` (default: a pod named as the container)."""
    started = []
    for i, container in enumerate(containers):
        node = nodes[i % len(nodes)]
        pod = pods[i] if pods else container
        conf = {
            "cniVersion": "1.0.0",
            "name": "burst",
            "type": "macvlan",
            "ipam": ipam | {"type": "pyabouts", "configuration_path": str(node.flat_file)},
        }
        env = os.environ | {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container,
            "CNI_IFNAME": "net1",
            "CNI_NETNS": f"/var/run/netns/{container}",
            "CNI_PATH": "/usr/lib/cni",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=burst;K8S_POD_NAME={pod}",
            "NODE_NAME": node.name,  # in-process calls record it, as the agent its --node-name
        }
        if node.agent is not None:
            env["PYABOUTS_AGENT_SOCKET"] = str(node.agent.socket)
        proc = subprocess.Popen(
            [exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(conf).encode())  # far below a pipe buffer: never blocks
        proc.stdin.close()
        started.append(proc)
    return started


def finish(started: Sequence[subprocess.Popen[bytes]]) -> list[tuple[int, Any]]:
    """Wait for each process: (exit code, parsed stdout or None) per process."""
    outcomes = []
    for proc in started:
        assert proc.stdout is not None
        out = proc.stdout.read()  # stdout is the only pipe, so reading it first cannot block
        proc.stdout.close()
        proc.wait(timeout=600)
        outcomes.append((proc.returncode, json.loads(out) if out else None))
    return outcomes


def run_plugins(
    exe: str,
    command: str,
    ipam: dict[str, Any],
    nodes: Sequence[Node],
    containers: Sequence[str],
    *,
    in_flight: int | None = None,
) -> list[tuple[int, Any]]:
    """Run one plugin per container, all at once, or at most `in_flight` at a time (a new one
    starts as soon as the oldest running one ends); outcomes in the order of `containers`."""
    window = in_flight or len(containers)
    outcomes: list[tuple[int, Any]] = []
    running: list[subprocess.Popen[bytes]] = []
    for i in range(len(containers)):
        if len(running) == window:
            outcomes += finish(running[:1])
            running = running[1:]
        node = nodes[i % len(nodes)]  # the same node as if all were started in one call
        running += start_plugins(exe, command, ipam, [node], containers[i : i + 1])
    return outcomes + finish(running)


def run_as_the_runtime_would(
    exe: str,
    command: str,
    ipam: dict[str, Any],
    nodes: Sequence[Node],
    containers: Sequence[str],
    *,
    in_flight: int,
    retries: int = 2,
) -> tuple[list[tuple[int, Any]], int]:
    """run_plugins, then call again what answered 11 ("try again later"), as kubelet and the
    container runtime do; any other failure is final. The outcomes, and how many were retried."""
    outcomes = run_plugins(exe, command, ipam, nodes, containers, in_flight=in_flight)
    retried = 0
    for _ in range(retries):
        again = [i for i, (code, out) in enumerate(outcomes) if code and out and out["code"] == 11]
        if not again:
            break
        retried += len(again)
        redone = run_plugins(
            exe, command, ipam, nodes, [containers[i] for i in again], in_flight=in_flight
        )
        for i, outcome in zip(again, redone, strict=True):
            outcomes[i] = outcome
    return outcomes, retried


def served_log(node: Node) -> str:
    """What the node's pyabouts logged serving requests: its agent's log, or the plugin's."""
    log = node.agent.log if node.agent else node.log
    return log.read_text() if log.exists() else ""


def metric(agent: AgentProcess, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in agent.metrics().splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if not match or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match[3])
    return total


def conflicts_counted(nodes: Sequence[Node]) -> float:
    """The blocks the nodes' agents found changed when writing, from their /metrics."""
    return sum(metric(n.agent, "pyabouts_agent_conflicts_total") for n in nodes if n.agent)


def netconf(version: str = "1.1.0", **ipam: Any) -> dict[str, Any]:
    """A macvlan network config around `ipam`."""
    return {"cniVersion": version, "name": "net", "type": "macvlan", "ipam": ipam}


def cni(
    exe: str,
    command: str,
    conf: dict[str, Any],
    container: str = "c1",
    args: str = "",
    *,
    extra_env: dict[str, str] | None = None,
    timeout: float = DEADLINE_SECONDS + 30,
) -> CniCall:
    """One call of the plugin `exe`, as the runtime makes it for `container`.

    Waited for past the plugin's own deadline: a slow store then shows as the plugin's CNI
    error, not as a call the harness killed."""
    return run_cni(
        exe,
        command,
        conf,
        container_id=container,
        netns="/var/run/netns/unused",
        ifname="net1",
        cni_path="/usr/lib/cni",
        cni_args=args or f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-{container}",
        extra_env=extra_env,
        timeout=timeout,
    )


def addresses_of(outcomes: list[tuple[int, Any]], containers: list[str]) -> dict[str, str]:
    """address -> containerID for every ADD that succeeded; fails on a duplicate."""
    given: dict[str, str] = {}
    for (code, result), container in zip(outcomes, containers, strict=True):
        if code == 0:
            address = result["ips"][0]["address"].split("/")[0]
            assert address not in given, f"{address} given to {given[address]} and {container}"
            given[address] = container
    return given
