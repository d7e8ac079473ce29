"""The netns harness against real parts only: macvlan + Debian's host-local IPAM, no pyabouts."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest

from deploy.local.netns import (
    CNI_REFERENCE_DIR,
    HarnessError,
    Pod,
    addresses_in,
    host_link_exists,
    http_get,
    link_exists,
    macvlan_master,
    netns_names,
    pids_in,
    ping,
    plugin_bin_dir,
    pod_namespace,
    run_cni,
    serve_http,
    wait_for_addresses,
)

pytestmark = pytest.mark.integration

MACVLAN = f"{CNI_REFERENCE_DIR}/macvlan"
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
        conf = macvlan_conf(master, "203.0.113.0/24", tmp_path / "data", ipam_type="pyabouts")
        [cidr] = add(pod, conf, "ctr-p", cni_path)
        assert ipaddress.ip_interface(cidr) in ipaddress.ip_network("203.0.113.0/24")
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
