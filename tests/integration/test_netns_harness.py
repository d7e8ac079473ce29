"""The netns harness against real parts only: macvlan, ptp + Debian's host-local IPAM, no pyabouts;
and its refusal of host-side ranges that overlap the host's own routes."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from deploy.local.controlplane import ControlPlane
from deploy.local.netns import (
    CNI_REFERENCE_DIR,
    HarnessError,
    Pod,
    RouteOverlapError,
    addresses_in,
    host_link_exists,
    host_routes,
    http_get,
    link_exists,
    macvlan_master,
    netns_names,
    pids_in,
    ping,
    plugin_bin_dir,
    pod_namespace,
    refuse_overlapping_routes,
    run_cni,
    serve_http,
    wait_for_addresses,
)
from deploy.local.pod_runtime import DEFAULT_SUBNET, Node

pytestmark = pytest.mark.integration

MACVLAN = f"{CNI_REFERENCE_DIR}/macvlan"
PTP = f"{CNI_REFERENCE_DIR}/ptp"
HOST_LOCAL = f"{CNI_REFERENCE_DIR}/host-local"
IFNAME = "net1"


@pytest.fixture(autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("integration tests create network namespaces and links: run them as root")


def macvlan_conf(
    master: str, subnet: str, data_dir: Path, ipam_type: str = "host-local"
) -> dict[str, Any]:
    return {
        "cniVersion": "0.4.0",
        "name": "harness-net",
        "type": "macvlan",
        "master": master,
        "mode": "bridge",
        "ipam": {
            "type": ipam_type,
            "ranges": [[{"subnet": subnet}]],
            "dataDir": str(data_dir),
        },
    }


def add(pod: Pod, conf: dict[str, Any], container_id: str, cni_path: str) -> list[str]:
    """ADD through macvlan; return the CIDRs from the result after checking them in the pod."""
    result = run_cni(
        MACVLAN,
        "ADD",
        conf,
        container_id=container_id,
        netns=pod.netns_path,
        ifname=IFNAME,
        cni_path=cni_path,
    ).expect_success()
    assert isinstance(result, dict)
    [iface] = [i for i in result["interfaces"] if i["name"] == IFNAME]
    assert iface["sandbox"] == pod.netns_path
    cidrs = [ip["address"] for ip in result["ips"]]
    assert cidrs
    assert sorted(addresses_in(pod, IFNAME)) == sorted(cidrs)
    return cidrs


def delete(pod: Pod, conf: dict[str, Any], container_id: str, cni_path: str) -> None:
    call = run_cni(
        MACVLAN,
        "DEL",
        conf,
        container_id=container_id,
        netns=pod.netns_path,
        ifname=IFNAME,
        cni_path=cni_path,
    )
    call.expect_success()
    assert call.result is None


@pytest.mark.parametrize("subnet", ["198.51.100.0/24", "2001:db8:4e57::/64"], ids=["v4", "v6"])
def test_two_pods_on_macvlan_with_host_local(tmp_path: Path, subnet: str) -> None:
    data_dir = tmp_path / "host-local"
    network = ipaddress.ip_network(subnet)
    with (
        macvlan_master("hm") as master,
        pod_namespace("harness-a") as pod_a,
        pod_namespace("harness-b") as pod_b,
    ):
        conf = macvlan_conf(master, subnet, data_dir)
        assert link_exists(pod_a, "lo") and not link_exists(pod_a, IFNAME)

        [cidr_a] = add(pod_a, conf, "ctr-a", CNI_REFERENCE_DIR)
        [cidr_b] = add(pod_b, conf, "ctr-b", CNI_REFERENCE_DIR)
        ip_a = str(ipaddress.ip_interface(cidr_a).ip)
        ip_b = str(ipaddress.ip_interface(cidr_b).ip)
        assert ip_a != ip_b
        assert ipaddress.ip_interface(cidr_a).network == network
        assert ipaddress.ip_interface(cidr_b).network == network
        # host-local records each allocation as a file named after the address.
        assert {p.name for p in (data_dir / "harness-net").iterdir()} >= {ip_a, ip_b}

        # IPv6 addresses are unusable while duplicate address detection runs (macvlan already
        # waits for it to finish, which makes each v6 ADD take about 2 s).
        assert wait_for_addresses(pod_a, IFNAME) == [cidr_a]
        assert wait_for_addresses(pod_b, IFNAME) == [cidr_b]

        assert ping(pod_a, ip_b)
        assert ping(pod_b, ip_a)

        with serve_http(pod_b, ip_b, 8080, "hello from pod b\n") as url:
            assert http_get(pod_a, url) == "hello from pod b\n"
        with pytest.raises(HarnessError):  # the server is gone
            http_get(pod_a, url, timeout=2)

        delete(pod_a, conf, "ctr-a", CNI_REFERENCE_DIR)
        assert not link_exists(pod_a, IFNAME)
        assert not ping(pod_b, ip_a, count=1, deadline=1)
        delete(pod_a, conf, "ctr-a", CNI_REFERENCE_DIR)  # DEL is idempotent
        delete(pod_b, conf, "ctr-b", CNI_REFERENCE_DIR)
        assert not link_exists(pod_b, IFNAME)
        assert not {p.name for p in (data_dir / "harness-net").iterdir()} & {ip_a, ip_b}


def test_plugin_bin_dir_puts_pyabouts_first_on_cni_path(tmp_path: Path) -> None:
    # host-local stands in for the pyabouts executable: macvlan must find it as "pyabouts".
    cni_path = plugin_bin_dir(tmp_path, HOST_LOCAL)
    bin_dir = tmp_path / "cni-bin"
    assert cni_path == f"{bin_dir}:{CNI_REFERENCE_DIR}"
    assert (bin_dir / "pyabouts").resolve() == Path(HOST_LOCAL).resolve()
    assert plugin_bin_dir(tmp_path, HOST_LOCAL) == cni_path  # idempotent

    with macvlan_master("hp") as master, pod_namespace("harness-p") as pod:
        conf = macvlan_conf(master, "198.51.100.0/24", tmp_path / "data", ipam_type="pyabouts")
        [cidr] = add(pod, conf, "ctr-p", cni_path)
        assert ipaddress.ip_interface(cidr) in ipaddress.ip_network("198.51.100.0/24")
        delete(pod, conf, "ctr-p", cni_path)
        assert not link_exists(pod, IFNAME)

        # Without the bin dir, macvlan cannot find a plugin called "pyabouts".
        failed = run_cni(
            MACVLAN,
            "ADD",
            conf,
            container_id="ctr-q",
            netns=pod.netns_path,
            ifname=IFNAME,
            cni_path=CNI_REFERENCE_DIR,
        )
        assert failed.returncode != 0
        assert isinstance(failed.result, dict) and "pyabouts" in failed.result["msg"]
        # macvlan 1.1.1 does not roll back its link when the IPAM plugin fails (a shadowed `err`
        # in its cleanup defer): net1 stays behind, down and without addresses, until a DEL
        # succeeds or the namespace goes away.
        assert link_exists(pod, IFNAME) and addresses_in(pod, IFNAME) == []


def test_plugin_errors_come_back_as_json(tmp_path: Path) -> None:
    with pod_namespace("harness-e") as pod:
        conf = macvlan_conf("nosuchmaster0", "198.51.100.0/24", tmp_path / "data")
        call = run_cni(
            MACVLAN,
            "ADD",
            conf,
            container_id="ctr-e",
            netns=pod.netns_path,
            ifname=IFNAME,
            cni_path=CNI_REFERENCE_DIR,
        )
        assert call.returncode != 0
        assert isinstance(call.result, dict)
        # macvlan 1.1.1 reports a missing master only as {"code": 999, "msg": "Link not found"}.
        assert isinstance(call.result["code"], int) and "not found" in call.result["msg"]
        with pytest.raises(AssertionError, match="Link not found"):
            call.expect_success()
        with pytest.raises(HarnessError):
            addresses_in(pod, IFNAME)
        with (
            pytest.raises(HarnessError, match="Cannot assign requested address"),
            serve_http(pod, "198.51.100.99", 8080, "never"),
        ):
            pytest.fail("serve_http must not yield when it cannot bind")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cleanup_happens_when_the_test_body_fails() -> None:
    seen: list[str] = []
    server_pids: list[int] = []
    with (
        pytest.raises(RuntimeError, match="boom"),
        macvlan_master("hx") as master,
        pod_namespace("harness-x") as pod,
        serve_http(pod, "127.0.0.1", 8080, "loopback inside the pod") as url,
    ):
        seen += [master, pod.name]
        assert host_link_exists(master) and pod.name in netns_names()
        assert os.path.exists(pod.netns_path)
        assert http_get(pod, url) == "loopback inside the pod"
        server_pids += pids_in(pod)
        assert server_pids
        raise RuntimeError("boom")
    master, name = seen
    assert not any(_process_exists(pid) for pid in server_pids)
    assert not host_link_exists(master)
    assert not host_link_exists(master[:-1] + "p")  # the veth peer
    assert name not in netns_names()
    assert not os.path.exists(f"/var/run/netns/{name}")


# ---- host-side ranges: what the pod harness (ptp's host routes) may use


def test_the_default_pod_subnet_overlaps_no_route_of_this_host() -> None:
    refuse_overlapping_routes(DEFAULT_SUBNET)


def _own_address() -> tuple[ipaddress.IPv4Network, str]:
    """The host's address on the device of its default route (192.0.2.2 on eth0 here)."""
    routes = host_routes(4)
    devices = [r.device for r in routes if r.destination.prefixlen == 0 and r.table == "main"]
    assert devices, "this host has no IPv4 default route (every machine here has one)"
    [own, *_] = [r for r in routes if r.kind == "local" and r.device == devices[0]]
    assert isinstance(own.destination, ipaddress.IPv4Network)
    return own.destination, devices[0]


def test_a_pod_network_on_the_hosts_own_network_is_refused(tmp_path: Path) -> None:
    own, device = _own_address()
    around = own.supernet(new_prefix=28)  # the LAN's route and the host's own address
    with pytest.raises(RouteOverlapError) as refused:
        refuse_overlapping_routes(str(around))
    message = str(refused.value)
    assert message.startswith(f"pod network {around} overlaps the host route")
    assert f"local {own} dev {device} table local" in message
    assert message.endswith(": pick another range")
    # A node refuses it before it sets anything up (the control plane is never started here).
    with pytest.raises(RouteOverlapError, match=f"pod network {around} overlaps"):
        Node(ControlPlane(tmp_path / "cp"), tmp_path / "node", "true", "n", subnet=str(around))
    assert not (tmp_path / "node").exists()


def test_the_package_mirrors_range_is_refused_though_only_the_default_route_leads_there() -> None:
    with pytest.raises(RouteOverlapError, match=r"203\.0\.113\.0/24 \(the package mirrors"):
        refuse_overlapping_routes("203.0.113.0/25")


@pytest.mark.parametrize(
    ("routed", "inside", "beside"),
    [
        ("198.19.250.0/24", "198.19.250.128/25", "198.19.251.0/24"),
        ("2001:db8:fa::/64", "2001:db8:fa::/112", "2001:db8:fb::/64"),
    ],
    ids=["v4", "v6"],
)
def test_a_range_routed_to_a_veth_is_refused_until_the_veth_goes(
    routed: str, inside: str, beside: str
) -> None:
    with macvlan_master("hr") as veth:  # a veth pair, both ends on the host
        family = "-6" if ":" in routed else "-4"
        subprocess.run(["ip", family, "route", "add", routed, "dev", veth], check=True)
        with pytest.raises(RouteOverlapError) as refused:
            refuse_overlapping_routes(inside)
        assert str(refused.value) == (
            f"pod network {inside} overlaps the host route {routed} dev {veth}: pick another range"
        )
        refuse_overlapping_routes(beside)  # the free range next to it
    refuse_overlapping_routes(inside)  # the route went with its device


def test_routes_to_the_pods_of_a_node_sharing_the_range_do_not_count(tmp_path: Path) -> None:
    # What another node of the pod harness does (the other xdist worker): ptp + host-local.
    subnet = "198.19.252.0/28"
    conf = {
        "cniVersion": "0.4.0",
        "name": "harness-ptp",
        "type": "ptp",
        "ipam": {"type": "host-local", "subnet": subnet, "dataDir": str(tmp_path / "data")},
    }

    def ptp(command: str, pod: Pod) -> Any:
        call = run_cni(
            PTP,
            command,
            conf,
            container_id="ctr-r",
            netns=pod.netns_path,
            ifname="eth0",
            cni_path=CNI_REFERENCE_DIR,
        )
        return call.expect_success()

    with pod_namespace("harness-r") as pod:
        result = ptp("ADD", pod)
        pod_ip = ipaddress.ip_interface(result["ips"][0]["address"]).ip
        routed = {r.destination: r.device for r in host_routes(4)}
        assert routed[ipaddress.ip_network(pod_ip)].startswith("veth")  # ptp's route to the pod
        refuse_overlapping_routes(subnet)
        ptp("DEL", pod)
