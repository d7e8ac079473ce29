"""The Kubernetes datastore on a real kube-apiserver: the CRD as users see it, every command
through the `pyabouts` executable, credentials and failures, and the plugin's RBAC."""

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from deploy.local.controlplane import ControlPlane
from deploy.local.netns import CniCall
from pyabouts.ipam.errors import StoreRefusedError
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId
from pyabouts.ipam.stores import kubernetes
from pyabouts.ipam.stores.kube_api import METADATA_ONLY, KubeApi
from pyabouts.ipam.stores.kubeconfig import read_kubeconfig
from pyabouts.ipam.stores.kubernetes import GROUP, VERSION, ippool_envelope, object_name
from tests.integration.kube_fixtures import can, forbidden_kubeconfig
from tests.integration.plugin_fixtures import closed_port, kubernetes_ipam
from tests.integration.plugin_processes import cni, netconf
from tests.integration.stored_state import kubernetes_store, table_entries
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def ippools(cluster: ControlPlane, network: str, namespace: str = "kube-system") -> list[Any]:
    listed = json.loads(
        cluster.kubectl("get", "ippools.pyabouts.io", "-n", namespace, "-o", "json")
    )
    return [i for i in listed["items"] if i["spec"]["network"] == network]


def test_every_field_round_trips_through_the_apiserver(pyabouts_cluster: ControlPlane) -> None:
    network = f"rt-{uuid.uuid4().hex[:6]}"
    pool = PoolId(network, 6)
    key = BlockKey.of(pool, int("20010db8000000000000ffffffffff00", 16))
    written = Block(
        key,
        {
            key.base + 1: Owner(
                "c1", "net1", "ns/p1", "uid-1", "node-a", "macvlan-net", 1764770000
            ),
            key.base + 255: Owner("c2", "eth0"),
        },
        range_text="2001:db8::/64",
        capacity=256,
        range_size=(1 << 64) - 2,  # beyond a 64-bit integer
    )
    store = kubernetes_store(str(pyabouts_cluster.kubeconfig))
    assert store.write_blocks([written]).conflicts == []
    stored = json.loads(
        pyabouts_cluster.kubectl(
            "get", "ippools.pyabouts.io", object_name(key), "-n", "kube-system", "-o", "json"
        )
    )
    assert stored["spec"] == {
        "network": network,
        "cidr": "2001:db8::ffff:ffff:ff00/120",
        "range": "2001:db8::/64",
        "capacity": 256,
        "rangeSize": "18446744073709551614",
        "allocations": "offset containerID ifname podRef podUID node cniNetwork allocated"
        " cooldown coolingUntil flags\n"
        "1 c1 net1 ns/p1 uid-1 node-a macvlan-net 1764770000 0 0 -\n"
        "255 c2 eth0 - - - - 0 0 0 -",
    }
    assert stored["status"] == {"allocated": 2, "free": 254}
    assert stored["metadata"]["labels"]["pyabouts.io/family"] == "6"
    [read] = store.read_blocks(pool, key.base, key.base + 255)
    assert (read.entries, read.range_text, read.capacity) == (written.entries, "2001:db8::/64", 256)
    assert read.range_size == written.range_size
    assert read.entries[key.base + 1].allocated_at == 1764770000  # not part of Owner's equality
    store.close()


def test_a_block_stored_in_the_earlier_form_keeps_its_owners_and_is_rewritten_as_a_table(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane
) -> None:
    """Blocks written before the table (an object per address) survive the upgrade: the CRD
    prunes nothing of them on read, the plugin allocates around their owners, and its write
    stores the block as a table with them in it."""
    network = f"earlier-{uuid.uuid4().hex[:6]}"
    key = BlockKey.of(PoolId(network, 4), 0x0A3E0000)  # 10.62.0.0
    earlier = ippool_envelope(Block(key, {}, capacity=254), "kube-system")
    earlier["spec"] = {
        "network": network,
        "cidr": "10.62.0.0/24",
        "range": "10.62.0.0/24",
        "capacity": 254,
        "allocations": {
            "1": {"containerID": "c1", "ifname": "net1", "podRef": "ns/p1", "allocated": 17647},
            "2": {"containerID": "", "ifname": "net1", "podRef": "ns/p2", "coolingUntil": 9},
        },
    }
    status, answer = pyabouts_cluster.request(
        "POST", f"/apis/{GROUP}/{VERSION}/namespaces/kube-system/ippools", earlier
    )
    assert status == 201, answer
    assert [p["spec"]["allocations"] for p in ippools(pyabouts_cluster, network)] == [
        earlier["spec"]["allocations"]
    ]

    conf = netconf(**kubernetes_ipam(pyabouts_cluster, range="10.62.0.0/24", network_name=network))
    added = cni(pyabouts_exe, "ADD", conf, "c3").expect_success()
    assert added["ips"][0]["address"] == "10.62.0.3/24"  # .1 held, .2 resting
    [pool] = ippools(pyabouts_cluster, network)
    entries = table_entries(pool["spec"]["allocations"])
    assert entries["1"] == {
        "containerID": "c1",
        "ifname": "net1",
        "podRef": "ns/p1",
        "allocated": "17647",
    }
    assert entries["2"] == {"ifname": "net1", "podRef": "ns/p2", "coolingUntil": "9"}
    assert (list(entries), entries["3"]["containerID"]) == (["1", "2", "3"], "c3")
    assert pool["status"] == {"allocated": 2, "free": 251}


def test_an_ippool_whose_cidr_was_edited_by_hand_is_code_104_naming_it(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane
) -> None:
    """A hand edit moves an IPPool's spec.cidr to the other block of its range: calls on the
    pool get code 104 naming it and write nothing. Read as the block it names, its owners would
    go unseen (their addresses free in the view), and the answer a misleading one."""
    network = f"moved-{uuid.uuid4().hex[:6]}"
    conf = netconf(**kubernetes_ipam(pyabouts_cluster, range="10.64.0.0/23", network_name=network))
    assert cni(pyabouts_exe, "ADD", conf, "c1").expect_success()["ips"][0]["address"] == (
        "10.64.0.1/23"
    )
    name = f"{network}-10.64.0.0-24"
    moved = json.dumps({"spec": {"cidr": "10.64.1.0/24"}})
    where = ["-n", "kube-system", "ippool", name]
    pyabouts_cluster.kubectl("patch", *where, "--type=merge", "-p", moved)
    try:
        refused = cni(pyabouts_exe, "ADD", conf, "c2").result
        assert refused["code"] == 104 and f"IPPool {name} " in refused["msg"], refused
        [pool] = ippools(pyabouts_cluster, network)
        assert (pool["metadata"]["name"], pool["spec"]["cidr"]) == (name, "10.64.1.0/24")
        assert list(table_entries(pool["spec"]["allocations"])) == ["1"]
    finally:  # every other test's whole-store read would fail on it
        pyabouts_cluster.kubectl("delete", *where)


def test_kubectl_shows_range_usage_and_explains_the_fields(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane
) -> None:
    network = f"show-{uuid.uuid4().hex[:6]}"
    conf = netconf(**kubernetes_ipam(pyabouts_cluster, range="10.60.0.0/24", network_name=network))
    for i in range(3):
        cni(pyabouts_exe, "ADD", conf, f"c{i}").expect_success()
    table = pyabouts_cluster.kubectl("get", "pypool", "-n", "kube-system")
    header, *rows = table.splitlines()
    assert header.split() == ["NAME", "NETWORK", "RANGE", "BLOCK", "ALLOCATED", "FREE", "AGE"]
    [row] = [r.split() for r in rows if network in r]
    assert row[:6] == [
        f"{network}-10.60.0.0-24",
        network,
        "10.60.0.0/24",
        "10.60.0.0/24",
        "3",
        "251",
    ]
    explained = pyabouts_cluster.kubectl(
        "explain", "ippools.spec", "--api-version=pyabouts.io/v1alpha1"
    )
    for field in ("allocations", "capacity", "cidr", "network", "range"):
        assert field in explained
    assert "one line per address" in pyabouts_cluster.kubectl(
        "explain", "ippools.spec.allocations", "--api-version=pyabouts.io/v1alpha1"
    )


def test_every_command_through_the_executable(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane
) -> None:
    network = f"cmds-{uuid.uuid4().hex[:6]}"
    conf = netconf(**kubernetes_ipam(pyabouts_cluster, range="10.61.0.0/30", network_name=network))
    assert cni(pyabouts_exe, "CHECK", conf, "c1").result["code"] == 3
    assert (
        cni(pyabouts_exe, "ADD", conf, "c1").expect_success()["ips"][0]["address"] == "10.61.0.1/30"
    )
    assert (
        cni(pyabouts_exe, "ADD", conf, "c2").expect_success()["ips"][0]["address"] == "10.61.0.2/30"
    )
    assert cni(pyabouts_exe, "CHECK", conf, "c1").ok
    assert cni(pyabouts_exe, "STATUS", conf).result["code"] == 50
    assert cni(pyabouts_exe, "ADD", conf, "c3").result["code"] == 100
    [pool] = ippools(pyabouts_cluster, network)
    assert pool["status"] == {"allocated": 2, "free": 0}

    gc = conf | {"cni.dev/valid-attachments": [{"containerID": "c2", "ifname": "net1"}]}
    assert cni(pyabouts_exe, "GC", gc).ok
    assert cni(pyabouts_exe, "STATUS", conf).ok
    [pool] = ippools(pyabouts_cluster, network)
    assert list(table_entries(pool["spec"]["allocations"])) == ["2"]
    assert pool["status"] == {"allocated": 1, "free": 1}

    assert cni(pyabouts_exe, "DEL", conf, "c2").ok
    assert cni(pyabouts_exe, "DEL", conf, "c2").ok
    [pool] = ippools(pyabouts_cluster, network)
    assert table_entries(pool["spec"]["allocations"]) == {}
    assert pool["status"] == {"allocated": 0, "free": 2}


def test_the_namespace_comes_from_the_kubeconfig_context(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    namespace = f"pyabouts-{uuid.uuid4().hex[:6]}"
    pyabouts_cluster.kubectl("create", "namespace", namespace)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(pyabouts_cluster.kubeconfig.read_text())
    pyabouts_cluster.kubectl(
        f"--kubeconfig={kubeconfig}",
        "config",
        "set-context",
        "--current",
        f"--namespace={namespace}",
    )
    network = f"ns-{uuid.uuid4().hex[:6]}"
    conf = netconf(
        type="pyabouts",
        kubernetes={"kubeconfig": str(kubeconfig)},
        range="10.62.0.0/24",
        network_name=network,
    )
    cni(pyabouts_exe, "ADD", conf).expect_success()
    assert len(ippools(pyabouts_cluster, network, namespace)) == 1
    assert ippools(pyabouts_cluster, network) == []


def test_a_namespace_that_does_not_exist_is_refused_naming_it(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(pyabouts_cluster.kubeconfig.read_text())
    pyabouts_cluster.kubectl(
        f"--kubeconfig={kubeconfig}", "config", "set-context", "--current", "--namespace=nowhere"
    )
    conf = netconf(
        type="pyabouts", range="10.67.0.0/24", kubernetes={"kubeconfig": str(kubeconfig)}
    )
    call = cni(pyabouts_exe, "ADD", conf)
    assert (call.returncode, call.result["code"]) == (1, 102)
    assert "nowhere" in call.result["msg"]


def test_the_kubeconfig_is_read_on_every_call(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    flat = tmp_path / "pyabouts.conf"
    flat.write_text(json.dumps({"kubernetes": {"kubeconfig": str(kubeconfig)}}))
    conf = netconf(
        type="pyabouts",
        range="10.63.0.0/24",
        configuration_path=str(flat),
        network_name=f"rotate-{uuid.uuid4().hex[:6]}",
    )
    kubeconfig.write_text("this is not a kubeconfig")
    assert cni(pyabouts_exe, "ADD", conf).result["code"] == 7
    kubeconfig.write_text(pyabouts_cluster.kubeconfig.read_text())  # e.g. a rotated token
    assert cni(pyabouts_exe, "ADD", conf).ok


def test_an_unreachable_apiserver_is_try_again_later(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    server = pyabouts_cluster.server
    kubeconfig.write_text(
        pyabouts_cluster.kubeconfig.read_text().replace(
            server, f"https://127.0.0.1:{closed_port()}"
        )
    )
    conf = netconf(
        type="pyabouts", range="10.64.0.0/24", kubernetes={"kubeconfig": str(kubeconfig)}
    )
    call = cni(pyabouts_exe, "ADD", conf)
    assert (call.returncode, call.result["code"]) == (1, 11)
    assert "unreachable" in call.result["msg"]


def test_a_forbidden_answer_says_so_and_writes_nothing(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane
) -> None:
    kubeconfig = forbidden_kubeconfig(pyabouts_cluster, f"nobody-{uuid.uuid4().hex[:6]}")
    network = f"forbidden-{uuid.uuid4().hex[:6]}"
    conf = netconf(
        type="pyabouts",
        range="10.65.0.0/24",
        network_name=network,
        kubernetes={"kubeconfig": str(kubeconfig)},
    )
    call = cni(pyabouts_exe, "ADD", conf)
    assert (call.returncode, call.result["code"]) == (1, 102)
    assert "Forbidden" in call.result["msg"]
    assert ippools(pyabouts_cluster, network) == []


def test_the_plugin_rbac_allows_exactly_what_the_commands_need(
    pyabouts_cluster: ControlPlane,
) -> None:
    for verb in ("get", "list", "watch", "create", "update"):
        assert can(pyabouts_cluster, verb, "ippools.pyabouts.io"), verb
    assert not can(pyabouts_cluster, "delete", "ippools.pyabouts.io")
    assert not can(pyabouts_cluster, "get", "secrets")
    assert not can(pyabouts_cluster, "list", "pods")
    assert not can(pyabouts_cluster, "create", "leases.coordination.k8s.io")
    assert not can(pyabouts_cluster, "update", "customresourcedefinitions.apiextensions.k8s.io")


def test_the_plugin_service_account_can_serve_every_command(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane
) -> None:
    kubeconfig = pyabouts_cluster.service_account_kubeconfig("kube-system", "pyabouts")
    network = f"sa-{uuid.uuid4().hex[:6]}"
    conf = netconf(
        type="pyabouts",
        range="10.66.0.0/24",
        network_name=network,
        kubernetes={"kubeconfig": str(kubeconfig)},
    )
    calls: list[CniCall] = [
        cni(pyabouts_exe, "ADD", conf, "c1"),
        cni(pyabouts_exe, "ADD", conf, "c1"),
        cni(pyabouts_exe, "CHECK", conf, "c1"),
        cni(pyabouts_exe, "STATUS", conf),
        cni(pyabouts_exe, "GC", conf | {"cni.dev/valid-attachments": []}),
        cni(pyabouts_exe, "DEL", conf, "c1"),
    ]
    assert [c.returncode for c in calls] == [0, 0, 0, 0, 0, 0], [c.result for c in calls]


def test_an_add_in_process_does_not_import_the_kubernetes_client(
    pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    # Its import alone took ~0.2 s of every in-process call: the store speaks REST itself.
    conf = netconf(
        **kubernetes_ipam(
            pyabouts_cluster,
            range="10.68.0.0/24",
            network_name=f"lean-{uuid.uuid4().hex[:6]}",
            run_dir=str(tmp_path),
        )
    )
    probe = (
        "import json, sys; from pyabouts.plugin.handler import handle_request;"
        "env = {'CNI_COMMAND': 'ADD', 'CNI_CONTAINERID': 'c1', 'CNI_IFNAME': 'net1',"
        " 'CNI_NETNS': '/var/run/netns/unused', 'CNI_PATH': '/usr/lib/cni'};"
        "reply = handle_request(env, sys.stdin.buffer.read());"
        "print(json.dumps([reply.exit_code, json.loads(reply.stdout), sorted(sys.modules)]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        input=json.dumps(conf),
        capture_output=True,
        text=True,
        check=True,
    )
    exit_code, result, loaded = json.loads(done.stdout)
    assert (exit_code, result["ips"][0]["address"]) == (0, "10.68.0.1/24")
    assert "kubernetes" not in loaded


def test_a_writes_answer_is_the_objects_metadata_and_its_revision_holds(
    pyabouts_cluster: ControlPlane,
) -> None:
    """Writes ask for PartialObjectMetadata (the apiserver does not send the block back): the
    resourceVersion it answers is the stored one, and the next write on it succeeds."""
    network = f"meta-{uuid.uuid4().hex[:6]}"
    key = BlockKey.of(PoolId(network, 4), int.from_bytes(bytes([10, 93, 0, 0]), "big"))
    store = kubernetes_store(str(pyabouts_cluster.kubeconfig))
    try:
        first = store.write_blocks([Block(key, {key.base + 1: Owner("c1", "net1")})])
        revision = first.revisions[key]
        stored = json.loads(
            pyabouts_cluster.kubectl(
                "get", "ippools.pyabouts.io", object_name(key), "-n", "kube-system", "-o", "json"
            )
        )
        assert stored["metadata"]["resourceVersion"] == revision
        entries = {key.base + 1: Owner("c1", "net1"), key.base + 2: Owner("c2", "net1")}
        assert store.write_blocks([Block(key, entries, revision)]).conflicts == []
        [read] = store.read_blocks(key.pool, key.base, key.base + 255)
        assert read.entries == entries
    finally:
        store.close()
    api = KubeApi(read_kubeconfig(str(pyabouts_cluster.kubeconfig)), timeout=5)
    try:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/kube-system/ippools/{object_name(key)}"
        stored["metadata"]["resourceVersion"] = read.revision  # the block as first written
        answer = api.request("PUT", path, body=stored, accept=METADATA_ONLY)
    finally:
        api.close()
    assert answer["kind"] == "PartialObjectMetadata" and "spec" not in answer
    assert answer["metadata"]["resourceVersion"] != read.revision


def test_a_pool_of_more_blocks_than_a_page_is_read_whole(
    pyabouts_cluster: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lists go in pages (each must arrive within the request timeout): a pool read and the
    watch's first list follow the apiserver's continue tokens to the last page."""
    monkeypatch.setattr(kubernetes, "LIST_PAGE", 2)
    monkeypatch.setattr(kubernetes, "METADATA_LIST_PAGE", 2)
    pool = PoolId(f"pages-{uuid.uuid4().hex[:6]}", 4)
    first = int.from_bytes(bytes([10, 94, 0, 0]), "big")
    keys = [BlockKey.of(pool, first + 256 * i) for i in range(5)]
    store = kubernetes_store(str(pyabouts_cluster.kubeconfig))
    listed: dict[tuple[str, str], str] = {}

    class Sink:
        def feed_listed(self, revisions: Mapping[tuple[str, str], str]) -> None:
            listed.update(revisions)
            stop.set()  # the list is what this test follows, not the watch after it

        def feed_changed(self, pool_tag: str, block_tag: str, revision: str, **_: Any) -> None:
            pass

        def feed_lost(self) -> None:
            pass

    stop = threading.Event()
    try:
        written = store.write_blocks(
            [Block(k, {k.base + 1: Owner(f"c{k.base}", "net1")}) for k in keys]
        )
        assert written.conflicts == []
        read = store.read_blocks(pool, keys[0].base, keys[-1].base + 255)
        assert [b.key for b in read] == keys
        assert [list(b.entries) for b in read] == [[k.base + 1] for k in keys]
        store.follow_changes(Sink(), stop)
        tag = store.pool_tag(pool)
        assert {b: r for (p, b), r in listed.items() if p == tag} == {
            store.block_tag(k): written.revisions[k] for k in keys
        }
    finally:
        store.close()


def test_the_reach_check_is_refused_where_the_crd_or_the_right_to_list_is_missing(
    pyabouts_cluster: ControlPlane,
) -> None:
    """What the agent's readiness probe asks of IPPools: a GET of a block nobody created is a
    404 with or without the CRD, a LIST of one IPPool is not."""
    store = kubernetes_store(str(pyabouts_cluster.kubeconfig))
    try:
        store.check_reach()
        store._collection = f"/apis/absent.{GROUP}/{VERSION}/namespaces/kube-system/ippools"
        assert store.read_blocks(PoolId("never", 4), 0, 0) == []
        with pytest.raises(StoreRefusedError, match="is the IPPool CRD installed"):
            store.check_reach()
    finally:
        store.close()
    account = f"no-list-{uuid.uuid4().hex[:6]}"
    forbidden = kubernetes_store(str(forbidden_kubeconfig(pyabouts_cluster, account)))
    try:
        with pytest.raises(StoreRefusedError, match="Forbidden"):
            forbidden.check_reach()
        # May list, not watch (an older release's RBAC, say): the agent's feed cannot follow.
        namespace = ("-n", "kube-system")
        pyabouts_cluster.kubectl(
            "create", "role", account, *namespace, "--verb=get,list", f"--resource=ippools.{GROUP}"
        )
        pyabouts_cluster.kubectl(
            "create",
            "rolebinding",
            account,
            *namespace,
            f"--role={account}",
            f"--serviceaccount=kube-system:{account}",
        )

        def only_the_watch_refused() -> bool:  # once the binding is in the authorizer's cache
            try:
                forbidden.check_reach()
            except StoreRefusedError as refused:
                return "Forbidden" in refused.msg and "cannot watch" in refused.msg
            return False

        wait_for(only_the_watch_refused, 10, "the LIST granted, the watch refused")
    finally:
        forbidden.close()
        pyabouts_cluster.kubectl_run("delete", "serviceaccount", account, "-n", "kube-system")
        for kind in ("role", "rolebinding"):
            pyabouts_cluster.kubectl_run("delete", kind, account, "-n", "kube-system")
