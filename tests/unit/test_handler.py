import json
from pathlib import Path
from typing import Any

import pytest

from pyabouts.ipam.errors import (
    INTERNAL_ERROR,
    NO_FREE_SLICE,
    RANGE_EXHAUSTED,
    REQUESTED_IP_UNAVAILABLE,
    AllocationError,
    NoFreeSliceError,
    RangeExhaustedError,
    RequestedAddressUnavailableError,
    StoreUnavailableError,
)
from pyabouts.ipam.pool import Block, BlockKey, PoolId
from pyabouts.ipam.store import WriteOutcome
from pyabouts.plugin.backend import OneShotBackend
from pyabouts.plugin.handler import allocation_code, handle_request
from tests.memory_store import MemoryStore

POD_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"


def conf(version: str = "1.0.0", **ipam: Any) -> dict[str, Any]:
    settings = {"type": "pyabouts", "range": "192.0.2.0/29", "datastore": "etcd"} | ipam
    return {"cniVersion": version, "name": "net", "type": "macvlan", "ipam": settings}


def call(
    command: str,
    config: dict[str, Any],
    container: str = "c1",
    ifname: str = "net1",
    args: str = POD_ARGS,
) -> tuple[int, Any]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_IFNAME": ifname,
        "CNI_NETNS": "/var/run/netns/x",
        "CNI_ARGS": args,
    }
    reply = handle_request(env, json.dumps(config).encode())
    return reply.exit_code, json.loads(reply.stdout) if reply.stdout else None


def test_version_lists_the_supported_versions() -> None:
    reply = handle_request({"CNI_COMMAND": "VERSION"}, b"")
    assert reply.exit_code == 0
    assert json.loads(reply.stdout)["supportedVersions"] == [
        "0.1.0",
        "0.2.0",
        "0.3.0",
        "0.3.1",
        "0.4.0",
        "1.0.0",
        "1.1.0",
    ]


def test_add_never_gives_the_gateway_of_the_config(memory_store: MemoryStore) -> None:
    config = conf(gateway="192.0.2.1", range="192.0.2.0/30")
    code, result = call("ADD", config, container="c1")
    assert (code, result["ips"]) == (0, [{"address": "192.0.2.2/30", "gateway": "192.0.2.1"}])
    other_pod = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1"
    code, result = call("ADD", config, container="c2", args=other_pod)
    assert (code, result["code"]) == (1, RANGE_EXHAUSTED)


def test_a_static_address_in_a_range_is_never_given_and_checks_as_the_result_it_is_in(
    memory_store: MemoryStore,
) -> None:
    """The result lists each static address: given by the range too, it was in the result
    twice (macvlan: "file exists"), and CHECK refused the plugin's own result."""
    static = {"address": "192.0.2.1/29", "gateway": "192.0.2.2"}  # its gateway kept out too
    config = conf(range="192.0.2.0/29", range_end="192.0.2.3", addresses=[static])
    code, result = call("ADD", config)
    assert (code, result["ips"]) == (0, [{"address": "192.0.2.3/29"}, static])
    assert call("CHECK", config | {"prevResult": result}) == (0, None)
    other_pod = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1"
    code, refused = call("ADD", config, container="c2", args=other_pod)
    assert (code, refused["code"]) == (1, RANGE_EXHAUSTED)
    asked = call("ADD", config, container="c3", args=f"{other_pod};IP=192.0.2.1")[1]
    assert asked["code"] == REQUESTED_IP_UNAVAILABLE


def test_add_returns_the_address_with_gateway_routes_dns_and_static_addresses(
    memory_store: MemoryStore,
) -> None:
    config = conf(
        gateway="192.0.2.1",
        exclude=["192.0.2.1"],
        routes=[{"dst": "0.0.0.0/0"}],
        dns={"nameservers": ["192.0.2.53"]},
        addresses=[{"address": "203.0.113.9/24", "gateway": "203.0.113.1"}],
        ipRanges=[{"range": "2001:db8::/64"}],
    )
    code, result = call("ADD", config)
    assert code == 0
    assert result == {
        "cniVersion": "1.0.0",
        "ips": [
            {"address": "192.0.2.2/29", "gateway": "192.0.2.1"},
            {"address": "2001:db8::1/64"},
            {"address": "203.0.113.9/24", "gateway": "203.0.113.1"},
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["192.0.2.53"]},
    }


def test_add_in_a_0_3_1_config_answers_in_the_0_3_1_shape(memory_store: MemoryStore) -> None:
    code, result = call("ADD", conf("0.3.1"))
    assert code == 0
    assert result["ips"] == [{"version": "4", "address": "192.0.2.1/29"}]


@pytest.mark.parametrize(
    "channel",
    [
        lambda c: c | {"capabilities": {"ips": True}, "runtimeConfig": {"ips": ["192.0.2.5/29"]}},
        lambda c: c | {"args": {"cni": {"ips": ["192.0.2.5"]}}},
    ],
)
def test_requested_addresses_from_the_config(memory_store: MemoryStore, channel: Any) -> None:
    code, result = call("ADD", channel(conf()))
    assert (code, result["ips"][0]["address"]) == (0, "192.0.2.5/29")


def test_requested_address_from_cni_args(memory_store: MemoryStore) -> None:
    code, result = call("ADD", conf(), args=POD_ARGS + ";IP=192.0.2.6/29")
    assert (code, result["ips"][0]["address"]) == (0, "192.0.2.6/29")


def test_a_taken_requested_address_fails_and_allocates_nothing(memory_store: MemoryStore) -> None:
    call("ADD", conf(), args=POD_ARGS + ";IP=192.0.2.6")
    before = memory_store.snapshot()
    code, error = call("ADD", conf(), container="c2", args="IP=192.0.2.6,2001:db8::1")
    assert code == 1
    assert error["code"] == 101
    assert memory_store.snapshot() == before


def test_exhaustion_is_code_100_naming_the_range(memory_store: MemoryStore) -> None:
    for i in range(6):
        assert call("ADD", conf(), container=f"c{i}", args=f"K8S_POD_NAME=p{i}")[0] == 0
    code, error = call("ADD", conf(), container="c9", args="K8S_POD_NAME=p9")
    assert code == 1
    assert error["code"] == 100
    assert "192.0.2.0/29" in error["msg"]


def test_an_add_refuses_a_network_name_too_long_to_store_and_a_del_still_frees(
    memory_store: MemoryStore,
) -> None:
    # The name is stored in every allocation line: a 120 KB one made a block of 13 pods 1.5 MB,
    # past etcd's request limit, for every NAD of the network.
    status, given = call("ADD", conf() | {"name": "n" * 253})
    assert status == 0 and given["ips"]
    status, refused = call("ADD", conf() | {"name": "n" * 254}, container="c2")
    assert status == 1 and refused["code"] == 7 and "at most 253 characters" in refused["msg"]
    assert len(refused["msg"]) < 300
    # An address given before the limit was made is freed by its DEL all the same.
    assert call("DEL", conf() | {"name": "n" * 254}) == (0, None)
    assert memory_store.blocks == {} or all(not b.entries for b in memory_store.blocks.values())


def test_an_add_refuses_an_ipam_network_name_too_long_to_store(memory_store: MemoryStore) -> None:
    # Stored whole in every block of its pool, as the name is in each line.
    status, refused = call("ADD", conf(network_name="b" * 254))
    assert (status, refused["code"]) == (1, 7)
    assert refused["msg"].startswith("invalid network config: ipam.network_name=")
    assert call("ADD", conf(network_name="b" * 253))[0] == 0


@pytest.mark.parametrize("slices", [{}, {"node_slice_size": "/30"}])
@pytest.mark.parametrize(
    "drained",
    [
        {"exclude": ["192.0.2.0/29"]},  # every address excluded: a range drained
        {"range_start": "192.0.2.5", "exclude": ["192.0.2.4/30"]},  # what the start leaves
        {"range_end": "192.0.2.2", "exclude": ["192.0.2.0/30"]},  # what the end leaves
    ],
)
def test_a_config_edited_to_give_nothing_refuses_add_while_del_and_gc_still_free(
    memory_store: MemoryStore, drained: dict[str, Any], slices: dict[str, Any]
) -> None:
    """kubelet retries a failing DEL for ever: an edit that leaves a range nothing to give
    (the way to drain it) must not strand the pods it served, with node slices too."""

    def holders() -> set[str]:
        return {
            o.container_id
            for b in memory_store.blocks.values()
            for o in b.entries.values()
            if o.container_id in ("c1", "c2")
        }

    for i, container in enumerate(("c1", "c2")):
        pod = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p{i}"
        assert call("ADD", conf("1.1.0", **slices), container=container, args=pod)[0] == 0
    assert holders() == {"c1", "c2"}
    edited = conf("1.1.0", **slices, **drained)
    status, refused = call("ADD", edited, container="c3")
    assert (status, refused["code"]) == (1, 7)
    assert refused["msg"].startswith("invalid network config: ipam.range: '192.0.2.")
    assert call("STATUS", edited)[1]["code"] == 7
    assert call("DEL", edited, container="c1") == (0, None)
    assert holders() == {"c2"}
    assert call("GC", edited | {"cni.dev/valid-attachments": []}) == (0, None)
    assert holders() == set()


def test_a_node_slice_size_that_cuts_no_range_refuses_add_and_lets_del_free(
    memory_store: MemoryStore,
) -> None:
    status, refused = call("ADD", conf("1.1.0", node_slice_size="/20"))
    assert (status, refused["code"]) == (1, 7) and "node_slice_size '/20'" in refused["msg"]
    assert call("DEL", conf("1.1.0", node_slice_size="/20")) == (0, None)


def test_delete_of_an_unknown_allocation_succeeds_silently(memory_store: MemoryStore) -> None:
    assert call("DEL", conf(), container="never-added") == (0, None)


def test_a_recreated_pod_gets_its_address_back_under_its_new_uid(
    memory_store: MemoryStore,
) -> None:
    first = call("ADD", conf(), container="sandbox-1", args=f"{POD_ARGS};K8S_POD_UID=uid-1")
    again = call("ADD", conf(), container="sandbox-2", args=f"{POD_ARGS};K8S_POD_UID=uid-2")
    assert first == again == (0, first[1])
    [block] = memory_store.blocks.values()
    [owner] = block.entries.values()
    assert (owner.container_id, owner.pod, owner.pod_uid) == ("sandbox-2", "default/web-0", "uid-2")


def test_add_del_check_cycle(memory_store: MemoryStore) -> None:
    config = conf("1.1.0")
    assert call("CHECK", config)[1]["code"] == 3
    assert call("ADD", config)[0] == 0
    assert call("CHECK", config) == (0, None)
    assert call("DEL", config) == (0, None)
    code, error = call("CHECK", config)
    assert (code, error["code"]) == (1, 3)
    assert "192.0.2.0/29" in error["msg"]
    assert call("DEL", config) == (0, None)


def test_check_fails_when_prev_result_names_an_address_not_held(memory_store: MemoryStore) -> None:
    config = conf("1.0.0")
    call("ADD", config)
    ok = config | {"prevResult": {"ips": [{"address": "192.0.2.1/29"}]}}
    bad = config | {"prevResult": {"ips": [{"address": "192.0.2.4/29"}]}}
    assert call("CHECK", ok) == (0, None)
    assert call("CHECK", bad)[1]["code"] == 3


def test_check_fails_when_an_address_held_is_missing_from_prev_result(
    memory_store: MemoryStore,
) -> None:
    config = conf("1.0.0", ipRanges=[{"range": "fd40::/120"}])
    assert call("ADD", config)[0] == 0
    both = [{"address": "192.0.2.1/29"}, {"address": "fd40::1/120"}]
    assert call("CHECK", config | {"prevResult": {"ips": both}}) == (0, None)
    status, error = call("CHECK", config | {"prevResult": {"ips": both[:1]}})
    assert (status, error["code"]) == (1, 3)
    assert (
        error["msg"]
        == "address fd40::1 allocated to container c1 interface net1 is not in prevResult"
    )
    assert call("CHECK", config | {"prevResult": {"ips": []}})[1]["code"] == 3
    # A static address beside them, in a range's network but never given by it, is no mismatch.
    static = config | {"prevResult": {"ips": [*both, {"address": "192.0.2.7/29"}]}}
    assert call("CHECK", static | {"ipam": static["ipam"] | {"exclude": ["192.0.2.7/32"]}}) == (
        0,
        None,
    )


def test_gc_drops_allocations_not_in_valid_attachments(memory_store: MemoryStore) -> None:
    config = conf("1.1.0")
    for i in range(3):
        call("ADD", config, container=f"c{i}", args=f"K8S_POD_NAME=p{i}")
    gc = config | {"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "net1"}]}
    assert call("GC", gc) == (0, None)
    assert call("CHECK", config, container="c1")[0] == 0
    assert call("CHECK", config, container="c0")[0] == 1
    assert call("CHECK", config, container="c2")[0] == 1


@pytest.mark.parametrize(
    "attachments",
    [
        {"cni.dev/attachments": [{"containerID": "c1", "ifname": "net1"}]},  # CNI 1.1.0's text
        {
            "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "net1"}],
            "cni.dev/attachments": [],  # libcni sends both: the first is the spec's now
        },
    ],
)
def test_gc_reads_the_attachments_under_either_name(
    memory_store: MemoryStore, attachments: dict[str, Any]
) -> None:
    config = conf("1.1.0")
    for i in range(2):
        call("ADD", config, container=f"c{i}", args=f"K8S_POD_NAME=p{i}")
    assert call("GC", config | attachments) == (0, None)
    assert call("CHECK", config, container="c1")[0] == 0
    assert call("CHECK", config, container="c0")[0] == 1


def test_gc_without_attachments_is_refused_and_null_keeps_none(memory_store: MemoryStore) -> None:
    """No list at all would free every allocation of the node and network: refused. libcni sends
    null for an empty list (a Go nil slice): nothing is valid any more."""
    config = conf("1.1.0")
    call("ADD", config, container="c0", args="K8S_POD_NAME=p0")
    code, error = call("GC", config)
    assert (code, error["code"]) == (1, 7)
    assert "cni.dev/valid-attachments" in error["msg"]
    assert call("CHECK", config, container="c0")[0] == 0
    assert call("GC", config | {"cni.dev/valid-attachments": None}) == (0, None)
    assert call("CHECK", config, container="c0")[0] == 1


def test_status_fails_with_50_when_a_range_is_exhausted(memory_store: MemoryStore) -> None:
    config = conf("1.1.0", range="192.0.2.0/30")
    assert call("STATUS", config) == (0, None)
    call("ADD", config, container="a", args="K8S_POD_NAME=a")
    call("ADD", config, container="b", args="K8S_POD_NAME=b")
    code, error = call("STATUS", config)
    assert (code, error["code"]) == (1, 50)


def test_status_under_node_slices_answers_for_this_nodes_slice(
    memory_store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full slice fails this node's ADD (code 100) though other slices have room: STATUS
    says 50 for it, and for a node that holds no slice once none is free."""
    config = conf("1.1.0", range="192.0.2.0/29", node_slice_size="/30")  # .1-.3 and .4-.6
    monkeypatch.setenv("NODE_NAME", "n1")
    taken = [call("ADD", config, container=f"a{i}", args="")[1] for i in range(3)]
    assert call("ADD", config, container="a3", args="")[1]["code"] == 100
    code, error = call("STATUS", config)
    assert (code, error["code"]) == (1, 50) and "'n1'" in error["msg"], taken
    monkeypatch.setenv("NODE_NAME", "n2")
    assert call("STATUS", config) == (0, None)  # the other slice is free: n2 would take it
    call("ADD", config, container="b0", args="")
    monkeypatch.setenv("NODE_NAME", "n3")
    assert call("STATUS", config)[1]["code"] == 50  # both slices held


def test_log_file_and_log_level(memory_store: MemoryStore, tmp_path: Path) -> None:
    log = tmp_path / "pyabouts.log"
    call("ADD", conf(log_file=str(log), log_level="verbose"))
    assert "ADD c1 net1 (default/web-0): 192.0.2.1/29" in log.read_text()
    quiet = tmp_path / "quiet.log"
    call("ADD", conf(log_file=str(quiet), log_level="error"), container="c2", args="")
    assert "ADD" not in quiet.read_text()


@pytest.mark.parametrize(
    ("env", "stdin", "code"),
    [
        ({"CNI_COMMAND": "JUMP"}, b"{}", 4),
        ({"CNI_COMMAND": "ADD"}, b"not json", 6),
        ({"CNI_COMMAND": "ADD"}, b"[1, 2]", 6),
        ({"CNI_COMMAND": "ADD"}, json.dumps(conf("0.0.1")).encode(), 1),
        ({"CNI_COMMAND": "ADD"}, json.dumps(conf()).encode(), 4),  # no CNI_CONTAINERID
        (
            {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "e", "CNI_ARGS": "X=1"},
            json.dumps(conf()).encode(),
            4,
        ),
    ],
)
def test_bad_requests_get_cni_error_json(
    memory_store: MemoryStore, env: dict[str, str], stdin: bytes, code: int
) -> None:
    reply = handle_request(env, stdin)
    assert reply.exit_code == 1
    error = json.loads(reply.stdout)
    assert error["code"] == code
    assert error["msg"]
    assert memory_store.snapshot() == {}


def test_a_bug_still_comes_back_as_cni_error_json(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ipam: object, timeout: float) -> object:
        raise RuntimeError("boom")

    monkeypatch.setattr("pyabouts.ipam.stores.open_store", broken)
    code, error = call("ADD", conf())
    assert (code, error["code"]) == (1, 103)
    assert "RuntimeError: boom" in error["msg"]


class ContendedStore(MemoryStore):
    """Somebody else always wrote first."""

    def write_blocks(self, blocks: Any) -> WriteOutcome:
        return WriteOutcome(conflicts=[b.key for b in blocks])


def test_endless_conflicts_give_try_again_later(monkeypatch: pytest.MonkeyPatch) -> None:
    store = ContendedStore()
    monkeypatch.setattr("pyabouts.ipam.stores.open_store", lambda ipam, timeout: store)
    monkeypatch.setattr("pyabouts.plugin.commands.DEADLINE_SECONDS", 0.3)
    code, error = call("ADD", conf())
    assert (code, error["code"]) == (1, 11)


def test_the_kubernetes_datastore_needs_a_kubeconfig() -> None:
    code, error = call("ADD", conf(datastore="kubernetes"))
    assert (code, error["code"]) == (1, 7)
    assert "kubernetes.kubeconfig" in error["msg"]


def test_a_broken_kubeconfig_is_code_7_naming_it(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    code, error = call(
        "ADD", conf(datastore="kubernetes", kubernetes={"kubeconfig": str(kubeconfig)})
    )
    assert (code, error["code"]) == (1, 7)
    assert str(kubeconfig) in error["msg"]


def test_blocks_written_are_whole_blocks(memory_store: MemoryStore) -> None:
    call("ADD", conf(range="10.0.0.0/16", range_start="10.0.7.9"))
    [(key, entries)] = memory_store.snapshot().items()
    assert key == BlockKey(PoolId("", 4), int.from_bytes(bytes([10, 0, 7, 0])))
    assert list(entries) == [int.from_bytes(bytes([10, 0, 7, 9]))]
    stored = memory_store.blocks[key]
    assert (stored.range_text, stored.capacity) == ("10.0.0.0/16", 256 - 9)  # .9 to .255


class FlakyStore(MemoryStore):
    """Unreachable for the first `failures` reads."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailableError("etcd at 127.0.0.1:1 is unreachable: test")
        return super().read_blocks(pool, first, last)


def test_a_passing_outage_is_retried_within_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    store = FlakyStore(failures=2)
    monkeypatch.setattr("pyabouts.ipam.stores.open_store", lambda ipam, timeout: store)
    code, result = call("ADD", conf())
    assert (code, result["ips"][0]["address"]) == (0, "192.0.2.1/29")


def test_a_lasting_outage_is_try_again_later_naming_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = FlakyStore(failures=10**9)
    monkeypatch.setattr("pyabouts.ipam.stores.open_store", lambda ipam, timeout: store)
    monkeypatch.setattr("pyabouts.ipam.transaction.OUTAGE_GRACE", 0.3)  # shorter than the deadline
    code, error = call("ADD", conf())
    assert (code, error["code"]) == (1, 11)
    assert "127.0.0.1:1 is unreachable" in error["msg"]


def test_a_config_nested_deeper_than_the_parser_goes_is_code_6() -> None:
    stdin = b'{"cniVersion": "1.0.0", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    reply = handle_request({"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "i"}, stdin)
    assert reply.exit_code == 1
    assert json.loads(reply.stdout)["code"] == 6


def test_a_config_without_cni_version_is_answered_in_the_version_it_was_taken_for(
    memory_store: MemoryStore,
) -> None:
    config = conf()
    del config["cniVersion"]
    code, result = call("ADD", config)
    assert code == 0
    assert result["cniVersion"] == "1.1.0"
    assert result["ips"] == [{"address": "192.0.2.1/29"}]  # 1.x: no "version" per address


def test_routes_reach_the_result_with_their_attributes(memory_store: MemoryStore) -> None:
    route = {"dst": "198.51.100.0/24", "gw": "192.0.2.6", "table": 100, "priority": 5, "mtu": 1400}
    code, result = call("ADD", conf(routes=[route]))
    assert code == 0 and result["routes"] == [route]


@pytest.mark.parametrize("command", ["ADD", "STATUS"])
def test_a_node_refusing_the_in_process_fallback_is_not_overruled_by_a_nad(
    memory_store: MemoryStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str
) -> None:
    """The thin plugin without an agent: the node's flat file says `fail`, a NAD says
    `in-process` and names a log file; code 11 (50 for STATUS), and nothing named is touched."""
    node_file = tmp_path / "pyabouts.conf"
    node_file.write_text(json.dumps({"agent_fallback": "fail"}))
    monkeypatch.setattr("pyabouts.ipam.stores.flat_file.FLAT_FILE_PATHS", (str(node_file),))
    log = tmp_path / "named-by-the-nad.log"
    config = conf("1.1.0", agent_fallback="in-process", log_file=str(log))
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_IFNAME": "net1"}
    backend = OneShotBackend(agent_unreachable="no pyabouts agent at /run/x.sock")
    reply = handle_request(env, json.dumps(config).encode(), backend)
    error = json.loads(reply.stdout)
    assert (reply.exit_code, error["code"]) == (1, 11 if command == "ADD" else 50)
    assert "the node's flat file says agent_fallback 'fail'" in error["msg"]
    assert not log.exists()
    assert memory_store.read_all_blocks() == []
    # Without the node's word the NAD's own `in-process` serves.
    monkeypatch.setattr("pyabouts.ipam.stores.flat_file.FLAT_FILE_PATHS", ())
    reply = handle_request(env, json.dumps(config).encode(), backend)
    assert reply.exit_code == 0
    # The flat file the NAD names (configuration_path) may refuse it too.
    named = config | {"ipam": config["ipam"] | {"configuration_path": str(node_file)}}
    del named["ipam"]["agent_fallback"]
    reply = handle_request(env, json.dumps(named).encode(), backend)
    error = json.loads(reply.stdout)
    assert (reply.exit_code, error["code"]) == (1, 11 if command == "ADD" else 50)
    assert f"the flat file {node_file} says agent_fallback 'fail'" in error["msg"]


def test_every_kind_of_allocation_refusal_has_its_code_and_an_unknown_one_is_a_bug() -> None:
    class NarrowerError(RangeExhaustedError):
        pass

    class UnknownError(AllocationError):
        pass

    assert allocation_code(NarrowerError("x")) == RANGE_EXHAUSTED
    assert allocation_code(RequestedAddressUnavailableError("x")) == REQUESTED_IP_UNAVAILABLE
    assert allocation_code(NoFreeSliceError("x")) == NO_FREE_SLICE
    assert allocation_code(UnknownError("x")) == INTERNAL_ERROR


def test_a_legacy_version_adds_and_deletes_and_refuses_two_addresses_of_a_family_first(
    memory_store: MemoryStore,
) -> None:
    code, result = call("ADD", conf("0.2.0", gateway="192.0.2.1"), container="c1")
    assert (code, result) == (
        0,
        {"cniVersion": "0.2.0", "ip4": {"ip": "192.0.2.2/29", "gateway": "192.0.2.1"}},
    )
    assert call("DEL", conf("0.2.0"), container="c1") == (0, None)
    two = conf("0.2.0", ipRanges=[{"range": "198.51.100.0/29"}])
    code, refused = call("ADD", two, container="c2")
    assert (code, refused["code"]) == (1, 1) and "one IPv4 address" in refused["msg"]
    assert all(not b.entries for b in memory_store.blocks.values())  # nothing allocated
