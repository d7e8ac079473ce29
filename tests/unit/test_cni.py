from typing import Any

import pytest

from pyabouts.ipam.errors import DECODE_FAILURE, INCOMPATIBLE_VERSION, INVALID_ENVIRONMENT, CniError
from pyabouts.plugin.cni import (
    IpConfig,
    check_one_address_per_family,
    check_version,
    decode_netconf,
    parse_cni_args,
    render_result,
)

KUBELET_ARGS = (
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;"
    "K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234"
)


def test_kubelet_cni_args_parse() -> None:
    args = parse_cni_args(KUBELET_ARGS)
    assert args["K8S_POD_NAME"] == "web-0"
    assert args["K8S_POD_UID"] == "1234"


def test_repeated_keys_are_tolerated_as_multus_sends_them() -> None:
    args = parse_cni_args("IgnoreUnknown=true;K8S_POD_NAME=a;IgnoreUnknown=1;MAC=00:11:22:33:44:55")
    assert args["IgnoreUnknown"] == "1"
    assert args["MAC"] == "00:11:22:33:44:55"


def test_unknown_keys_are_refused_without_ignore_unknown() -> None:
    with pytest.raises(CniError) as excinfo:
        parse_cni_args("K8S_POD_NAME=a;FOO=bar")
    assert excinfo.value.code == INVALID_ENVIRONMENT
    assert "FOO" in excinfo.value.msg
    assert parse_cni_args("IgnoreUnknown=1;FOO=bar")["FOO"] == "bar"


@pytest.mark.parametrize("text", ["novalue", "=x", "A=1;;junk"])
def test_malformed_cni_args_are_code_4(text: str) -> None:
    with pytest.raises(CniError) as excinfo:
        parse_cni_args(text)
    assert excinfo.value.code == INVALID_ENVIRONMENT


def test_empty_cni_args_are_fine() -> None:
    assert parse_cni_args("") == {}


@pytest.mark.parametrize(
    ("command", "version", "ok"),
    [
        ("ADD", "0.3.0", True),
        ("ADD", "1.1.0", True),
        ("ADD", "0.2.0", True),
        ("DEL", "0.1.0", True),
        ("ADD", "0.0.9", False),
        ("ADD", "2.0.0", False),
        ("CHECK", "0.3.1", False),
        ("CHECK", "0.4.0", True),
        ("GC", "1.0.0", False),
        ("GC", "1.1.0", True),
        ("STATUS", "1.0.0", False),
        ("STATUS", "1.1.0", True),
    ],
)
def test_versions_and_commands(command: str, version: str, ok: bool) -> None:
    if ok:
        check_version(command, version)
    else:
        with pytest.raises(CniError) as excinfo:
            check_version(command, version)
        assert excinfo.value.code == INCOMPATIBLE_VERSION


IPS = [IpConfig("192.0.2.5/24", 4, "192.0.2.1"), IpConfig("2001:db8::5/64", 6)]


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_old_results_carry_the_ip_version(version: str) -> None:
    result = render_result(version, IPS, routes=[], dns=None)
    assert result == {
        "cniVersion": version,
        "ips": [
            {"version": "4", "address": "192.0.2.5/24", "gateway": "192.0.2.1"},
            {"version": "6", "address": "2001:db8::5/64"},
        ],
    }


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0"])
def test_new_results_have_no_ip_version_and_no_interfaces(version: str) -> None:
    result = render_result(
        version, IPS, routes=[{"dst": "0.0.0.0/0"}], dns={"nameservers": ["192.0.2.53"]}
    )
    assert result == {
        "cniVersion": version,
        "ips": [
            {"address": "192.0.2.5/24", "gateway": "192.0.2.1"},
            {"address": "2001:db8::5/64"},
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["192.0.2.53"]},
    }


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0"])
def test_legacy_results_hold_one_address_of_each_family_with_its_routes(version: str) -> None:
    # As libcni converts a later result to these versions (types/040 convertTo02x): routes go
    # with the address of their destination's family, without CNI 1.1's attributes.
    routes: list[dict[str, Any]] = [
        {"dst": "0.0.0.0/0", "gw": "192.0.2.1", "mtu": 1400},
        {"dst": "2001:db8:1::/48"},
    ]
    result = render_result(version, IPS, routes=routes, dns={"nameservers": ["192.0.2.53"]})
    assert result == {
        "cniVersion": version,
        "ip4": {
            "ip": "192.0.2.5/24",
            "gateway": "192.0.2.1",
            "routes": [{"dst": "0.0.0.0/0", "gw": "192.0.2.1"}],
        },
        "ip6": {"ip": "2001:db8::5/64", "routes": [{"dst": "2001:db8:1::/48"}]},
        "dns": {"nameservers": ["192.0.2.53"]},
    }
    assert render_result(version, IPS[1:], routes=routes, dns=None) == {
        "cniVersion": version,
        "ip6": {"ip": "2001:db8::5/64", "routes": [{"dst": "2001:db8:1::/48"}]},
    }


@pytest.mark.parametrize(
    ("version", "families", "refused"),
    [
        ("0.2.0", [4, 6], False),
        ("0.2.0", [4, 4], True),
        ("0.1.0", [6, 4, 6], True),
        ("0.3.0", [4, 4, 6, 6], False),
    ],
)
def test_a_legacy_version_takes_one_address_of_each_family(
    version: str, families: list[int], refused: bool
) -> None:
    if not refused:
        check_one_address_per_family(version, families)
        return
    with pytest.raises(CniError) as excinfo:
        check_one_address_per_family(version, families)
    assert excinfo.value.code == INCOMPATIBLE_VERSION
    assert "use cniVersion 0.3.0 or later" in excinfo.value.msg


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "a\\ud800", "ipam": {}}',
        '{"ipam": {"network_name": "\\udfff"}}',
        '{"ipam": {"exclude": ["x", "\\ud83d"]}}',
        '{"ipam": {"\\ud800": 1}}',
    ],
)
def test_a_lone_surrogate_anywhere_in_the_config_is_refused_as_not_text(text: str) -> None:
    # Half a character no store can encode: code 6 here, not an internal error at a write.
    with pytest.raises(CniError) as refused:
        decode_netconf(text.encode())
    assert refused.value.code == DECODE_FAILURE and "surrogate" in refused.value.msg


def test_escaped_characters_that_are_whole_are_text() -> None:
    raw = decode_netconf(b'{"name": "caf\\u00e9 \\ud83d\\ude00 C:\\\\users"}')
    assert raw["name"] == "café 😀 C:\\users"
