import json
from pathlib import Path
from typing import Any

import pytest

from pyabouts.ipam.config import (
    NetConf,
    PluginConfig,
    fill_empty,
    load_config,
    requested_addresses,
)
from pyabouts.ipam.errors import INVALID_CONFIG, INVALID_ENVIRONMENT, CniError
from pyabouts.ipam.pool import PoolId
from pyabouts.ipam.stores.flat_file import read_flat_file

WHEREABOUTS_KEYS: dict[str, Any] = {
    "type": "pyabouts",
    "range": "192.0.2.0/24",
    "range_start": "192.0.2.10",
    "range_end": "192.0.2.100",
    "exclude": ["192.0.2.16/28", "192.0.2.50"],
    "ipRanges": [{"range": "2001:db8::/64", "range_start": "2001:db8::10", "exclude": []}],
    "network_name": "blue",
    "enable_overlapping_ranges": False,
    "gateway": "192.0.2.1",
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "198.51.100.0/24", "gw": "192.0.2.254"}],
    "dns": {"nameservers": ["192.0.2.53"], "domain": "example.org", "search": ["example.org"]},
    "addresses": [{"address": "203.0.113.5/24", "gateway": "203.0.113.1"}],
    "log_file": "/tmp/pyabouts.log",
    "log_level": "debug",
    "configuration_path": "/nonexistent/pyabouts.conf",
    "kubernetes": {"kubeconfig": "/etc/cni/net.d/pyabouts.d/pyabouts.kubeconfig"},
    "datastore": "etcd",
    "etcd_host": "127.0.0.1:2379",
    "etcd_username": "u",
    "etcd_password": "p",
    "etcd_key_file": "/k",
    "etcd_cert_file": "/c",
    "etcd_ca_cert_file": "/ca",
    "node_slice_size": "/28",
    # whereabouts-only tuning keys are accepted and ignored
    "leader_lease_duration": 1500,
    "sleep_for_race": 0,
}


def netconf(**ipam: Any) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "net", "type": "macvlan", "ipam": ipam}


def load(raw: dict[str, Any]) -> PluginConfig:
    """load_config with the flat file a plugin process reads (configuration_path, then the
    standard places)."""
    inline = raw.get("ipam")
    return load_config(raw, read_flat_file(inline.get("configuration_path") if inline else None))


def error_of(raw: dict[str, Any]) -> CniError:
    with pytest.raises(CniError) as excinfo:
        load(raw)
    return excinfo.value


def test_every_whereabouts_key_is_accepted_with_its_meaning() -> None:
    config = load_config(netconf(**WHEREABOUTS_KEYS))
    ipam = config.ipam
    assert ipam.network_name == "blue"
    assert ipam.enable_overlapping_ranges is False
    assert ipam.kubernetes.kubeconfig == "/etc/cni/net.d/pyabouts.d/pyabouts.kubeconfig"
    assert ipam.datastore == "etcd"
    assert [r.text for r in config.ranges] == ["192.0.2.0/24", "2001:db8::/64"]
    assert [r.pool for r in config.ranges] == [PoolId("blue", 4), PoolId("blue", 6)]
    assert config.ranges[0].size == 91 - 16 - 1  # .10-.100 less the /28 (.16-.31) and .50
    assert ipam.routes[1].gw == "192.0.2.254"
    assert ipam.addresses[0].address == "203.0.113.5/24"


def test_defaults_follow_whereabouts() -> None:
    ipam = load_config(netconf(type="pyabouts", range="192.0.2.0/24")).ipam
    assert ipam.datastore == "kubernetes"
    assert ipam.enable_overlapping_ranges is True
    assert ipam.network_name == ""
    assert ipam.exclude == []


def test_the_type_must_be_pyabouts_and_the_error_names_key_and_value() -> None:
    error = error_of(netconf(type="whereabouts", range="192.0.2.0/24"))
    assert error.code == INVALID_CONFIG
    assert "ipam.type='whereabouts'" in error.msg
    assert "pyabouts" in error.msg


@pytest.mark.parametrize(
    ("ipam", "named"),
    [
        ({"range": "192.0.2.0/33"}, "ipam.range: '192.0.2.0/33'"),
        ({"range": "192.0.2.0/24", "range_start": "nope"}, "ipam.range_start='nope'"),
        ({"range": "192.0.2.0/24", "gateway": "1.2.3"}, "ipam.gateway='1.2.3'"),
        ({"range": "192.0.2.0/24", "datastore": "consul"}, "ipam.datastore='consul'"),
        ({"range": "192.0.2.0/24", "network_name": "blue#node-slices"}, "'#node-slices'"),
        ({"range": "192.0.2.0/24", "routes": [{"dst": "0.0.0.0/0", "table": -1}]}, "table"),
        ({"range": "192.0.2.0/24", "routes": [{"dst": "x"}]}, "ipam.routes.0.dst='x'"),
        ({"range": "192.0.2.0/24", "addresses": [{"address": "1.1.1.1"}]}, "'1.1.1.1'"),
        ({"range": "192.0.2.0/24", "exclude": ["192.0.2.1", "bad"]}, "ipam.exclude[1]: 'bad'"),
        (
            {"ipRanges": [{"range": "192.0.2.0/24", "exclude": ["bad"]}]},
            "ipam.ipRanges[0].exclude[0]: 'bad'",
        ),
        ({"ipRanges": [{"range": "192.0.2.0/33"}]}, "ipam.ipRanges[0].range: '192.0.2.0/33'"),
        ({"range": "192.0.2.0/24", "enable_overlapping_ranges": "maybe"}, "'maybe'"),
        ({}, "ipam.range or ipam.ipRanges is required"),
    ],
)
def test_bad_values_give_code_7_naming_the_key_and_value(ipam: dict[str, Any], named: str) -> None:
    error = error_of(netconf(type="pyabouts", **ipam))
    assert error.code == INVALID_CONFIG
    assert named in error.msg


def test_a_bad_value_is_repeated_up_to_its_first_100_characters() -> None:
    huge = error_of(netconf(type="pyabouts", range="192.0.2.0/24", gateway="1" * 120_000)).msg
    assert len(huge) < 300 and "(120002 characters)" in huge, huge


def test_a_missing_ipam_section_is_code_7() -> None:
    assert error_of({"cniVersion": "1.0.0", "name": "x"}).code == INVALID_CONFIG


def test_the_flat_file_fills_only_what_the_inline_config_leaves_empty(tmp_path: Path) -> None:
    flat = tmp_path / "pyabouts.conf"
    flat.write_text(
        json.dumps(
            {
                "datastore": "etcd",
                "etcd_host": "10.0.0.1:2379",
                "network_name": "from-flat",
                "kubernetes": {"kubeconfig": "/flat/kubeconfig"},
                "log_level": "debug",
            }
        )
    )
    config = load(
        netconf(
            type="pyabouts",
            range="192.0.2.0/24",
            configuration_path=str(flat),
            network_name="inline",
            etcd_host="",
        )
    )
    assert config.flat_file == str(flat)
    assert config.ipam.network_name == "inline"
    assert config.ipam.etcd_host == "10.0.0.1:2379"  # empty inline value is filled
    assert config.ipam.datastore == "etcd"
    assert config.ipam.kubernetes.kubeconfig == "/flat/kubeconfig"


def test_the_flat_file_is_searched_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "a.conf", tmp_path / "b.conf"
    second.write_text(json.dumps({"network_name": "second"}))
    monkeypatch.setattr("pyabouts.ipam.stores.flat_file.FLAT_FILE_PATHS", (str(first), str(second)))
    config = load(netconf(type="pyabouts", range="192.0.2.0/24"))
    assert config.ipam.network_name == "second"
    first.write_text(json.dumps({"network_name": "first"}))
    assert load(netconf(type="pyabouts", range="192.0.2.0/24")).ipam.network_name == "first"
    explicit = tmp_path / "explicit.conf"
    explicit.write_text(json.dumps({"network_name": "explicit"}))
    config = load(netconf(type="pyabouts", range="192.0.2.0/24", configuration_path=str(explicit)))
    assert config.ipam.network_name == "explicit"


def test_no_flat_file_is_fine_when_the_inline_config_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        "pyabouts.ipam.stores.flat_file.FLAT_FILE_PATHS", (str(tmp_path / "none.conf"),)
    )
    config = load(netconf(type="pyabouts", range="192.0.2.0/24"))
    assert config.flat_file is None


def test_a_broken_flat_file_is_code_7(tmp_path: Path) -> None:
    flat = tmp_path / "pyabouts.conf"
    flat.write_text("{not json")
    error = error_of(netconf(type="pyabouts", range="192.0.2.0/24", configuration_path=str(flat)))
    assert error.code == INVALID_CONFIG
    assert str(flat) in error.msg


def test_values_from_the_flat_file_are_not_repeated_in_errors(tmp_path: Path) -> None:
    flat = tmp_path / "pyabouts.conf"
    flat.write_text(json.dumps({"datastore": "s3cr3t-token", "gateway": "s3cr3t"}))
    error = error_of(
        netconf(type="pyabouts", range="192.0.2.0/24", configuration_path=str(flat), range_end="x")
    )
    assert error.code == INVALID_CONFIG
    assert "ipam.datastore (from the flat file)" in error.msg
    assert "s3cr3t" not in error.msg
    assert "ipam.range_end='x'" in error.msg  # inline values are the caller's own: named


@pytest.mark.parametrize("secret", ["qz", "s3\\cr\net", "s3cr3t-but-longer"])
def test_a_flat_file_value_a_validator_would_quote_is_not_repeated(
    tmp_path: Path, secret: str
) -> None:
    flat = tmp_path / "pyabouts.conf"
    flat.write_text(json.dumps({"gateway": secret}))
    error = error_of(netconf(type="pyabouts", range="192.0.2.0/24", configuration_path=str(flat)))
    assert "ipam.gateway (from the flat file): not a valid value" in error.msg
    assert secret not in error.msg and repr(secret) not in error.msg


def test_identical_ranges_share_one_pool_whatever_enable_overlapping_ranges_says() -> None:
    pools = {
        load_config(netconf(type="pyabouts", range=text, enable_overlapping_ranges=flag))
        .ranges[0]
        .pool
        for text in ("192.0.2.0/24", "192.0.2.0/26")
        for flag in (True, False)
    }
    assert pools == {PoolId("", 4)}


def test_the_gateway_is_never_given_by_the_ranges_of_its_family() -> None:
    config = load_config(
        netconf(
            type="pyabouts",
            range="192.0.2.0/29",
            gateway="192.0.2.1",
            ipRanges=[{"range": "192.0.2.0-192.0.2.3/24"}, {"range": "2001:db8::/126"}],
        )
    )
    spans = [r.spans for r in config.ranges]
    v6 = 0x20010DB8 << 96
    assert spans == [((0xC0000202, 0xC0000206),), ((0xC0000202, 0xC0000203),), ((v6 + 1, v6 + 2),)]
    # A gateway outside the range changes nothing; one that is all the range has, is refused.
    outside = load_config(netconf(type="pyabouts", range="192.0.2.0/29", gateway="192.0.2.9"))
    assert outside.ranges[0].size == 6
    alone = load_config(
        netconf(type="pyabouts", range="192.0.2.1-192.0.2.1/24", gateway="192.0.2.1")
    )
    with pytest.raises(CniError) as refused:
        alone.check_can_give()
    assert refused.value.code == INVALID_CONFIG
    assert refused.value.msg == (
        "invalid network config: ipam.range: '192.0.2.1-192.0.2.1/24': every address is excluded"
    )


def test_a_range_that_gives_nothing_is_refused_for_add_naming_where_it_is_written() -> None:
    config = load_config(
        netconf(
            type="pyabouts",
            range="10.0.0.0/24",
            ipRanges=[{"range": "10.1.0.0/24"}, {"range": "10.0.0.0/32"}],
            node_slice_size="/26",
        )
    )
    assert [bool(r.unusable) for r in config.ranges] == [False, False, True]
    assert [s.range.text for s in config.slices] == ["10.0.0.0/24", "10.1.0.0/24"]
    with pytest.raises(CniError) as refused:
        config.check_can_give()
    assert refused.value.msg == (
        "invalid network config: ipam.ipRanges[1].range: '10.0.0.0/32': a /32 has no usable address"
    )


def test_fill_empty_merges_objects_recursively() -> None:
    merged = fill_empty(
        {"a": "", "b": {"x": None, "y": 1}}, {"a": 1, "b": {"x": 2, "y": 3}, "c": 4}
    )
    assert merged == {"a": 1, "b": {"x": 2, "y": 1}, "c": 4}


def test_requested_addresses_come_from_three_channels_in_order() -> None:
    raw = netconf(type="pyabouts", range="192.0.2.0/24")
    raw["capabilities"] = {"ips": True}
    raw["runtimeConfig"] = {"ips": ["192.0.2.5/24"]}
    raw["args"] = {"cni": {"ips": ["192.0.2.6", "192.0.2.5"]}}
    got = requested_addresses(NetConf.model_validate(raw), "192.0.2.7/24,2001:db8::7")
    assert [str(a) for a in got] == ["192.0.2.5", "192.0.2.6", "192.0.2.7", "2001:db8::7"]


def test_runtime_config_ips_count_only_with_the_ips_capability() -> None:
    raw = netconf(type="pyabouts", range="192.0.2.0/24")
    raw["runtimeConfig"] = {"ips": ["192.0.2.5/24"]}
    assert requested_addresses(NetConf.model_validate(raw), None) == []


def test_a_malformed_requested_address_names_its_source_and_whose_error_it_is() -> None:
    """CNI_ARGS is the runtime's environment (code 4); args.cni.ips is the config's (7)."""
    raw = netconf(type="pyabouts", range="192.0.2.0/24")
    with pytest.raises(CniError) as excinfo:
        requested_addresses(NetConf.model_validate(raw), "192.0.2.300")
    assert excinfo.value.code == INVALID_ENVIRONMENT
    assert "CNI_ARGS IP" in excinfo.value.msg
    assert "192.0.2.300" in excinfo.value.msg
    raw["args"] = {"cni": {"ips": ["192.0.2.300"]}}
    with pytest.raises(CniError) as excinfo:
        requested_addresses(NetConf.model_validate(raw), None)
    assert excinfo.value.code == INVALID_CONFIG
    assert "args.cni.ips[0]" in excinfo.value.msg


def test_empty_and_null_values_are_keys_not_given() -> None:
    """As whereabouts reads them: a templated NAD renders an unset value as "" or null."""
    config = load(
        netconf(
            type="pyabouts",
            range="192.0.2.0/29",
            range_start="",
            range_end=None,
            gateway="",
            exclude=None,
            routes=None,
            network_name=None,
            log_level="",
            node_slice_size="",
            ipRanges=[{"range": "2001:db8::/125", "range_start": "", "exclude": None}],
            dns={"nameservers": None, "domain": ""},
            addresses=[{"address": "198.51.100.7/24", "gateway": ""}],
            kubernetes={"kubeconfig": ""},
        )
    )
    ipam = config.ipam
    assert (ipam.range_start, ipam.range_end, ipam.gateway, ipam.log_level) == (None,) * 4
    assert (ipam.exclude, ipam.routes, ipam.network_name, config.slices) == ([], [], "", ())
    assert [rng.size for rng in config.ranges] == [6, 6]
    assert ipam.dns is not None and (ipam.dns.nameservers, ipam.dns.domain) == ([], None)
    assert [(a.address, a.gateway) for a in ipam.addresses] == [("198.51.100.7/24", None)]
    assert ipam.kubernetes.kubeconfig is None


@pytest.mark.parametrize(
    ("given", "level"), [("DEBUG", "debug"), ("warn", "warning"), ("loud", None)]
)
def test_a_log_level_pyabouts_does_not_know_leaves_the_default(
    given: str, level: str | None
) -> None:
    assert (
        load(netconf(type="pyabouts", range="192.0.2.0/29", log_level=given)).ipam.log_level
        == level
    )


def test_routes_keep_the_attributes_of_cni_1_1() -> None:
    route = {"dst": "198.51.100.0/24", "gw": "192.0.2.1", "mtu": 1400, "advmss": 1360}
    route |= {"priority": 5, "table": 100, "scope": 0}
    ipam = load(netconf(type="pyabouts", range="192.0.2.0/29", routes=[route])).ipam
    assert [r.model_dump(exclude_none=True) for r in ipam.routes] == [route]


NODE_ETCD = {
    "datastore": "etcd",
    "etcd_host": "https://etcd.node.internal:2379",
    "etcd_username": "pyabouts",
    "etcd_password": "node-secret",
    "etcd_cert_file": "/etc/pyabouts/client.crt",
    "etcd_key_file": "/etc/pyabouts/client.key",
    "etcd_ca_cert_file": "/etc/pyabouts/ca.crt",
    "etcd_allow_plaintext_password": True,
}


def with_node_etcd(tmp_path: Path, **ipam: Any) -> Any:
    """The ipam settings of a config `ipam` over a flat file of NODE_ETCD."""
    flat = tmp_path / "pyabouts.conf"
    flat.write_text(json.dumps(NODE_ETCD))
    config = netconf(type="pyabouts", range="192.0.2.0/24", configuration_path=str(flat), **ipam)
    return load(config).ipam


def test_the_flat_files_etcd_credentials_never_follow_a_config_to_another_host(
    tmp_path: Path,
) -> None:
    ipam = with_node_etcd(
        tmp_path,
        etcd_host="https://etcd.attacker.example:443",
        etcd_ca_cert_file="/etc/ssl/certs/ca-certificates.crt",
    )
    assert ipam.etcd_host == "https://etcd.attacker.example:443"
    assert ipam.datastore == "etcd"  # the rest of the file still fills the gaps
    assert ipam.etcd_ca_cert_file == "/etc/ssl/certs/ca-certificates.crt"
    assert (ipam.etcd_username, ipam.etcd_password) == (None, None)
    assert (ipam.etcd_cert_file, ipam.etcd_key_file) == (None, None)
    assert ipam.etcd_allow_plaintext_password is False


@pytest.mark.parametrize("key", ["etcd_cert_file", "etcd_key_file"])
def test_a_config_may_not_name_the_nodes_own_client_certificate_for_another_host(
    tmp_path: Path, key: str
) -> None:
    """The flat file's files are withheld from another etcd_host; naming them again inline
    (a NAD's writer can read the node's flat file's paths in the docs) is refused too."""
    own = {"etcd_cert_file": "/etc/cni/net.d/a.crt", "etcd_key_file": "/etc/cni/net.d/a.key"}
    own[key] = "/etc/pyabouts/./" + str(NODE_ETCD[key]).rsplit("/", 1)[1]  # the same file
    with pytest.raises(CniError) as refused:
        with_node_etcd(tmp_path, etcd_host="https://etcd.attacker.example:443", **own)
    assert refused.value.code == INVALID_CONFIG
    assert f"ipam.{key} names the node's own" in refused.value.msg
    # Files of its own, for another etcd, are the config's to name.
    mine = {
        "etcd_cert_file": "/etc/cni/net.d/other/c.crt",
        "etcd_key_file": "/etc/cni/net.d/other/c.key",
    }
    ipam = with_node_etcd(tmp_path, etcd_host="https://etcd.other:2379", **mine)
    assert ipam.etcd_cert_file == mine["etcd_cert_file"]


@pytest.mark.parametrize("inline_host", [None, "", NODE_ETCD["etcd_host"]])
def test_the_flat_files_etcd_credentials_fill_a_config_of_its_own_host(
    tmp_path: Path, inline_host: str | None
) -> None:
    ipam = with_node_etcd(tmp_path, etcd_host=inline_host)
    assert ipam.etcd_host == NODE_ETCD["etcd_host"]
    assert (ipam.etcd_username, ipam.etcd_password) == ("pyabouts", "node-secret")
    assert ipam.etcd_key_file == "/etc/pyabouts/client.key"


def test_routes_and_static_addresses_enter_the_result_as_programs_parse_them() -> None:
    ipam = load(
        netconf(
            type="pyabouts",
            range="192.0.2.0/29",
            routes=[{"dst": " 0.0.0.0/0 ", "gw": "192.0.2.254/24"}],
            addresses=[{"address": " 2001:DB8::0005/64", "gateway": "2001:db8::1/64"}],
        )
    ).ipam
    assert [r.model_dump(exclude_none=True) for r in ipam.routes] == [
        {"dst": "0.0.0.0/0", "gw": "192.0.2.254"}
    ]
    assert [a.model_dump() for a in ipam.addresses] == [
        {"address": "2001:db8::5/64", "gateway": "2001:db8::1"}
    ]
