"""Node slices (`node_slice_size`) on the real apiserver: nodes served by their agents through
the node shim each take a slice of the range with compare-and-swap and allocate only from it;
a node too many gets a clear error; the reconciler frees the addresses of a deleted node's pods
and then its slice, which the next node takes (a dry run first names them, freeing nothing)."""

import contextlib
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import netaddr
import pytest

from deploy.local.agent_process import running_agent
from deploy.local.controlplane import ControlPlane
from deploy.local.node_shim import built_shim
from deploy.local.pod_objects import (
    create_namespace,
    create_node,
    create_pod,
    delete_node,
    delete_pod,
)
from pyabouts.ipam.errors import NO_FREE_SLICE
from pyabouts.ipam.slices import REGISTRY_MARK
from pyabouts.plugin.install import install_shim
from tests.integration.plugin_fixtures import kubernetes_datastore, kubernetes_ipam
from tests.integration.plugin_processes import FLAT_FILE_NAME, Node, make_nodes, run_plugins
from tests.integration.reconciler_env import reconcile_once
from tests.integration.stored_state import kubernetes_store, owners_on

pytestmark = pytest.mark.integration

NAMESPACE = "burst"  # where run_plugins' calls say their pods are
RANGE = "10.94.0.0/24"


@pytest.fixture
def nodes(pyabouts_cluster: ControlPlane, tmp_path: Path) -> Iterator[list[Node]]:
    """Five nodes, each with its agent (--node-name node-N, serving its own flat file's
    datastore, as the DaemonSet's does) and a Node object."""
    with contextlib.ExitStack() as stack:
        found = make_nodes(
            tmp_path,
            5,
            kubernetes_datastore(pyabouts_cluster),
            agents=lambda directory: stack.enter_context(
                running_agent(directory, config=directory / FLAT_FILE_NAME)
            ),
        )
        for node in found:
            create_node(pyabouts_cluster, node.name)
            stack.callback(delete_node, pyabouts_cluster, node.name)
        yield found


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The node shim; each call names its node's agent in PYABOUTS_AGENT_SOCKET."""
    directory = tmp_path_factory.mktemp("shim")
    return str(install_shim(directory, built_shim(), socket_path=str(directory / "none.sock")))


def slices_held(cluster: ControlPlane, network: str) -> dict[str, netaddr.IPNetwork]:
    """node -> the slice it holds, as the range's slice registry records it."""
    store = kubernetes_store(str(cluster.kubeconfig))
    try:
        return {
            owner.node: netaddr.IPNetwork(owner.container_id)
            for block in store.read_all_blocks()
            if block.key.pool.network.startswith(f"{network}{REGISTRY_MARK} ")
            for owner in block.entries.values()
        }
    finally:
        store.close()


def addresses_by_node(outcomes: list[tuple[int, Any]], nodes: list[Node]) -> dict[str, list[str]]:
    """The addresses each node's ADDs got (run_plugins spreads calls round-robin)."""
    found: dict[str, list[str]] = {}
    for i, (code, result) in enumerate(outcomes):
        assert code == 0, result
        found.setdefault(nodes[i % len(nodes)].name, []).append(
            result["ips"][0]["address"].split("/")[0]
        )
    return found


def test_each_node_allocates_only_from_its_slice_and_a_gone_nodes_slice_is_reused(
    pyabouts_cluster: ControlPlane,
    reconciler_kubeconfig: Path,
    nodes: list[Node],
    shim: str,
    tmp_path: Path,
) -> None:
    network = f"slices-{uuid.uuid4().hex[:6]}"
    ipam = kubernetes_ipam(
        pyabouts_cluster, range=RANGE, node_slice_size="/26", network_name=network
    )
    create_namespace(pyabouts_cluster, NAMESPACE)
    first_three = nodes[:3]
    containers = [f"{network}-{i:03d}" for i in range(150)]
    # The pods exist (bound to their nodes), so the reconciler below keeps their addresses.
    for i, container in enumerate(containers):
        create_pod(pyabouts_cluster, NAMESPACE, container, node=first_three[i % 3].name)

    outcomes = run_plugins(shim, "ADD", ipam, first_three, containers, in_flight=30)
    given = addresses_by_node(outcomes, first_three)
    held = slices_held(pyabouts_cluster, network)
    assert set(held) == {"node-0", "node-1", "node-2"}
    assert len(set(held.values())) == 3  # a slice each
    for node, addresses in given.items():
        assert len(addresses) == 50
        assert all(netaddr.IPAddress(a) in held[node] for a in addresses), (node, held[node])
    assert len({a for addresses in given.values() for a in addresses}) == 150  # no duplicates

    # A fourth node takes the last slice; a fifth finds none, and is told which and why.
    create_pod(pyabouts_cluster, NAMESPACE, f"{network}-fourth", node="node-3")
    create_pod(pyabouts_cluster, NAMESPACE, f"{network}-fifth", node="node-4")
    (fourth,) = run_plugins(shim, "ADD", ipam, [nodes[3]], [f"{network}-fourth"])
    assert fourth[0] == 0, fourth
    held = slices_held(pyabouts_cluster, network)
    assert netaddr.IPAddress(fourth[1]["ips"][0]["address"].split("/")[0]) in held["node-3"]
    (fifth,) = run_plugins(shim, "ADD", ipam, [nodes[4]], [f"{network}-fifth"])
    code, error = fifth
    assert code != 0 and error["code"] == NO_FREE_SLICE, error
    for part in ("node-4", RANGE, "/26", "node-0, node-1, node-2, node-3"):
        assert part in error["msg"], error["msg"]

    # node-1 is deleted from the cluster, its pods with it (the pod GC's work): the reconciler
    # frees their addresses, then node-1's slice, and the node that had none gets that slice.
    gone_slice = held["node-1"]
    delete_node(pyabouts_cluster, "node-1")
    for container in containers[1::3]:
        delete_pod(pyabouts_cluster, NAMESPACE, container)
    flat = tmp_path / "reconciler.conf"
    flat.write_text(json.dumps(kubernetes_datastore(pyabouts_cluster)))
    # A dry run names the addresses and the slice the pass would free, and frees none of them.
    would = reconcile_once(flat, reconciler_kubeconfig, "--dry-run")
    assert would["dryRun"]
    assert sorted(a["ip"] for a in would["addresses"] if a["network"] == network) == sorted(
        given["node-1"]
    )
    assert [s for s in would["nodeSlicesFreed"] if s["network"] == network] == [
        {"network": network, "slice": str(gone_slice), "node": "node-1"}
    ]
    assert slices_held(pyabouts_cluster, network)["node-1"] == gone_slice
    assert set(given["node-1"]) <= set(owners_on(pyabouts_cluster, network))  # none freed
    # The pods' addresses are judged again a --gone-grace later, in a whole pass, which gives
    # the slice back too: in the same run.
    summary = reconcile_once(flat, reconciler_kubeconfig, "--gone-grace", "1")
    mine = [a for a in summary["addresses"] if a["network"] == network]
    assert sorted(a["ip"] for a in mine) == sorted(given["node-1"])
    assert {a["reason"] for a in mine} == {"pod-gone"}
    assert [s for s in summary["nodeSlicesFreed"] if s["network"] == network] == [
        {"network": network, "slice": str(gone_slice), "node": "node-1"}
    ]
    held = slices_held(pyabouts_cluster, network)
    assert "node-1" not in held
    (again,) = run_plugins(shim, "ADD", ipam, [nodes[4]], [f"{network}-fifth"])
    assert again[0] == 0, again
    assert netaddr.IPAddress(again[1]["ips"][0]["address"].split("/")[0]) in gone_slice
    assert slices_held(pyabouts_cluster, network)["node-4"] == gone_slice


def test_ipv6_slices_honour_exclude_and_the_in_process_plugin_uses_its_nodes_slice(
    pyabouts_cluster: ControlPlane, nodes: list[Node], shim: str
) -> None:
    network = f"slices6-{uuid.uuid4().hex[:6]}"
    ipam = kubernetes_ipam(
        pyabouts_cluster,
        range="fd00:94::/64",
        node_slice_size="66",
        exclude=["fd00:94::/65"],  # the first two of the four slices, whole: never handed out
        network_name=network,
    )
    (by_agent,) = run_plugins(shim, "ADD", ipam, [nodes[0]], [f"{network}-a"])
    (other,) = run_plugins(shim, "ADD", ipam, [nodes[1]], [f"{network}-b"])
    # No agent on the call: the plugin serves it in-process, as node-0 (NODE_NAME).
    in_process = str(Path(sys.executable).parent / "pyabouts")
    alone = Node(nodes[0].flat_file, agent=None)
    (by_plugin,) = run_plugins(in_process, "ADD", ipam, [alone], [f"{network}-c"])
    held = slices_held(pyabouts_cluster, network)
    assert set(held) == {"node-0", "node-1"}
    assert set(held.values()) == {  # one each, of the two left
        netaddr.IPNetwork("fd00:94:0:0:8000::/66"),
        netaddr.IPNetwork("fd00:94:0:0:c000::/66"),
    }
    for (code, result), node in ((by_agent, "node-0"), (other, "node-1"), (by_plugin, "node-0")):
        assert code == 0, result
        address = result["ips"][0]["address"]
        assert address.endswith("/64")  # the pod's prefix is the range's, not the slice's
        assert netaddr.IPAddress(address.split("/")[0]) in held[node]
