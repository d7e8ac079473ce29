"""Whatever arrives on stdin, in the environment or in CNI_ARGS, the reply is CNI JSON, and a
rejected request changes nothing.

Requests are valid ones with a few parts broken, so that every stage (decoding, versions,
CNI_ARGS, config, requested addresses, the allocator) both accepts and refuses some of them.
"""

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyabouts.plugin.handler import handle_request
from tests.memory_store import MemoryStore

ADDRESSES = st.sampled_from(
    ["192.0.2.5", "192.0.2.9/29", "192.0.2.300", "2001:db8::1", "2001:db8::/120", "::", "x", ""]
)
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
    ADDRESSES,
)
GOOD_IPAM = st.fixed_dictionaries(
    {
        "type": st.just("pyabouts"),
        "range": st.sampled_from(["192.0.2.0/29", "192.0.2.2-192.0.2.6/29", "192.0.2.9/30"]),
        "datastore": st.just("etcd"),
    },
    optional={
        "exclude": st.lists(st.sampled_from(["192.0.2.3", "192.0.2.4/31"]), max_size=2),
        "ipRanges": st.lists(
            st.fixed_dictionaries({"range": st.sampled_from(["2001:db8::/125", "192.0.2.0/28"])}),
            max_size=1,
        ),
        "gateway": st.sampled_from(["192.0.2.1", "2001:db8::1"]),
        "routes": st.just([{"dst": "0.0.0.0/0"}]),
        "enable_overlapping_ranges": st.booleans(),
        "network_name": st.sampled_from(["", "blue"]),
    },
)
GOOD_NETCONF = st.fixed_dictionaries(
    {
        "cniVersion": st.sampled_from(["0.3.1", "0.4.0", "1.0.0", "1.1.0"]),
        "name": st.just("net"),
        "ipam": GOOD_IPAM,
    },
    optional={
        "capabilities": st.just({"ips": True}),
        "runtimeConfig": st.fixed_dictionaries({"ips": st.lists(ADDRESSES, max_size=1)}),
        "args": st.fixed_dictionaries(
            {"cni": st.fixed_dictionaries({"ips": st.lists(ADDRESSES, max_size=1)})}
        ),
        "cni.dev/valid-attachments": st.just([{"containerID": "c1", "ifname": "net1"}]),
        "prevResult": st.just({"ips": [{"address": "192.0.2.1/29"}]}),
    },
)
IPAM_KEYS = [
    "type",
    "range",
    "range_start",
    "range_end",
    "exclude",
    "ipRanges",
    "gateway",
    "routes",
    "addresses",
    "dns",
    "enable_overlapping_ranges",
    "log_level",
    "datastore",
]
TOP_KEYS = [
    "cniVersion",
    "ipam",
    "capabilities",
    "runtimeConfig",
    "args",
    "cni.dev/valid-attachments",
    "prevResult",
]


@st.composite
def netconfs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid netconf with up to two parts replaced by junk or removed."""
    conf: dict[str, Any] = dict(draw(GOOD_NETCONF))
    for _ in range(draw(st.integers(0, 2))):
        target: dict[str, Any]
        ipam = conf.get("ipam")
        if draw(st.booleans()) and isinstance(ipam, dict):
            key = draw(st.sampled_from(IPAM_KEYS))
            target = conf["ipam"] = dict(ipam)
        else:
            key = draw(st.sampled_from(TOP_KEYS))
            target = conf
        if draw(st.booleans()):
            target[key] = draw(JUNK)
        else:
            target.pop(key, None)
    return conf


CNI_ARGS = st.one_of(
    st.lists(
        st.sampled_from(
            ["IgnoreUnknown=1", "IP=192.0.2.5", "IP=x", "K8S_POD_NAME=p", "FOO=1", "=", "IP="]
        ),
        max_size=4,
    ).map(";".join),
    st.text(alphabet="=;ABIKPN_19.:,x ", max_size=30),
)
ENV = st.fixed_dictionaries(
    {
        "CNI_COMMAND": st.sampled_from(
            ["ADD", "ADD", "ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "", "X"]
        ),
        "CNI_ARGS": CNI_ARGS,
        "CNI_CONTAINERID": st.sampled_from(["c1", "c2", "c3", ""]),
        "CNI_IFNAME": st.sampled_from(["net1", "net2", ""]),
    }
)
STDIN = st.one_of(
    netconfs().map(lambda c: json.dumps(c).encode()),
    st.binary(max_size=20),
    st.sampled_from([b"", b"null", b"[]", b'{"ipam": 1}', b"\xff\xfe"]),
)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(env=ENV, stdin=STDIN)
def test_every_request_ends_in_a_result_or_cni_error_json(
    env: dict[str, str], stdin: bytes, monkeypatch_store: MemoryStore
) -> None:
    before = monkeypatch_store.snapshot()
    reply = handle_request(env, stdin)
    body = json.loads(reply.stdout) if reply.stdout else None
    if reply.exit_code == 0:
        assert body is None or "ips" in body or "supportedVersions" in body
        return
    assert reply.exit_code == 1
    assert isinstance(body, dict)
    assert isinstance(body["code"], int)
    assert body["code"] != 103, body  # 103 is "internal error": a bug, never expected
    assert isinstance(body["msg"], str)
    assert body["msg"]
    assert monkeypatch_store.snapshot() == before
