"""The Multus quickstarts (`shared/seeds/`) as real pods on the local cluster, driven only by
kubectl: Multus installed from its own DaemonSet manifest (thin; image built here), pyabouts by
`kubectl apply -k`, NADs and annotated pods applied, then `kubectl exec` to look and to talk.

The NADs' ranges are disjoint (/26s of 198.51.100.0/24), with one veth end as the macvlan master;
pings and HTTP requests run inside the pods. The cluster is the whole host's: the module runs in
the "processes" group.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.local.cluster import Cluster
from deploy.local.commands import run_command
from deploy.local.controlplane import ControlPlane
from deploy.local.multus_install import install_multus, multus_overlay, uninstall_multus
from deploy.local.netns import macvlan_master
from deploy.local.node_components import CONTAINERD_SOCKET
from tests.e2e.local_cluster import CLUSTER_MODULE_MARKS, cluster_with_pyabouts, kube_json
from tests.integration.stored_state import stored

pytestmark = CLUSTER_MODULE_MARKS

NAMESPACE = "default"
TEST_IMAGE = "localhost/pyabouts-test:1"
NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
AGENT = "daemonset/pyabouts-agent"
#: Multus thin keeps each sandbox's delegates here until their DEL (its CNIDir).
MULTUS_CACHE = Path("/var/lib/cni/multus")


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def cluster(state_dir: Path) -> Iterator[ControlPlane]:
    """The cluster with pyabouts and Multus; the pods go before Multus and pyabouts do (their
    DELs run through both), then Multus, then pyabouts and the cluster."""
    with cluster_with_pyabouts(state_dir) as control_plane:
        overlay = multus_overlay(state_dir / "multus")
        install_multus(control_plane, overlay)
        try:
            yield control_plane
        finally:
            for kind in ("deployments", "pods"):
                control_plane.kubectl_run(
                    "delete", kind, "--all", "-n", NAMESPACE, "--wait=true", "--timeout=120s"
                )
            uninstall_multus(control_plane, overlay)


@pytest.fixture(scope="module")
def master() -> Iterator[str]:
    with macvlan_master("seeds") as name:
        yield name


def apply(cluster: ControlPlane, *documents: dict[str, Any]) -> None:
    listed = {"apiVersion": "v1", "kind": "List", "items": list(documents)}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(listed))


def macvlan_nad(name: str, master: str, cidr: str, **plugin: Any) -> dict[str, Any]:
    """The quickstart's NAD: macvlan in bridge mode on `master`, pyabouts as IPAM."""
    config = {
        "cniVersion": "0.3.1",
        "type": "macvlan",
        "master": master,
        "mode": "bridge",
        **plugin,
        "ipam": {"type": "pyabouts", "range": cidr, "network_name": name},
    }
    return nad(name, config)


def nad(name: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"config": json.dumps(config)},
    }


def pod(name: str, networks: str, command: str = "sleep 3600") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "annotations": {"k8s.v1.cni.cncf.io/networks": networks},
        },
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": TEST_IMAGE, "command": ["sh", "-c", command]}],
        },
    }


def wait_ready(cluster: ControlPlane, *names: str) -> None:
    pods = [f"pod/{name}" for name in names]
    cluster.kubectl("wait", "--for=condition=Ready", *pods, "-n", NAMESPACE, "--timeout=120s")


def run(cluster: ControlPlane, name: str, *command: str) -> str:
    return cluster.kubectl("exec", "-n", NAMESPACE, name, "--", *command)


def address_of(cluster: ControlPlane, name: str, interface: str = "net1") -> str:
    """`interface`'s IPv4 address with its prefix, as `ip` shows it inside the pod."""
    shown = run(cluster, name, "ip", "-4", "-o", "addr", "show", interface).split()
    return shown[shown.index("inet") + 1]


def network_status(cluster: ControlPlane, name: str) -> list[dict[str, Any]]:
    annotations = kube_json(cluster, "get", "pod", name, "-n", NAMESPACE)["metadata"]
    return list(json.loads(annotations["annotations"][NETWORK_STATUS]))


def ip(address: str) -> str:
    return address.split("/", maxsplit=1)[0]


@pytest.fixture(scope="module")
def macvlan_conf(cluster: ControlPlane, master: str) -> str:
    """The quickstart's NAD (a /26 of its own) and its two pods, Ready."""
    apply(
        cluster,
        macvlan_nad("macvlan-conf", master, "198.51.100.0/26"),
        pod("samplepod", "macvlan-conf"),
        # seed 000: a server on net1 (busybox httpd; the quickstart's serves a directory)
        pod(
            "server",
            "macvlan-conf",
            "echo served-over-net1 > /tmp/index.html && httpd -f -p 8080 -h /tmp",
        ),
    )
    wait_ready(cluster, "samplepod", "server")
    return "macvlan-conf"


def test_a_pod_annotated_by_name_gets_net1_from_the_pool(
    cluster: ControlPlane, macvlan_conf: str
) -> None:
    address = address_of(cluster, "samplepod")
    assert address.endswith("/26") and address.startswith("198.51.100.")
    status = {entry["interface"]: entry for entry in network_status(cluster, "samplepod")}
    assert status["net1"]["name"] == f"{NAMESPACE}/{macvlan_conf}"
    assert status["net1"]["ips"] == [ip(address)]
    assert status["eth0"]["default"] is True  # the cluster's own network stays the default
    held = stored(cluster, macvlan_conf)
    assert ip(address) in held
    listed = cluster.kubectl("get", "ippools", "-n", "kube-system")
    assert "198.51.100.0/26" in listed


def test_client_and_server_over_net1(cluster: ControlPlane, macvlan_conf: str) -> None:
    server = ip(address_of(cluster, "server"))
    request = f"printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {server} 8080"
    answer = run(cluster, "samplepod", "sh", "-c", request)
    assert "200 OK" in answer and "served-over-net1" in answer


def test_ping_between_two_pods_over_net1(cluster: ControlPlane, macvlan_conf: str) -> None:
    there = ip(address_of(cluster, "server"))
    back = ip(address_of(cluster, "samplepod"))
    assert "2 packets received" in run(cluster, "samplepod", "ping", "-c", "2", "-W", "5", there)
    assert "2 packets received" in run(cluster, "server", "ping", "-c", "2", "-W", "5", back)


def test_a_pod_with_two_extra_networks_gets_one_address_from_each(
    cluster: ControlPlane, master: str
) -> None:
    apply(
        cluster,
        macvlan_nad("first", master, "198.51.100.64/26"),
        macvlan_nad("second", master, "198.51.100.128/26"),
        pod("two-networks", "first,second"),
    )
    wait_ready(cluster, "two-networks")
    first, second = address_of(cluster, "two-networks"), address_of(cluster, "two-networks", "net2")
    assert first.startswith("198.51.100.") and int(ip(first).rsplit(".")[-1]) in range(65, 127)
    assert int(ip(second).rsplit(".")[-1]) in range(129, 191)
    status = {
        e["interface"]: (e["name"], e["ips"]) for e in network_status(cluster, "two-networks")
    }
    assert status["net1"] == (f"{NAMESPACE}/first", [ip(first)])
    assert status["net2"] == (f"{NAMESPACE}/second", [ip(second)])
    assert ip(first) in stored(cluster, "first") and ip(second) in stored(cluster, "second")


def test_the_json_annotation_with_interface_ips_and_mac_reserves_the_address(
    cluster: ControlPlane, master: str
) -> None:
    """Seed 002: a conflist of macvlan (the `ips` capability) and tuning (`mac`)."""
    conflist = {
        "cniVersion": "0.3.1",
        "name": "tuned",
        "plugins": [
            {
                "type": "macvlan",
                "capabilities": {"ips": True},
                "master": master,
                "mode": "bridge",
                "ipam": {"type": "pyabouts", "range": "198.51.100.192/26", "network_name": "tuned"},
            },
            {"type": "tuning", "capabilities": {"mac": True}},
        ],
    }
    mac = "c2:b0:57:49:47:f1"
    request = [{"name": "tuned", "interface": "data0", "ips": ["198.51.100.200/26"], "mac": mac}]
    apply(cluster, nad("tuned", conflist), pod("tuned", json.dumps(request)))
    wait_ready(cluster, "tuned")
    assert address_of(cluster, "tuned", "data0") == "198.51.100.200/26"
    assert mac in run(cluster, "tuned", "ip", "link", "show", "data0")
    assert "198.51.100.200" in stored(cluster, "tuned")  # reserved in the pool
    apply(cluster, pod("tuned-next", "tuned"))
    wait_ready(cluster, "tuned-next")
    assert address_of(cluster, "tuned-next") == "198.51.100.193/26"


def test_deleting_a_pod_frees_its_address(cluster: ControlPlane, master: str) -> None:
    apply(cluster, macvlan_nad("short-lived", master, "198.19.1.0/26"), pod("brief", "short-lived"))
    wait_ready(cluster, "brief")
    address = ip(address_of(cluster, "brief"))
    assert address in stored(cluster, "short-lived")
    cluster.kubectl("delete", "pod", "brief", "-n", NAMESPACE, "--wait=true", "--timeout=60s")
    # Multus ran the DEL through pyabouts when kubelet tore the sandbox down.
    assert stored(cluster, "short-lived") == {}


def pod_addresses(cluster: ControlPlane, selector: str) -> dict[str, str]:
    """net1's address of each pod matching `selector`, from its network-status annotation."""
    listed = kube_json(cluster, "get", "pods", "-n", NAMESPACE, "-l", selector)["items"]
    found = {}
    for item in listed:
        status = json.loads(item["metadata"]["annotations"][NETWORK_STATUS])
        (net1,) = [entry for entry in status if entry["interface"] == "net1"]
        found[item["metadata"]["name"]] = net1["ips"][0]
    return found


def agent_pods(cluster: ControlPlane) -> set[str]:
    selector = "app.kubernetes.io/name=pyabouts-agent"
    listed = kube_json(cluster, "get", "pods", "-n", "kube-system", "-l", selector)["items"]
    return {item["metadata"]["name"] for item in listed}


def deployment(name: str, networks: str, replicas: int) -> dict[str, Any]:
    one = pod(name, networks)
    template = {
        "metadata": {"labels": {"app": name}, "annotations": one["metadata"]["annotations"]},
        "spec": one["spec"],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": template,
        },
    }


def test_a_force_deleted_pod_on_a_stopped_kubelet_is_reclaimed_and_its_address_reused(
    cluster: ControlPlane, master: str, state_dir: Path
) -> None:
    """kubelet is down, so no DEL runs for the force-deleted pod: the reconciler frees its
    address, the next pod gets it, and the sandbox's late DEL (kubelet back) leaves it be."""
    apply(cluster, macvlan_nad("reclaim", master, "198.19.1.64/26"), pod("orphan", "reclaim"))
    wait_ready(cluster, "orphan")
    address = ip(address_of(cluster, "orphan"))
    orphan_sandbox = stored(cluster, "reclaim")[address]
    node = Cluster.load(state_dir)
    assert node is not None
    kubelet = node.processes["kubelet"]
    kubelet.stop()
    try:
        cluster.kubectl("delete", "pod", "orphan", "-n", NAMESPACE, "--force", "--grace-period=0")
        deadline = time.monotonic() + 30
        while address in stored(cluster, "reclaim"):
            assert time.monotonic() < deadline, "the reconciler did not free the address"
            time.sleep(0.25)
    finally:
        kubelet.start()
        node.save()  # its new pid, for `down`
    apply(cluster, pod("successor", "reclaim"))
    wait_ready(cluster, "successor")
    assert ip(address_of(cluster, "successor")) == address
    # kubelet, back, tears the orphan's sandbox down: Multus' DEL reaches pyabouts (its cache
    # of that sandbox goes), and frees nothing of the successor's.
    deadline = time.monotonic() + 60
    while (MULTUS_CACHE / orphan_sandbox).exists():
        assert time.monotonic() < deadline, "the orphan's sandbox was never torn down"
        time.sleep(0.5)
    held = stored(cluster, "reclaim")
    assert list(held) == [address] and held[address] != orphan_sandbox


def test_a_rolling_update_of_the_agent_while_pods_are_created_loses_nothing(
    cluster: ControlPlane, master: str
) -> None:
    """The agent's pod is replaced (a new image tag) while 20 pods start: some ADDs find no
    agent and kubelet retries them, but every pod ends Running with an address of its own, and
    the pool holds exactly theirs."""
    spec = kube_json(cluster, "get", AGENT, "-n", "kube-system")["spec"]["template"]["spec"]
    current = spec["containers"][0]["image"]
    updated = f"{current}-update"
    ctr = ["ctr", "--address", str(CONTAINERD_SOCKET), "-n", "k8s.io"]
    run_command([*ctr, "images", "tag", "--force", current, updated])
    before = agent_pods(cluster)
    apply(cluster, macvlan_nad("rolling", master, "198.19.1.128/26"))
    apply(cluster, deployment("rolling", "rolling", 20))
    cluster.kubectl(
        "set", "image", AGENT, "-n", "kube-system", f"agent={updated}", f"install={updated}"
    )
    try:
        cluster.kubectl("rollout", "status", AGENT, "-n", "kube-system", "--timeout=180s")
        cluster.kubectl(
            "rollout", "status", "deployment/rolling", "-n", NAMESPACE, "--timeout=300s"
        )
        assert agent_pods(cluster).isdisjoint(before)  # replaced
        retried = cluster.kubectl(
            "get",
            "events",
            "-n",
            NAMESPACE,
            "--field-selector=reason=FailedCreatePodSandBox",
            "-o",
            "name",
        )
        print(f"sandboxes kubelet had to retry during the update: {len(retried.split())}")
        addresses = pod_addresses(cluster, "app=rolling")
        assert len(addresses) == 20
        assert len(set(addresses.values())) == 20, addresses
        assert set(stored(cluster, "rolling")) == set(addresses.values())
        cluster.kubectl("scale", "deployment/rolling", "-n", NAMESPACE, "--replicas=0")
        cluster.kubectl(
            "wait", "--for=delete", "pod", "-l", "app=rolling", "-n", NAMESPACE, "--timeout=120s"
        )
        assert stored(cluster, "rolling") == {}
    finally:
        cluster.kubectl(
            "set", "image", AGENT, "-n", "kube-system", f"agent={current}", f"install={current}"
        )
        cluster.kubectl("rollout", "status", AGENT, "-n", "kube-system", "--timeout=180s")
