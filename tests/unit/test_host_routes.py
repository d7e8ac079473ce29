"""Which host routes keep a test network off a range: the rule, on routes and links as `ip -j`
prints them on these machines (no kernel needed); the real check is in
tests/integration/test_netns_harness.py."""

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from deploy.local.netns import (
    PACKAGE_MIRRORS,
    HostRoute,
    nameservers,
    parse_routes,
    pod_veths,
    routes_in_the_way,
)
from deploy.local.pod_runtime import DEFAULT_SUBNET

# `ip -j -4 route show table all` on this machine, with one pod of a ptp network (198.19.0.2 on
# veth4781e3f0, its gateway 198.19.0.1 as a local address there).
V4_ROUTES: list[dict[str, Any]] = [
    {"dst": "default", "gateway": "192.0.2.1", "dev": "eth0", "flags": []},
    {"dst": "192.0.2.0/24", "dev": "eth0", "protocol": "kernel", "scope": "link"},
    {"dst": "198.19.0.2", "dev": "veth4781e3f0", "scope": "host", "flags": []},
    {"type": "local", "dst": "127.0.0.0/8", "dev": "lo", "table": "local"},
    {"type": "local", "dst": "192.0.2.2", "dev": "eth0", "table": "local"},
    {"type": "broadcast", "dst": "192.0.2.255", "dev": "eth0", "table": "local"},
    {"type": "local", "dst": "198.19.0.1", "dev": "veth4781e3f0", "table": "local"},
]
V6_ROUTES: list[dict[str, Any]] = [
    {"dst": "fd00::/64", "dev": "eth0", "protocol": "kernel", "metric": 256},
    {"dst": "default", "gateway": "fd00::1", "dev": "eth0", "metric": 1024},
    {"type": "local", "dst": "fd00::2", "dev": "eth0", "table": "local"},
    {"type": "multicast", "dst": "ff00::/8", "dev": "eth0", "table": "local"},
]
# `ip -j -d link show`, cut down: eth0, a pod's veth (its peer in another namespace) and a veth
# pair with both ends on the host (a macvlan master).
LINKS: list[dict[str, Any]] = [
    {"ifname": "lo"},
    {"ifname": "eth0"},
    {"ifname": "veth4781e3f0", "link_netnsid": 0, "linkinfo": {"info_kind": "veth"}},
    {"ifname": "hm1a2b3cm", "linkinfo": {"info_kind": "veth"}},
    {"ifname": "hm1a2b3cp", "linkinfo": {"info_kind": "veth"}},
]


def in_the_way(network: str, routes: list[HostRoute], links: list[dict[str, Any]]) -> list[str]:
    return [str(route) for route in routes_in_the_way(ipaddress.ip_network(network), routes, links)]


def test_routes_parse_with_their_table_kind_and_device() -> None:
    routes = parse_routes(V4_ROUTES, 4)
    assert [str(r) for r in routes] == [
        "0.0.0.0/0 dev eth0",
        "192.0.2.0/24 dev eth0",
        "198.19.0.2/32 dev veth4781e3f0",
        "local 127.0.0.0/8 dev lo table local",
        "local 192.0.2.2/32 dev eth0 table local",
        "broadcast 192.0.2.255/32 dev eth0 table local",
        "local 198.19.0.1/32 dev veth4781e3f0 table local",
    ]
    assert str(parse_routes(V6_ROUTES, 6)[1]) == "::/0 dev eth0"
    assert str(parse_routes([{"type": "blackhole", "dst": "198.18.9.0/24"}], 4)[0]) == (
        "blackhole 198.18.9.0/24"
    )


def test_the_hosts_own_network_and_addresses_are_in_the_way() -> None:
    routes = parse_routes(V4_ROUTES, 4)
    assert in_the_way("192.0.2.0/24", routes, LINKS) == [
        "192.0.2.0/24 dev eth0",
        "local 192.0.2.2/32 dev eth0 table local",
        "broadcast 192.0.2.255/32 dev eth0 table local",
    ]
    assert in_the_way("192.0.0.0/16", routes, LINKS)[0] == "192.0.2.0/24 dev eth0"  # a supernet
    assert in_the_way("127.0.0.0/24", routes, LINKS) == ["local 127.0.0.0/8 dev lo table local"]
    v6 = parse_routes(V6_ROUTES, 6)
    assert in_the_way("fd00::/120", v6, LINKS) == [
        "fd00::/64 dev eth0",
        "local fd00::2/128 dev eth0 table local",
    ]


def test_default_routes_and_the_other_family_do_not_count() -> None:
    routes = parse_routes(V4_ROUTES + V6_ROUTES, 4) + parse_routes(V6_ROUTES, 6)
    assert in_the_way("198.51.100.0/24", routes, LINKS) == []
    assert in_the_way("2001:db8::/64", routes, LINKS) == []


def test_routes_to_pods_of_a_shared_range_do_not_count() -> None:
    # Another node of the pod harness on the same range (the other xdist worker) has a pod.
    assert pod_veths(LINKS) == {"veth4781e3f0"}
    assert in_the_way("198.19.0.0/25", parse_routes(V4_ROUTES, 4), LINKS) == []


def test_a_route_on_a_veth_that_is_not_a_pods_counts() -> None:
    on_master = [
        {"dst": "198.19.0.2", "dev": "hm1a2b3cm"},  # a single address, but both ends on the host
        {"dst": "198.19.0.64/26", "dev": "veth4781e3f0"},  # a pod's veth, but a whole subnet
    ]
    assert in_the_way("198.19.0.0/25", parse_routes(on_master, 4), LINKS) == [
        "198.19.0.2/32 dev hm1a2b3cm",
        "198.19.0.64/26 dev veth4781e3f0",
    ]


def test_routes_of_a_device_gone_since_do_not_count_and_deviceless_ones_do() -> None:
    routes = parse_routes(
        [
            {"dst": "198.19.0.0/24", "dev": "vanished0"},  # listed before its link went away
            {"type": "blackhole", "dst": "198.19.0.0/26"},
        ],
        4,
    )
    assert in_the_way("198.19.0.0/25", routes, LINKS) == ["blackhole 198.19.0.0/26"]


def test_nameservers_come_from_resolv_conf(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "# generated\nsearch example.org\nnameserver 10.255.255.53\nnameserver fd00::53\n"
        "nameserver not-an-address\noptions ndots:1\n"
    )
    assert [str(n) for n in nameservers(resolv)] == ["10.255.255.53/32", "fd00::53/128"]
    assert nameservers(tmp_path / "missing") == []


@pytest.mark.parametrize(
    "other",
    [
        str(PACKAGE_MIRRORS),  # the package mirrors' range: never on the host side
        "198.51.100.0/24",  # the NADs' pools, inside pods
        "198.18.0.0/24",  # a kubelet cluster's cni0 bridge (the environment notes)
        "192.0.2.0/24",  # the machine's eth0
    ],
)
def test_the_default_pod_subnet_stays_clear_of(other: str) -> None:
    default = ipaddress.IPv4Network(DEFAULT_SUBNET)
    assert default.subnet_of(ipaddress.IPv4Network("198.18.0.0/15"))  # a benchmarking range
    assert not default.overlaps(ipaddress.ip_network(other))
