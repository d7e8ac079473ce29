"""The chain users run: the real macvlan plugin delegating to pyabouts, allocations in real etcd.

Two network namespaces stand in for pods. macvlan (Debian's reference plugin, mode bridge, its
master one end of a veth pair) finds ``pyabouts`` through CNI_PATH, exactly as it would under
Multus. Each test checks the addresses in the namespaces against the CNI results and against what
pyabouts stored in etcd, and sends real traffic between the pods (198.51.100.0/24 and
2001:db8::/32 only, always from inside a namespace).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import etcd3
import pytest

from deploy.local.netns import (
    CNI_REFERENCE_DIR,
    HarnessError,
    Pod,
    addresses_in,
    http_get,
    link_exists,
    macvlan_master,
    ping,
    plugin_bin_dir,
    pod_namespace,
    run_cni,
    serve_http,
    wait_for_addresses,
)
from tests.integration.etcd_fixtures import EtcdServer
from tests.integration.stored_state import table_entries, without_node_and_time

pytestmark = pytest.mark.integration

MACVLAN = f"{CNI_REFERENCE_DIR}/macvlan"
IFNAME = "net1"
POD_NAMESPACE = "chain-test"
POOLS_PREFIX = "/pyabouts/v1/pools/"

V4_RANGE = "198.51.100.0/24"
V4_START = "198.51.100.10"
V4_GATEWAY = "198.51.100.1"
V6_RANGE = "2001:db8:c4a1::/64"
V6_START = "2001:db8:c4a1::10"
REQUESTED_V4 = "198.51.100.77"

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class Attachment:
    """One pod's net1 as the CNI ADD reported it."""

    pod: Pod
    pod_name: str
    container_id: str
    addresses: tuple[Interface, ...]

    def address(self, version: int) -> str:
        """The pod's address of that IP family, without prefix length."""
        [found] = [a for a in self.addresses if a.version == version]
        return str(found.ip)


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("integration tests create network namespaces and links: run them as root")


@pytest.fixture
def cni_path(tmp_path: Path, pyabouts_exe: str) -> str:
    """CNI_PATH with the pyabouts under test (in-process or thin plugin + agent) first."""
    return plugin_bin_dir(tmp_path, pyabouts_exe)


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> Iterator[Any]:
    client = etcd3.client(etcd_server.host, etcd_server.port, timeout=10)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def network_name(request: pytest.FixtureRequest) -> str:
    """A network_name of this test alone, so no test sees another's allocations."""
    return f"chain-{request.node.name.split('[')[-1].rstrip(']')}-{secrets.token_hex(4)}"


# --------------------------------------------------------------------------------------------
# helpers


def netconf(master: str, network_name: str, etcd_server: EtcdServer, dual: bool) -> dict[str, Any]:
    ipam: dict[str, Any] = {
        "type": "pyabouts",
        "range": V4_RANGE,
        "range_start": V4_START,
        "gateway": V4_GATEWAY,
        "datastore": "etcd",
        "etcd_host": etcd_server.endpoint,
        "network_name": network_name,
    }
    if dual:
        ipam["ipRanges"] = [{"range": V6_RANGE, "range_start": V6_START}]
    return {
        "cniVersion": "1.0.0",
        "name": "macvlan-conf",
        "type": "macvlan",
        "master": master,
        "mode": "bridge",
        "ipam": ipam,
    }


def cni_args(pod_name: str, container_id: str, ip: str | None = None) -> str:
    args = [
        "IgnoreUnknown=1",
        f"K8S_POD_NAMESPACE={POD_NAMESPACE}",
        f"K8S_POD_NAME={pod_name}",
        f"K8S_POD_INFRA_CONTAINER_ID={container_id}",
    ]
    if ip is not None:
        args.append(f"IP={ip}")
    return ";".join(args)


def macvlan_add(
    pod: Pod, pod_name: str, conf: dict[str, Any], cni_path: str, ip: str | None = None
) -> tuple[str, Any]:
    """ADD through macvlan, which must succeed: the container ID it was made for, its result."""
    container_id = f"ctr-{pod_name}-{secrets.token_hex(4)}"
    result = run_cni(
        MACVLAN,
        "ADD",
        conf,
        container_id=container_id,
        netns=pod.netns_path,
        ifname=IFNAME,
        cni_path=cni_path,
        cni_args=cni_args(pod_name, container_id, ip),
    ).expect_success()
    return container_id, result


def add(
    pod: Pod, pod_name: str, conf: dict[str, Any], cni_path: str, ip: str | None = None
) -> Attachment:
    """ADD through macvlan; check the result against the addresses found in the namespace."""
    container_id, result = macvlan_add(pod, pod_name, conf, cni_path, ip)
    assert isinstance(result, dict), result
    [iface] = [i for i in result["interfaces"] if i["name"] == IFNAME]
    assert iface["sandbox"] == pod.netns_path
    addresses = tuple(ipaddress.ip_interface(entry["address"]) for entry in result["ips"])
    in_netns = {ipaddress.ip_interface(a) for a in addresses_in(pod, IFNAME)}
    assert in_netns == set(addresses), f"namespace has {in_netns}, CNI result says {result}"
    return Attachment(pod, pod_name, container_id, addresses)


def delete(attachment: Attachment, conf: dict[str, Any], cni_path: str) -> None:
    call = run_cni(
        MACVLAN,
        "DEL",
        conf,
        container_id=attachment.container_id,
        netns=attachment.pod.netns_path,
        ifname=IFNAME,
        cni_path=cni_path,
    )
    call.expect_success()
    assert call.result is None


def stored_allocations(etcd: Any, network_name: str) -> dict[str, dict[str, str]]:
    """Address -> stored owner, over every block pyabouts keeps for ``network_name``."""
    found: dict[str, dict[str, str]] = {}
    for value, _meta in etcd.get_prefix(POOLS_PREFIX):
        block = json.loads(value)
        if block["network"] != network_name:
            continue
        base = ipaddress.ip_network(block["cidr"]).network_address
        for offset, owner in table_entries(block["allocations"]).items():
            found[str(base + int(offset))] = without_node_and_time(owner)
    return found


def expected_owner(attachment: Attachment) -> dict[str, str]:
    return {
        "containerID": attachment.container_id,
        "ifname": IFNAME,
        "podRef": f"{POD_NAMESPACE}/{attachment.pod_name}",
        "cniNetwork": "macvlan-conf",
    }


def expected_allocations(*attachments: Attachment) -> dict[str, dict[str, str]]:
    return {str(a.ip): expected_owner(att) for att in attachments for a in att.addresses}


def in_range(address: Interface) -> bool:
    """Whether the address lies in the configured range of its family, at or after its start."""
    cidr, start = (V4_RANGE, V4_START) if address.version == 4 else (V6_RANGE, V6_START)
    return address.network == ipaddress.ip_network(cidr) and int(address.ip) >= int(
        ipaddress.ip_address(start)
    )


def versions(dual: bool) -> tuple[int, ...]:
    return (4, 6) if dual else (4,)


# --------------------------------------------------------------------------------------------
# tests

FAMILIES = pytest.mark.parametrize("dual", [False, True], ids=["v4", "dual-stack"])


@FAMILIES
def test_two_pods_get_addresses_talk_and_free_them(
    dual: bool, cni_path: str, etcd_server: EtcdServer, etcd: Any, network_name: str
) -> None:
    with (
        macvlan_master("chain") as master,
        pod_namespace("chain-a") as pod_a,
        pod_namespace("chain-b") as pod_b,
    ):
        conf = netconf(master, network_name, etcd_server, dual)
        a = add(pod_a, "pod-a", conf, cni_path)
        b = add(pod_b, "pod-b", conf, cni_path)

        # Distinct addresses, one per family, from the configured ranges.
        assert sorted(x.version for x in a.addresses) == list(versions(dual))
        assert not set(a.addresses) & set(b.addresses)
        assert all(in_range(x) for x in (*a.addresses, *b.addresses)), (a, b)
        assert stored_allocations(etcd, network_name) == expected_allocations(a, b)

        # IPv6 addresses carry traffic only once duplicate address detection is over.
        for attachment in (a, b):
            wait_for_addresses(attachment.pod, IFNAME, expected=len(attachment.addresses))

        for version in versions(dual):
            assert ping(pod_a, b.address(version)), f"IPv{version} ping a -> b"
            assert ping(pod_b, a.address(version)), f"IPv{version} ping b -> a"
            body = f"hello over IPv{version} from pod b\n"
            with serve_http(pod_b, b.address(version), 8080, body) as url:
                assert http_get(pod_a, url) == body

        delete(a, conf, cni_path)
        assert not link_exists(pod_a, IFNAME)
        assert stored_allocations(etcd, network_name) == expected_allocations(b)
        delete(b, conf, cni_path)
        assert not link_exists(pod_b, IFNAME)
        assert stored_allocations(etcd, network_name) == {}

        # DEL is idempotent: nothing left to free is not an error.
        delete(a, conf, cni_path)
        delete(b, conf, cni_path)
        assert stored_allocations(etcd, network_name) == {}


@FAMILIES
def test_pod_gets_the_address_it_asks_for_in_cni_args(
    dual: bool, cni_path: str, etcd_server: EtcdServer, etcd: Any, network_name: str
) -> None:
    with (
        macvlan_master("chainip") as master,
        pod_namespace("chain-a") as pod_a,
        pod_namespace("chain-c") as pod_c,
    ):
        conf = netconf(master, network_name, etcd_server, dual)
        a = add(pod_a, "pod-a", conf, cni_path)
        c = add(pod_c, "pod-c", conf, cni_path, ip=f"{REQUESTED_V4}/24")

        assert c.address(4) == REQUESTED_V4
        assert f"{REQUESTED_V4}/24" in addresses_in(pod_c, IFNAME)
        if dual:  # only the IPv4 address was asked for; IPv6 comes from the pool
            assert c.address(6) != a.address(6)
        assert stored_allocations(etcd, network_name) == expected_allocations(a, c)

        wait_for_addresses(pod_c, IFNAME, expected=len(c.addresses))
        wait_for_addresses(pod_a, IFNAME, expected=len(a.addresses))
        assert ping(pod_a, REQUESTED_V4)

        # Another pod asking for the same address is refused, and keeps nothing.
        with pod_namespace("chain-d") as pod_d:
            container_id = "ctr-pod-d"
            refused = run_cni(
                MACVLAN,
                "ADD",
                conf,
                container_id=container_id,
                netns=pod_d.netns_path,
                ifname=IFNAME,
                cni_path=cni_path,
                cni_args=cni_args("pod-d", container_id, REQUESTED_V4),
            )
            assert refused.returncode != 0
            assert isinstance(refused.result, dict)
            assert REQUESTED_V4 in refused.result["msg"], refused.result
            assert stored_allocations(etcd, network_name) == expected_allocations(a, c)
            # macvlan 1.1.1 leaves its link behind when IPAM fails; a DEL clears it up.
            assert addresses_in(pod_d, IFNAME) == []
            run_cni(
                MACVLAN,
                "DEL",
                conf,
                container_id=container_id,
                netns=pod_d.netns_path,
                ifname=IFNAME,
                cni_path=cni_path,
            ).expect_success()
            assert not link_exists(pod_d, IFNAME)
            assert stored_allocations(etcd, network_name) == expected_allocations(a, c)

        delete(c, conf, cni_path)
        delete(a, conf, cni_path)
        assert stored_allocations(etcd, network_name) == {}
        with pytest.raises(HarnessError):
            addresses_in(pod_c, IFNAME)


def test_a_legacy_cni_version_chain_gets_one_address_of_each_family_and_frees_them(
    cni_path: str, etcd_server: EtcdServer, etcd: Any, network_name: str
) -> None:
    """cniVersion 0.2.0, as whereabouts takes it: macvlan reads pyabouts' "ip4"/"ip6" result
    (libcni's conversion of it), puts both addresses in the pod, and its DEL frees them."""
    with macvlan_master("chainold") as master, pod_namespace("chain-old") as pod:
        conf = netconf(master, network_name, etcd_server, dual=True) | {"cniVersion": "0.2.0"}
        container_id, result = macvlan_add(pod, "pod-old", conf, cni_path)
        assert isinstance(result, dict) and result["cniVersion"] == "0.2.0", result
        addresses = (
            ipaddress.ip_interface(result["ip4"]["ip"]),
            ipaddress.ip_interface(result["ip6"]["ip"]),
        )
        assert result["ip4"]["gateway"] == V4_GATEWAY
        assert all(in_range(a) for a in addresses), result
        assert {ipaddress.ip_interface(a) for a in addresses_in(pod, IFNAME)} == set(addresses)
        attachment = Attachment(pod, "pod-old", container_id, addresses)
        assert stored_allocations(etcd, network_name) == expected_allocations(attachment)
        delete(attachment, conf, cni_path)
        assert stored_allocations(etcd, network_name) == {}
