"""Many `pyabouts` processes at once, from simulated nodes, on one small pool in real etcd."""

import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.etcd_fixtures import EtcdServer
from tests.integration.plugin_fixtures import NodeAgents
from tests.integration.plugin_processes import make_nodes, run_plugins, served_log
from tests.integration.stored_state import stored_allocations

# Hundreds of interpreters at once: never beside each other on the two cores, and given time.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.xdist_group("processes"),
    pytest.mark.machine_wide,  # hundreds of plugin processes at once
    pytest.mark.timeout(1800),
]

POOL = {"range": "10.50.0.0/24", "range_end": "10.50.0.200"}  # exactly 200 usable: .1 to .200


def test_200_at_once_then_200_dels_then_250_for_200_addresses(
    pyabouts_exe: str, etcd_server: EtcdServer, tmp_path: Path, node_agents: NodeAgents
) -> None:
    network = f"burst-{uuid.uuid4().hex[:8]}"
    nodes = make_nodes(
        tmp_path, 4, {"datastore": "etcd", "etcd_host": etcd_server.endpoint}, node_agents
    )
    ipam = POOL | {"network_name": network}
    pods = [f"pod-{i:03d}" for i in range(200)]

    added = run_plugins(pyabouts_exe, "ADD", ipam, nodes, pods)
    assert [code for code, _ in added] == [0] * 200, [r for c, r in added if c][:3]
    addresses = [result["ips"][0]["address"] for _, result in added]
    assert len(set(addresses)) == 200
    assert set(addresses) == {f"10.50.0.{i}/24" for i in range(1, 201)}
    stored = stored_allocations(etcd_server, network)
    assert sorted(owner["containerID"] for owner in stored.values()) == pods
    for (_, result), pod in zip(added, pods, strict=True):
        offset = result["ips"][0]["address"].split("/")[0].rsplit(".", 1)[1]
        assert stored[f"10.50.0.0/24+{offset}"]["containerID"] == pod
    assert all("ADD" in served_log(node) for node in nodes)  # every node served some

    deleted = run_plugins(pyabouts_exe, "DEL", ipam, nodes, pods)
    assert [code for code, _ in deleted] == [0] * 200
    assert stored_allocations(etcd_server, network) == {}

    more = [f"more-{i:03d}" for i in range(250)]
    outcomes = run_plugins(pyabouts_exe, "ADD", ipam, nodes, more)
    codes = Counter(0 if code == 0 else result["code"] for code, result in outcomes)
    assert codes == {0: 200, 100: 50}
    given = [r["ips"][0]["address"] for c, r in outcomes if c == 0]
    assert len(set(given)) == 200
