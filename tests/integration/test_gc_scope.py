"""CNI GC is scoped like the runtime that calls it, and NADs on one range share its pool: on
the real apiserver, through real plugin processes, in-process and through one agent per node.

A runtime's `cni.dev/valid-attachments` lists only its own node's attachments of that network
configuration, so GC may free only what that node allocated for that configuration.
"""

import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from deploy.local.controlplane import ControlPlane
from deploy.local.netns import CniCall
from tests.integration.plugin_fixtures import NodeAgents, kubernetes_ipam
from tests.integration.plugin_processes import Node, cni, make_nodes
from tests.integration.stored_state import stored

pytestmark = pytest.mark.integration


def call(
    exe: str, node: Node, command: str, conf: dict[str, Any], container: str = "gc"
) -> CniCall:
    """One call on `node`, as its runtime makes it (its agent, or NODE_NAME in-process)."""
    env = {"NODE_NAME": node.name}
    if node.agent is not None:
        env["PYABOUTS_AGENT_SOCKET"] = str(node.agent.socket)
    return cni(exe, command, conf, container, extra_env=env)


def nad(name: str, ipam: dict[str, Any], node: Node) -> dict[str, Any]:
    """A NetworkAttachmentDefinition's config as `node`'s runtime hands it over."""
    ipam = ipam | {"type": "pyabouts", "configuration_path": str(node.flat_file)}
    return {"cniVersion": "1.1.0", "name": name, "type": "macvlan", "ipam": ipam}


def gc(exe: str, node: Node, conf: dict[str, Any], valid: list[str]) -> None:
    attachments = [{"containerID": c, "ifname": "net1"} for c in valid]
    call(exe, node, "GC", conf | {"cni.dev/valid-attachments": attachments}).expect_success()


@pytest.fixture
def three_nodes(
    tmp_path: Path, pyabouts_cluster: ControlPlane, node_agents: NodeAgents
) -> list[Node]:
    store = {"kubernetes": {"kubeconfig": str(pyabouts_cluster.kubeconfig)}}
    return make_nodes(tmp_path, 3, store, node_agents)


def test_gc_on_a_node_frees_only_its_own_stale_entries_of_that_network(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane, three_nodes: list[Node]
) -> None:
    node_a, node_b, idle = three_nodes
    network = f"gc-{uuid.uuid4().hex[:6]}"
    ipam = kubernetes_ipam(pyabouts_cluster, range="10.90.0.0/24", network_name=network)

    def holders() -> list[str]:
        return sorted(stored(pyabouts_cluster, network).values())

    blue = nad("blue", ipam, node_a)
    for container in ("a1", "a2", "a3"):
        call(pyabouts_exe, node_a, "ADD", blue, container).expect_success()
    for container in ("b1", "b2", "b3"):
        call(pyabouts_exe, node_b, "ADD", nad("blue", ipam, node_b), container).expect_success()
    red = nad("red", ipam, node_a)  # another NAD sharing the pool (same network_name)
    for container in ("r1", "r2"):
        call(pyabouts_exe, node_a, "ADD", red, container).expect_success()
    assert holders() == ["a1", "a2", "a3", "b1", "b2", "b3", "r1", "r2"]

    gc(pyabouts_exe, node_a, blue, ["a1", "a3"])  # a2 is gone from node A's runtime
    assert holders() == ["a1", "a3", "b1", "b2", "b3", "r1", "r2"]

    gc(pyabouts_exe, node_a, red, ["r2"])  # red's own list frees red's stale entry only
    assert holders() == ["a1", "a3", "b1", "b2", "b3", "r2"]

    # A runtime that GCs at start-up with an empty list, on a node that made nothing.
    gc(pyabouts_exe, idle, nad("blue", ipam, idle), [])
    gc(pyabouts_exe, idle, nad("red", ipam, idle), [])
    assert holders() == ["a1", "a3", "b1", "b2", "b3", "r2"]

    # The addresses node B holds were never freed, so node A's next ADDs never get them.
    held_by_b = {a for a, c in stored(pyabouts_cluster, network).items() if c.startswith("b")}
    for container in ("a4", "a5", "a6", "a7"):
        result = call(pyabouts_exe, node_a, "ADD", blue, container).expect_success()
        assert result["ips"][0]["address"].split("/")[0] not in held_by_b


def test_two_nads_on_one_range_share_its_pool_whatever_overlap_protection_says(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane, three_nodes: list[Node]
) -> None:
    node = three_nodes[0]
    ipam = kubernetes_ipam(pyabouts_cluster, range="10.91.0.0/24")
    strict = nad("strict", ipam | {"network_name": f"share-{uuid.uuid4().hex[:6]}"}, node)
    relaxed = nad("relaxed", strict["ipam"] | {"enable_overlapping_ranges": False}, node)
    given = [
        call(pyabouts_exe, node, "ADD", conf, f"share-{i}").expect_success()["ips"][0]["address"]
        for i in range(20)
        for conf in [(strict, relaxed)[i % 2]]
    ]
    assert [address for address, n in Counter(given).items() if n > 1] == []


def test_del_and_gc_free_what_a_config_narrowed_since_no_longer_gives(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane, three_nodes: list[Node]
) -> None:
    """An exclusion or a bound added while pods hold addresses there: their DEL (or GC) with
    the config as it is now frees them. They answered success and freed nothing, leaving the
    addresses held until the reconciler found the pods gone."""
    node = three_nodes[0]
    network = f"narrowed-{uuid.uuid4().hex[:6]}"
    ipam = kubernetes_ipam(pyabouts_cluster, range="10.92.0.0/24", network_name=network)
    for container in ("n1", "n2", "n3"):
        call(pyabouts_exe, node, "ADD", nad("net", ipam, node), container).expect_success()
    assert sorted(stored(pyabouts_cluster, network).values()) == ["n1", "n2", "n3"]
    narrowed = ipam | {"exclude": ["10.92.0.1/32"], "range_start": "10.92.0.3"}
    call(pyabouts_exe, node, "DEL", nad("net", narrowed, node), "n1").expect_success()
    gc(pyabouts_exe, node, nad("net", narrowed, node), ["n3"])  # n2 is gone from the runtime
    assert stored(pyabouts_cluster, network) == {"10.92.0.3": "n3"}
