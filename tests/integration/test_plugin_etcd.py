"""The `pyabouts` executable against real etcd: every command, TLS and auth, and failures."""

import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import etcd3
import grpc
import pytest

from deploy.local.etcd_server import start_etcd
from pyabouts.plugin.agent.backend import POOL_MAX_AGE_SECONDS
from tests.integration.etcd_fixtures import EtcdServer
from tests.integration.plugin_fixtures import closed_port, etcd_ipam
from tests.integration.plugin_processes import cni, netconf
from tests.integration.stored_state import stored_allocations

pytestmark = pytest.mark.integration


def test_every_command_through_the_executable(pyabouts_exe: str, etcd_server: EtcdServer) -> None:
    network = f"cmds-{uuid.uuid4().hex[:8]}"
    conf = netconf(**etcd_ipam(etcd_server, range="10.40.0.0/30", network_name=network))

    assert cni(pyabouts_exe, "CHECK", conf).result["code"] == 3
    first = cni(pyabouts_exe, "ADD", conf, "c1").expect_success()
    second = cni(pyabouts_exe, "ADD", conf, "c2").expect_success()
    assert [first["ips"][0]["address"], second["ips"][0]["address"]] == [
        "10.40.0.1/30",
        "10.40.0.2/30",
    ]
    assert stored_allocations(etcd_server, network) == {
        "10.40.0.0/24+1": {
            "containerID": "c1",
            "ifname": "net1",
            "podRef": "default/pod-c1",
            "cniNetwork": "net",
        },
        "10.40.0.0/24+2": {
            "containerID": "c2",
            "ifname": "net1",
            "podRef": "default/pod-c2",
            "cniNetwork": "net",
        },
    }
    assert cni(pyabouts_exe, "CHECK", conf, "c1").ok

    status = cni(pyabouts_exe, "STATUS", conf)
    assert (status.returncode, status.result["code"]) == (1, 50)
    exhausted = cni(pyabouts_exe, "ADD", conf, "c3")
    assert exhausted.result["code"] == 100
    assert "10.40.0.0/30" in exhausted.result["msg"]

    gc = conf | {"cni.dev/valid-attachments": [{"containerID": "c2", "ifname": "net1"}]}
    assert cni(pyabouts_exe, "GC", gc).ok
    assert list(stored_allocations(etcd_server, network)) == ["10.40.0.0/24+2"]
    assert cni(pyabouts_exe, "STATUS", conf).ok

    assert cni(pyabouts_exe, "DEL", conf, "c2").ok
    assert cni(pyabouts_exe, "DEL", conf, "c2").ok  # again: already gone is fine
    assert stored_allocations(etcd_server, network) == {}


def test_an_etcd_reached_by_its_ipv6_address(pyabouts_exe: str, tmp_path: Path) -> None:
    server = start_etcd(tmp_path / "etcd-data", tmp_path / "etcd.log", host="::1")
    try:
        assert server.endpoint.startswith("[::1]:")
        conf = netconf(**etcd_ipam(server, range="10.42.0.0/30", network_name="ipv6-etcd"))
        added = cni(pyabouts_exe, "ADD", conf).expect_success()
        assert added["ips"][0]["address"] == "10.42.0.1/30"
        assert list(stored_allocations(server, "ipv6-etcd")) == ["10.42.0.0/24+1"]
        assert cni(pyabouts_exe, "DEL", conf).ok
        assert stored_allocations(server, "ipv6-etcd") == {}
    finally:
        server.stop()


def test_a_full_etcd_refuses_at_once_saying_what_to_do(pyabouts_exe: str, tmp_path: Path) -> None:
    """etcd keeps every write's history until compacted; at its quota (NOSPACE) it refuses all
    writes. An ADD then fails at once (not after a minute of retries), naming the way out, and
    works again once that is done."""
    quota = "--quota-backend-bytes=2000000"
    server = start_etcd(tmp_path / "etcd-data", tmp_path / "etcd.log", extra_args=[quota])
    client = etcd3.client(host=server.host, port=server.port)
    try:
        with pytest.raises(grpc.RpcError, match="database space exceeded"):
            for _ in range(1000):  # another writer's history, say
                client.put("/other/app", "v" * 40_000)
        conf = netconf(**etcd_ipam(server, range="10.42.1.0/30", network_name="full"))
        started = time.monotonic()
        full = cni(pyabouts_exe, "ADD", conf)
        assert time.monotonic() - started < 10
        assert (full.returncode, full.result["code"]) == (1, 102)
        assert "database space exceeded" in full.result["msg"]
        assert "--auto-compaction-retention" in full.result["msg"]
        assert "etcdctl alarm disarm" in full.result["msg"]
        assert stored_allocations(server, "full") == {}

        client.compact(client.get("/other/app")[1].mod_revision)
        client.defragment()
        for alarm in list(client.list_alarms()):
            client.disarm_alarm(alarm.member_id)
        added = cni(pyabouts_exe, "ADD", conf).expect_success()
        assert added["ips"][0]["address"] == "10.42.1.1/30"
    finally:
        client.close()
        server.stop()


def test_tls_and_auth(pyabouts_exe: str, etcd_tls_auth_server: EtcdServer) -> None:
    server = etcd_tls_auth_server
    conf = netconf(**etcd_ipam(server, range="10.41.0.0/24", network_name="tls"))
    added = cni(pyabouts_exe, "ADD", conf).expect_success()
    assert added["ips"][0]["address"] == "10.41.0.1/24"
    assert cni(pyabouts_exe, "DEL", conf).ok

    wrong = netconf(**(conf["ipam"] | {"etcd_password": "wrong"}))
    refused = cni(pyabouts_exe, "ADD", wrong)
    assert (refused.returncode, refused.result["code"]) == (1, 102)
    assert server.endpoint in refused.result["msg"]

    no_client_cert = netconf(**(conf["ipam"] | {"etcd_cert_file": "", "etcd_key_file": ""}))
    failed = cni(pyabouts_exe, "ADD", no_client_cert)
    assert (failed.returncode, failed.result["code"]) == (1, 102)
    assert "set etcd_cert_file and etcd_key_file" in failed.result["msg"]

    # Where the tests' environment lets a network config name it (plugin/named_files.py).
    missing = "/tmp/pyabouts-nonexistent/ca.pem"
    missing_ca = netconf(**(conf["ipam"] | {"etcd_ca_cert_file": missing}))
    no_ca_file = cni(pyabouts_exe, "ADD", missing_ca).result
    assert no_ca_file["code"] == 7
    assert f"ipam.etcd_ca_cert_file='{missing}'" in no_ca_file["msg"]


def test_tls_mistakes_fail_closed_and_say_why(
    pyabouts_exe: str, etcd_tls_auth_server: EtcdServer
) -> None:
    server = etcd_tls_auth_server
    ipam = etcd_ipam(server, range="10.41.1.0/24", network_name="tls-mistakes")

    # https:// without a CA: etcd's private CA is not among the system's roots.
    system_roots = ipam | {"etcd_host": f"https://{server.endpoint}", "etcd_ca_cert_file": ""}
    untrusted = cni(pyabouts_exe, "ADD", netconf(**system_roots)).result
    assert untrusted["code"] == 7
    assert "etcd's server certificate is not trusted" in untrusted["msg"]

    key_alone = cni(pyabouts_exe, "ADD", netconf(**(ipam | {"etcd_cert_file": ""}))).result
    assert key_alone["code"] == 7
    assert "ipam.etcd_cert_file" in key_alone["msg"] and "ipam.etcd_key_file" in key_alone["msg"]

    mixed = ipam | {"etcd_host": f"https://{server.endpoint},http://127.0.0.1:1"}
    assert "mixes http:// and https://" in cni(pyabouts_exe, "ADD", netconf(**mixed)).result["msg"]


def test_an_unreachable_etcd_is_try_again_later_within_a_bounded_time(pyabouts_exe: str) -> None:
    conf = netconf(
        type="pyabouts",
        datastore="etcd",
        etcd_host=f"127.0.0.1:{closed_port()}",
        range="10.42.0.0/24",
    )
    started = time.monotonic()
    call = cni(pyabouts_exe, "ADD", conf)
    assert (call.returncode, call.result["code"]) == (1, 11)
    assert "unreachable" in call.result["msg"]
    assert time.monotonic() - started < 30  # an outage is retried for 15 s, not forever
    assert not call.stderr.strip().startswith("Traceback")


def test_an_etcd_cut_off_is_unreachable_not_busy(pyabouts_exe: str) -> None:
    """Packets to etcd dropped: grpc's calls time out as they do on a silent etcd, which is
    retried as busy for the whole 60 s. A port whose SYNs are dropped (a listener whose one
    backlog place is taken) is what a partition looks like: answered as unreachable, after the
    15 s an outage is given."""
    with socket.socket() as listener, socket.socket() as first:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        first.connect(listener.getsockname())  # the backlog's one place: later SYNs are dropped
        host, port = listener.getsockname()
        ipam = {"type": "pyabouts", "datastore": "etcd", "etcd_host": f"{host}:{port}"}
        started = time.monotonic()
        call = cni(pyabouts_exe, "ADD", netconf(**ipam, range="10.42.2.0/24"))
    assert (call.returncode, call.result["code"]) == (1, 11)
    assert "is unreachable: the call timed out, and no TCP connection" in call.result["msg"]
    assert time.monotonic() - started < 45  # not the busy store's 60 s


def test_a_dead_endpoint_is_skipped_for_the_next(
    pyabouts_exe: str, etcd_server: EtcdServer
) -> None:
    hosts = f"127.0.0.1:{closed_port()},{etcd_server.endpoint}"
    conf = netconf(
        **etcd_ipam(
            etcd_server,
            etcd_host=hosts,
            range="10.43.0.0/24",
            network_name=f"failover-{uuid.uuid4().hex[:6]}",
        )
    )
    assert cni(pyabouts_exe, "ADD", conf).expect_success()["ips"][0]["address"] == "10.43.0.1/24"


def test_version_and_early_errors_import_nothing_heavy(pyabouts_exe: str) -> None:
    probe = (
        "import os, sys; sys.stdin = open(os.devnull);"
        "from pyabouts.plugin.handler import handle_request;"
        "reply = handle_request({'CNI_COMMAND': 'VERSION'}, b'');"
        "handle_request({'CNI_COMMAND': 'ADD'}, b'nonsense');"
        "print(' '.join(sorted(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    heavy = {"pydantic", "netaddr", "etcd3", "grpc", "pyabouts.ipam.config", "logging"}
    assert heavy.isdisjoint(loaded), heavy & set(loaded)
    version = subprocess.run(
        [pyabouts_exe],
        check=True,
        input="",
        env={"CNI_COMMAND": "VERSION"},
        capture_output=True,
        text=True,
    )
    assert json.loads(version.stdout)["supportedVersions"][-1] == "1.1.0"


def test_an_add_refuses_a_pool_holding_another_spelling_of_a_blocks_key(
    pyabouts_exe: str, etcd_server: EtcdServer
) -> None:
    """A block stored under a key in upper-case hex (10.41.160.0/24's), as a hand or another
    tool may write it, sits in the range the ADD reads. Read as that block, it would stand beside
    the key pyabouts writes it to, and an address held in one could be given from the other.
    The ADD is refused with code 104, naming the key, and writes nothing. (An agent decides on
    its cached read of the pool until that is POOL_MAX_AGE_SECONDS old: etcd has no watch of
    it here.)"""
    network = f"spelled-{uuid.uuid4().hex[:8]}"
    conf = netconf(**etcd_ipam(etcd_server, range="10.41.0.0/16", network_name=network))
    cni(pyabouts_exe, "ADD", conf, "c1").expect_success()
    client = etcd3.client(host=etcd_server.host, port=etcd_server.port)
    try:
        [(value, _)] = list(client.get_prefix(f"/pyabouts/v1/pools/4/{network}/"))
        other = f"/pyabouts/v1/pools/4/{network}/0a29A000"  # c1's block, copied there
        client.put(other, value)
        before = list(stored_allocations(etcd_server, network))
        time.sleep(POOL_MAX_AGE_SECONDS + 0.2)
        refused = cni(pyabouts_exe, "ADD", conf, "c2").result
        assert refused.get("code") == 104 and other in refused["msg"], refused
        assert list(stored_allocations(etcd_server, network)) == before
        client.delete(other)
        assert cni(pyabouts_exe, "ADD", conf, "c2").ok
    finally:
        client.delete_prefix(f"/pyabouts/v1/pools/4/{network}/")
        client.close()


def test_a_range_drained_by_an_edit_refuses_adds_and_its_pods_dels_still_free(
    pyabouts_exe: str, etcd_server: EtcdServer
) -> None:
    """The way to drain a range, every address excluded (with node slices too): kubelet
    retries a failing DEL for ever, so only ADD and STATUS are refused."""
    network = f"drain-{uuid.uuid4().hex[:8]}"
    ipam = etcd_ipam(etcd_server, range="10.41.0.0/29", network_name=network)
    for sliced in ({}, {"node_slice_size": "/30"}):
        conf = netconf(**ipam, **sliced)
        cni(pyabouts_exe, "ADD", conf, "c1").expect_success()
        cni(pyabouts_exe, "ADD", conf, "c2").expect_success()
        drained = netconf(**ipam, **sliced, exclude=["10.41.0.0/29"])
        refused = cni(pyabouts_exe, "ADD", drained, "c3")
        assert (refused.returncode, refused.result["code"]) == (1, 7), refused.result
        assert "every address is excluded" in refused.result["msg"]
        assert cni(pyabouts_exe, "STATUS", drained).result["code"] == 7
        assert cni(pyabouts_exe, "DEL", drained, "c1").ok
        held = {a["containerID"] for a in stored_allocations(etcd_server, network).values()}
        assert "c1" not in held and "c2" in held
        assert cni(pyabouts_exe, "DEL", drained, "c2").ok
        held = {a["containerID"] for a in stored_allocations(etcd_server, network).values()}
        assert not held & {"c1", "c2"}
