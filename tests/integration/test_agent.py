"""The node agent on real stores: killed mid-run, restarted, raced by another node's agent,
and observed through its endpoints. (Every plugin test also runs through an agent: see
plugin_fixtures.pyabouts_exe.)"""

import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import netaddr
import pytest

from deploy.local.agent_process import AgentProcess, running_agent
from deploy.local.controlplane import ControlPlane
from deploy.local.etcd_server import start_etcd
from deploy.local.node_shim import built_shim
from pyabouts.ipam.allocator import block_start
from pyabouts.ipam.pool import PoolId
from pyabouts.ipam.ranges import build_range
from pyabouts.plugin.install import install_shim, install_thin_plugin
from pyabouts.plugin.thin_client import AGENT_SOCKET
from tests.integration.etcd_fixtures import EtcdServer
from tests.integration.plugin_fixtures import etcd_ipam, kubernetes_datastore
from tests.integration.plugin_processes import (
    Node,
    addresses_of,
    cni,
    finish,
    make_nodes,
    metric,
    netconf,
    run_plugins,
    start_plugins,
)
from tests.integration.stored_state import stored, stored_allocations

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture
def shim(tmp_path: Path) -> str:
    """The node shim, as the DaemonSet installs it; each node's calls name their agent in
    PYABOUTS_AGENT_SOCKET."""
    return str(install_shim(tmp_path / "bin", built_shim(), socket_path=str(tmp_path / "no.sock")))


@pytest.fixture
def thin_plugin(tmp_path: Path) -> str:
    """The thin Python plugin with its in-process fallback, as on a pip-installed host."""
    return str(install_thin_plugin(tmp_path / "bin", socket_path=str(tmp_path / "no-agent.sock")))


@pytest.fixture
def two_agents(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    with (
        running_agent(tmp_path / "node-0", "agent") as first,
        running_agent(tmp_path / "node-1", "agent") as second,
    ):
        yield [first, second]


def nodes_with(tmp_path: Path, store: dict[str, Any], agents: list[AgentProcess]) -> list[Node]:
    """Nodes whose calls go to `agents` (node n to agents[n]), the agents already running."""
    remaining = iter(agents)
    return make_nodes(tmp_path, len(agents), store, lambda directory: next(remaining))


def test_killing_the_agent_mid_run_loses_nothing_and_a_restart_resumes_from_the_store(
    thin_plugin: str, pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    network = f"agentkill-{uuid.uuid4().hex[:6]}"
    ipam = {"range": "10.73.0.0/24", "network_name": network}
    agent = AgentProcess(tmp_path / "node-0").start()
    try:
        [node] = nodes_with(tmp_path, kubernetes_datastore(pyabouts_cluster), [agent])
        pods = [f"pod-{i:03d}" for i in range(150)]
        started = start_plugins(thin_plugin, "ADD", ipam, [node], pods)
        while sum(proc.poll() is not None for proc in started) < 30:
            time.sleep(0.005)
        unfinished = sum(proc.poll() is None for proc in started)
        agent.kill()  # SIGKILL, with requests in flight and more still connecting
        outcomes = finish(started)
        assert unfinished > 0

        # Answers are successes, or 11 from the clients whose agent died under them; those that
        # came after it served themselves in-process (the default fallback).
        codes = Counter(0 if code == 0 else result["code"] for code, result in outcomes)
        assert set(codes) <= {0, 11}, codes
        given = addresses_of(outcomes, pods)
        held = stored(pyabouts_cluster, network)
        for address, pod in given.items():
            assert held[address] == pod  # every success is stored as answered
        assert set(held.values()) <= set(pods)
        assert len(held) == len(set(held.values()))  # nobody holds two

        # With its agent dead, the node still serves, in-process; served pods keep their address.
        served_alone = run_plugins(thin_plugin, "ADD", ipam, [node], pods[:10])
        assert [code for code, _ in served_alone] == [0] * 10
        alone = addresses_of(served_alone, pods[:10])
        assert {a: p for a, p in given.items() if p in pods[:10]}.items() <= alone.items()
        given |= alone
        assert "ADD" in node.log.read_text()  # the plugin's own log: it was in-process

        # A new agent knows nothing but the store: it gives the same answers for pods already
        # served, and the rest their own addresses.
        agent.start()
        again = run_plugins(thin_plugin, "ADD", ipam, [node], pods, in_flight=50)
        assert [code for code, _ in again] == [0] * len(pods), [r for c, r in again if c][:3]
        final = addresses_of(again, pods)
        assert len(final) == len(pods)
        assert {a: p for a, p in final.items() if p in given.values()} == given
        assert stored(pyabouts_cluster, network) == final
        assert metric(agent, "pyabouts_agent_requests_total", command="ADD", result="ok") > 0
    finally:
        agent.stop()


def first_add_then_live_feed(
    shim: str,
    cluster: ControlPlane,
    two_agents: list[AgentProcess],
    tmp_path: Path,
    network: str,
) -> tuple[Callable[[Node, str], None], Node, Node]:
    """Two nodes whose agents serve `network` (a /24: one block) on IPPools, the first of
    them having served pod "first" and its IPPool watch live; what serves an ADD on a node."""
    ipam = {"range": "10.72.0.0/24", "network_name": network}
    near, far = nodes_with(tmp_path, kubernetes_datastore(cluster), two_agents)
    agent = near.agent
    assert agent is not None

    def add(node: Node, pod: str) -> None:
        [(code, result)] = run_plugins(shim, "ADD", ipam, [node], [pod])
        assert code == 0, result

    add(near, "first")
    deadline = time.monotonic() + 30
    while metric(agent, "pyabouts_agent_block_feed_live") != 1:
        assert time.monotonic() < deadline, "the agent's IPPool watch never became live"
        time.sleep(0.1)
    return add, near, far


def test_an_agent_following_the_ippool_watch_reads_no_idle_pool_and_sees_writes_at_once(
    shim: str, pyabouts_cluster: ControlPlane, two_agents: list[AgentProcess], tmp_path: Path
) -> None:
    """Past its pool cache's max age (2 s) an agent whose watch of the IPPools is live serves
    the next ADD without reading the pool (one API request: the write) when nobody else wrote
    it, and reads only the block another node wrote, before it decides, not after a conflict."""
    network = f"agentfeed-{uuid.uuid4().hex[:6]}"
    add, near, far = first_add_then_live_feed(shim, pyabouts_cluster, two_agents, tmp_path, network)
    agent = near.agent
    assert agent is not None
    reads = metric(agent, "pyabouts_agent_store_reads_total")
    time.sleep(2.5)  # past the max age of a pool nobody reported changed
    add(near, "after-a-rest")
    assert metric(agent, "pyabouts_agent_store_reads_total") == reads

    add(far, "other-node")  # the same block (a /24 is one), written by the other agent
    time.sleep(2.5)
    add(near, "after-the-other")
    assert metric(agent, "pyabouts_agent_conflicts_total") == 0
    assert metric(agent, "pyabouts_agent_store_reads_total") == reads + 1  # a GET of that block
    assert metric(agent, "pyabouts_agent_block_feed_breaks_total") == 0
    held = stored(pyabouts_cluster, network)
    assert sorted(held.values()) == ["after-a-rest", "after-the-other", "first", "other-node"]


def test_an_agent_sends_no_write_its_ippool_watch_shows_would_be_refused(
    shim: str, pyabouts_cluster: ControlPlane, two_agents: list[AgentProcess], tmp_path: Path
) -> None:
    """Within its pool cache's max age an agent decides on its cached block; when its watch has
    already reported that block written by another node, the PUT would be refused (409), so it
    is not sent: the agent reads the block and writes once, and counts the conflict."""
    network = f"agentahead-{uuid.uuid4().hex[:6]}"
    add, near, far = first_add_then_live_feed(shim, pyabouts_cluster, two_agents, tmp_path, network)
    agent = near.agent
    assert agent is not None
    add(far, "far-warm")  # its client and cache warm, so that its next ADD is quick
    time.sleep(2.1)
    add(near, "fresh")  # past max age: checked against the watch, and good for 2 s more
    writes = metric(agent, "pyabouts_agent_store_writes_total")
    reads = metric(agent, "pyabouts_agent_store_reads_total")
    add(far, "other-node")  # the same block (a /24 is one), written by the other agent
    time.sleep(0.5)  # for the watch to report it; well within the near agent's max age
    add(near, "after-the-other")
    assert metric(agent, "pyabouts_agent_conflicts_total") == 1
    assert metric(agent, "pyabouts_agent_store_writes_total") == writes + 1  # none refused
    assert metric(agent, "pyabouts_agent_store_reads_total") == reads + 1  # that block
    held = stored(pyabouts_cluster, network)
    assert sorted(held.values()) == ["after-the-other", "far-warm", "first", "fresh", "other-node"]


def test_two_agents_racing_on_one_pool_never_give_an_address_twice(
    shim: str, etcd_server: EtcdServer, two_agents: list[AgentProcess], tmp_path: Path
) -> None:
    network = f"agentrace-{uuid.uuid4().hex[:6]}"
    ipam = {"range": "10.74.0.0/24", "range_end": "10.74.0.100", "network_name": network}
    store = {"datastore": "etcd", "etcd_host": etcd_server.endpoint}
    nodes = nodes_with(tmp_path, store, two_agents)
    pods = [f"pod-{i:03d}" for i in range(150)]

    outcomes = finish(start_plugins(shim, "ADD", ipam, nodes, pods))
    codes = Counter(0 if code == 0 else result["code"] for code, result in outcomes)
    assert codes == {0: 100, 100: 50}  # exactly the pool's 100 addresses, then "exhausted"
    given = addresses_of(outcomes, pods)
    assert set(given) == {f"10.74.0.{i}" for i in range(1, 101)}
    held = stored_allocations(etcd_server, network)
    assert {f"10.74.0.{k.rsplit('+', 1)[1]}": o["containerID"] for k, o in held.items()} == given
    for agent in two_agents:  # both really served, and not one write per request
        served = metric(agent, "pyabouts_agent_requests_total", command="ADD")
        assert served > 0
        assert metric(agent, "pyabouts_agent_store_writes_total") <= served


def test_each_agent_starts_in_the_block_its_node_name_picks(
    shim: str, etcd_server: EtcdServer, two_agents: list[AgentProcess], tmp_path: Path
) -> None:
    """The agents of different nodes write different blocks, so they rarely conflict: each
    starts where allocator.block_start puts its node (node-0 and node-1 pick blocks 1 and 3 of
    this /22), not where the host's name would put them all."""
    network = f"agentspread-{uuid.uuid4().hex[:6]}"
    ipam = {"range": "10.73.0.0/22", "network_name": network}
    rng = build_range(
        "10.73.0.0/22", range_start=None, range_end=None, exclude=[], pool=PoolId(network, 4)
    )
    nodes = nodes_with(
        tmp_path, {"datastore": "etcd", "etcd_host": etcd_server.endpoint}, two_agents
    )

    outcomes = run_plugins(shim, "ADD", ipam, nodes, ["first", "second"], in_flight=1)
    given = {
        container: address
        for address, container in addresses_of(outcomes, ["first", "second"]).items()
    }
    expected = [str(netaddr.IPAddress(block_start(rng, agent.node_name))) for agent in two_agents]
    assert [agent.node_name for agent in two_agents] == ["node-0", "node-1"]
    assert [given["first"], given["second"]] == expected == ["10.73.1.0", "10.73.3.0"]


def test_the_agent_reports_health_usage_and_refuses_garbage(
    shim: str, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    network = f"agentmetrics-{uuid.uuid4().hex[:6]}"
    ipam = {"range": "10.75.0.0/24", "network_name": network}
    store = {"datastore": "etcd", "etcd_host": etcd_server.endpoint}
    with running_agent(tmp_path / "node-0") as agent:
        nodes = nodes_with(tmp_path, store, [agent])
        pods = [f"pod-{i}" for i in range(12)]
        assert [c for c, _ in run_plugins(shim, "ADD", ipam, nodes, pods)] == [0] * 12
        assert [c for c, _ in run_plugins(shim, "DEL", ipam, nodes, pods[:2])] == [0, 0]

        pool = {"network": network, "family": "4"}
        assert metric(agent, "pyabouts_pool_addresses", **pool, state="used") == 10
        assert metric(agent, "pyabouts_pool_addresses", **pool, state="total") == 254
        assert metric(agent, "pyabouts_agent_requests_total", command="DEL", result="ok") == 2
        assert metric(agent, "pyabouts_agent_request_seconds_count", command="ADD") == 12
        assert metric(agent, "pyabouts_agent_batch_size_sum") == 14

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(str(agent.socket))
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
            raw.shutdown(socket.SHUT_WR)
            reply = raw.recv(65536)
        code, _, body = reply.partition(b"\0")
        assert code == b"1" and json.loads(body)["code"] == 6
        assert agent.endpoint("/healthz") == "ok" and agent.endpoint("/readyz") == "ok"
        again = run_plugins(shim, "ADD", ipam, nodes, ["after-garbage"])
        assert again[0][0] == 0  # still serving


def test_without_an_agent_the_plugin_serves_in_process_or_fails_as_configured(
    thin_plugin: str, etcd_server: EtcdServer, tmp_path: Path
) -> None:
    network = f"noagent-{uuid.uuid4().hex[:6]}"
    store = {"datastore": "etcd", "etcd_host": etcd_server.endpoint}
    [node] = make_nodes(tmp_path, 1, store)  # no agent: the baked-in socket has none
    ipam = {"range": "10.76.0.0/24", "network_name": network}

    [(code, result)] = run_plugins(thin_plugin, "ADD", ipam, [node], ["fallback"])
    assert code == 0 and result["ips"][0]["address"] == "10.76.0.1/24"

    strict = ipam | {"agent_fallback": "fail"}
    [(code, result)] = run_plugins(thin_plugin, "ADD", strict, [node], ["strict"])
    assert code == 1 and result["code"] == 11
    assert "no pyabouts agent at" in result["msg"] and "agent_fallback" in result["msg"]
    assert set(stored_allocations(etcd_server, network)) == {"10.76.0.0/24+1"}  # nothing more
    # STATUS: the plugin cannot serve ADD, which CNI 1.1 says with 50.
    on_node = strict | {"type": "pyabouts", "configuration_path": str(node.flat_file)}
    status = cni(thin_plugin, "STATUS", netconf(**on_node))
    assert (status.returncode, status.result["code"]) == (1, 50), status.result


@pytest.mark.parametrize("client", ["shim", "thin_plugin"])
def test_a_client_whose_agent_dies_mid_request_gets_code_11(
    client: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A listener that takes the request and closes without answering, as a killed agent."""
    plugin = request.getfixturevalue(client)
    path = tmp_path / "dying.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def die_after_reading() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.close()

    threading.Thread(target=die_after_reading, daemon=True).start()
    conf = {"cniVersion": "0.4.0", "name": "n", "ipam": {"type": "pyabouts"}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0"}
    env |= {"PYABOUTS_AGENT_SOCKET": str(path)}
    done = subprocess.run(
        [plugin], input=json.dumps(conf).encode(), env=env, capture_output=True, check=False
    )
    listener.close()
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["code"] == 11 and error["cniVersion"] == "0.4.0"
    assert "ended the connection before answering" in error["msg"]
    assert done.stderr == b""


def test_a_del_waits_for_the_add_of_its_attachment_still_in_flight(
    shim: str, tmp_path: Path
) -> None:
    """A pod deleted as its sandbox starts: containerd kills the plugin of the cancelled ADD
    and sends the DEL at once, while the agent still serves the ADD. Under node slices the ADD
    waits on the slice registry's queue and the DEL on the range's: a DEL answered first, from
    the agent's cache, found nothing to free, and the ADD stored an address for a sandbox that
    was gone. Here etcd holds the ADD's write (SIGSTOP) while the DEL comes."""
    server = start_etcd(tmp_path / "etcd-data", tmp_path / "etcd.log")
    pid = server.pid
    assert pid is not None
    network = f"inflight-{uuid.uuid4().hex[:6]}"
    ipam = etcd_ipam(server, range="10.44.0.0/24", network_name=network, node_slice_size="/28")
    conf = netconf(**ipam)
    try:
        with running_agent(tmp_path / "node-0") as agent, ThreadPoolExecutor(2) as pool:
            env = {"PYABOUTS_AGENT_SOCKET": str(agent.socket)}
            cni(shim, "ADD", conf, "warm", extra_env=env).expect_success()  # the node's slice
            assert cni(shim, "DEL", conf, "warm", extra_env=env).ok  # the pool, cached now
            os.kill(pid, signal.SIGSTOP)
            try:
                adding = pool.submit(cni, shim, "ADD", conf, "c1", extra_env=env)
                time.sleep(0.5)  # its write sent, and held
                deleting = pool.submit(cni, shim, "DEL", conf, "c1", extra_env=env)
                time.sleep(1.0)
                assert not deleting.done(), deleting.result().result  # waits for the ADD
            finally:
                os.kill(pid, signal.SIGCONT)
            adding.result(timeout=120).expect_success()
            assert deleting.result(timeout=120).ok
        assert stored_allocations(server, network) == {}  # the registry's slice aside
    finally:
        server.stop()


def test_the_agent_daemonset_applies_and_agrees_with_the_node_shim(
    pyabouts_cluster: ControlPlane,
) -> None:
    """deploy/ (applied to the real apiserver for the session) runs an agent on every node,
    as the plugin's ServiceAccount, on the socket the node's plugin calls by default."""
    daemonset = json.loads(
        pyabouts_cluster.kubectl(
            "get", "daemonset", "pyabouts-agent", "-n", "kube-system", "-o", "json"
        )
    )
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "pyabouts"
    [agent] = pod["containers"]
    [install] = pod["initContainers"]
    assert agent["command"][0] == "pyabouts-agent"
    assert f"--socket={AGENT_SOCKET}" in agent["command"]
    # /metrics and the probes on the node's address alone, not on every interface of the host.
    assert "--listen=$(HOST_IP):9646" in agent["command"]
    host_ip = {e["name"]: e.get("valueFrom") for e in agent["env"]}["HOST_IP"]
    assert host_ip == {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.hostIP"}}
    assert f"--agent-socket={AGENT_SOCKET}" in install["command"]
    assert "--shim=/opt/pyabouts/libexec/pyabouts-shim" in install["command"]  # no Python on nodes
    volumes = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    # The agent sees the host's socket directory and nothing else of the node: it never
    # follows a path a NAD names. Its /tmp is its own (a read-only root otherwise).
    mounts = {m["mountPath"]: volumes[m["name"]] for m in agent["volumeMounts"]}
    assert mounts == {"/run/pyabouts": "/run/pyabouts", "/tmp": None}
    # The installer writes the node's files where the host has them, so that the flat file
    # names the kubeconfig by the host's path.
    installs = {m["mountPath"]: volumes[m["name"]] for m in install["volumeMounts"]}
    assert installs["/etc/cni/net.d"] == "/etc/cni/net.d"
    assert "--node-config-dir=/etc/cni/net.d/pyabouts.d" in install["command"]
    assert {
        "name": "NODE_NAME",
        "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}},
    } in agent["env"]
