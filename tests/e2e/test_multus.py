"""The Multus quickstarts (shared/seeds) end to end: the real Multus thin plugin reads NADs and
pod annotations from the local apiserver and delegates to macvlan (+ tuning) with pyabouts as the
IPAM, in network namespaces; the reconciler reclaims what a crashed pod leaves behind."""

import ipaddress
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from deploy.local.controlplane import ControlPlane
from deploy.local.netns import addresses_in, exec_in, http_get, ping, serve_http
from deploy.local.pod_runtime import (
    DEFAULT_SUBNET,
    Node,
    RunningPod,
    create_nad,
    macvlan_nad,
    unique,
)
from tests.e2e.conftest import NAMESPACE
from tests.e2e.multus_limits import MULTUS_CANNOT_REPLACE_THE_DEFAULT_ROUTE
from tests.integration.stored_state import table_entries

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def nad(cluster: ControlPlane, master: str, cidr: str, **ipam: Any) -> str:
    """A macvlan + pyabouts NAD with a pool of its own; its name."""
    name = unique("net")
    pool = {
        "range": cidr,
        "network_name": name,
        "kubernetes": {"kubeconfig": str(cluster.kubeconfig)},
    }
    create_nad(cluster, NAMESPACE, name, macvlan_nad(master, pool | ipam))
    return name


def pool_usage(cluster: ControlPlane, network: str) -> dict[str, int]:
    """What `kubectl get ippools` says of the pool: allocated and free, summed over its blocks."""
    listed = json.loads(
        cluster.kubectl("get", "ippools.pyabouts.io", "-n", "kube-system", "-o", "json")
    )
    mine = [i for i in listed["items"] if i["spec"]["network"] == network]
    return {
        "allocated": sum(i["status"]["allocated"] for i in mine),
        "free": sum(i["status"]["free"] for i in mine),
    }


def pool_holders(cluster: ControlPlane, network: str) -> dict[str, str]:
    """Offset in block -> podRef, for the pool's first block."""
    listed = json.loads(
        cluster.kubectl("get", "ippools.pyabouts.io", "-n", "kube-system", "-o", "json")
    )
    return {
        offset: owner.get("podRef", "")
        for item in listed["items"]
        if item["spec"]["network"] == network
        for offset, owner in table_entries(item["spec"]["allocations"]).items()
    }


def address(pod: RunningPod, ifname: str = "net1") -> str:
    [found] = addresses_in(pod.sandbox, ifname)
    return found


def test_a_nad_by_name_gives_net1_a_pool_address_listed_in_network_status(
    node: Node, master: str
) -> None:
    blue = nad(node.cluster, master, "198.51.100.0/24")
    pod = node.run_pod(NAMESPACE, unique("a"), blue)
    assert address(pod) == "198.51.100.1/24"
    [default, attached] = node.network_status(pod)
    assert default["default"] is True and default["interface"] == "eth0"
    [eth0] = default["ips"]  # from the node's pod network (ptp + host-local)
    assert ipaddress.ip_address(eth0) in ipaddress.ip_network(DEFAULT_SUBNET)
    assert (attached["name"], attached["interface"], attached["ips"]) == (
        f"{NAMESPACE}/{blue}",
        "net1",
        ["198.51.100.1"],
    )
    assert pool_usage(node.cluster, blue) == {"allocated": 1, "free": 253}
    table = node.cluster.kubectl("get", "ippools.pyabouts.io", "-n", "kube-system")
    assert any(blue in line and " 1 " in line for line in table.splitlines()), table


def test_client_and_server_over_net1_and_ping_both_ways(node: Node, master: str) -> None:
    net = nad(node.cluster, master, "198.51.100.0/24")
    server = node.run_pod(NAMESPACE, unique("server"), net)
    client = node.run_pod(NAMESPACE, unique("client"), net)
    server_ip, client_ip = (address(p).split("/")[0] for p in (server, client))
    with serve_http(server.sandbox, server_ip, 8080, "hello from the server pod\n") as url:
        assert http_get(client.sandbox, url) == "hello from the server pod\n"
    assert ping(client.sandbox, server_ip) and ping(server.sandbox, client_ip)


def test_a_requested_address_with_interface_and_gateway(node: Node, master: str) -> None:
    net = nad(node.cluster, master, "198.51.100.0/24", gateway="198.51.100.1")
    wanted = "198.51.100.200"
    # Multus v4.2.3 reads the gateway request from "default-route" (its types.go); "gateway",
    # as the quickstart writes it, is not a key it knows, so the annotation gives both. (The
    # route itself: see the xfail below.)
    gateway = ["198.51.100.1"]
    annotation = [
        {
            "name": net,
            "interface": "my-intf",
            "ips": [f"{wanted}/24"],
            "gateway": gateway,
            "default-route": gateway,
        }
    ]
    pod = node.run_pod(NAMESPACE, unique("req"), annotation)
    assert addresses_in(pod.sandbox, "my-intf") == [f"{wanted}/24"]
    assert pool_holders(node.cluster, net) == {"200": pod.ref}  # reserved in the pool

    other = unique("other")
    uid = node.create_pod(NAMESPACE, other, [{"name": net, "ips": [f"{wanted}/24"]}])
    with pytest.raises(RuntimeError, match="already allocated"):
        node.start_pod(NAMESPACE, other, uid)
    # A pod that requests nothing gets the lowest free address, never the gateway's.
    assert address(node.run_pod(NAMESPACE, unique("plain"), net)) == "198.51.100.2/24"


def test_a_conflist_with_ips_and_mac_capabilities_honours_both(node: Node, master: str) -> None:
    name = unique("tuned")
    ipam = {
        "range": "198.51.100.0/24",
        "network_name": name,
        "kubernetes": {"kubeconfig": str(node.cluster.kubeconfig)},
    }
    conflist = {
        "cniVersion": "0.3.1",
        "name": name,
        "plugins": [
            macvlan_nad(master, ipam, capabilities={"ips": True}),
            {"type": "tuning", "capabilities": {"mac": True}},
        ],
    }
    create_nad(node.cluster, NAMESPACE, name, conflist)
    mac = "c2:b0:57:49:47:f1"
    pod = node.run_pod(
        NAMESPACE, unique("mac"), [{"name": name, "ips": ["198.51.100.77/24"], "mac": mac}]
    )
    assert address(pod) == "198.51.100.77/24"
    link = json.loads(exec_in(pod.sandbox, ["ip", "-j", "link", "show", "net1"]).stdout)
    assert link[0]["address"] == mac


def test_two_attachments_come_from_their_own_pools(node: Node, master: str) -> None:
    first = nad(node.cluster, master, "198.51.100.0/25")
    second = nad(node.cluster, master, "198.51.100.128/25")
    pod = node.run_pod(NAMESPACE, unique("two"), f"{first},{second}")
    assert (address(pod, "net1"), address(pod, "net2")) == ("198.51.100.1/25", "198.51.100.129/25")
    listed = {(e["name"], e["interface"], tuple(e["ips"])) for e in node.network_status(pod)}
    assert {
        (f"{NAMESPACE}/{first}", "net1", ("198.51.100.1",)),
        (f"{NAMESPACE}/{second}", "net2", ("198.51.100.129",)),
    } <= listed


def test_deleted_pods_free_their_addresses_and_a_crashed_pod_is_reclaimed(
    node: Node, master: str
) -> None:
    net = nad(node.cluster, master, "198.51.100.0/24")
    stopped = node.run_pod(NAMESPACE, unique("stop"), net)
    crashed = node.run_pod(NAMESPACE, unique("crash"), net)
    assert pool_usage(node.cluster, net)["allocated"] == 2
    node.stop_pod(stopped)  # DEL through Multus
    assert pool_holders(node.cluster, net) == {"2": crashed.ref}

    node.crash_pod(crashed)  # force-deleted, no DEL ever
    assert pool_holders(node.cluster, net) == {"2": crashed.ref}  # leaked until reclaimed
    reconciler = str(Path(sys.executable).parent / "pyabouts-reconciler")
    done = subprocess.run(
        # Its sandbox is gone with it here (no kubelet): the gone grace alone is waited for.
        [reconciler, "--kubeconfig", str(node.cluster.kubeconfig), "--stop-grace", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    reclaimed = [a for a in json.loads(done.stdout)["addresses"] if a["network"] == net]
    assert [(a["ip"], a["reason"]) for a in reclaimed] == [("198.51.100.2", "pod-gone")]
    assert pool_holders(node.cluster, net) == {}
    following = node.run_pod(NAMESPACE, unique("next"), net)
    assert address(following) == "198.51.100.1/24"
    again = node.run_pod(NAMESPACE, unique("next"), net)
    assert address(again) == "198.51.100.2/24"  # the reclaimed address serves the next pod


@pytest.mark.xdist_group("processes")
@pytest.mark.machine_wide  # a hundred plugin processes at once
def test_a_burst_of_50_pods_with_two_attachments_each(
    node: Node, master: str, capsys: pytest.CaptureFixture[str]
) -> None:
    first = nad(node.cluster, master, "198.51.100.0/25")
    second = nad(node.cluster, master, "198.51.100.128/25")
    names = [unique(f"burst{n:02d}") for n in range(50)]
    # Pod objects first, as after scheduling; then the ADDs 10 at a time: Multus thin gives up
    # on a pod it cannot read within 2.5 s, which 50 at once on two cores can exceed.
    uids = [node.create_pod(NAMESPACE, name, f"{first},{second}") for name in names]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=10) as pool:
        pods = list(pool.map(lambda n: node.start_pod(NAMESPACE, names[n], uids[n]), range(50)))
    wall = time.monotonic() - started
    net1 = [address(p, "net1") for p in pods]
    net2 = [address(p, "net2") for p in pods]
    assert len(set(net1)) == len(set(net2)) == 50
    assert pool_usage(node.cluster, first)["allocated"] == 50
    assert pool_usage(node.cluster, second)["allocated"] == 50
    with capsys.disabled():
        print(f"\n50 pods x 2 pyabouts attachments through Multus: {wall:.1f} s wall")


@MULTUS_CANNOT_REPLACE_THE_DEFAULT_ROUTE
def test_the_requested_gateway_becomes_the_pods_default_route(node: Node, master: str) -> None:
    net = nad(node.cluster, master, "198.51.100.0/24", gateway="198.51.100.1")
    gateway = ["198.51.100.1"]
    annotation = [{"name": net, "interface": "my-intf", "default-route": gateway}]
    pod = node.run_pod(NAMESPACE, unique("gw"), annotation)
    route = exec_in(pod.sandbox, ["ip", "-4", "route", "show", "default"]).stdout
    assert route.split()[:5] == ["default", "via", "198.51.100.1", "dev", "my-intf"], route
