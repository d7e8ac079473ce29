"""Moving from whereabouts without re-addressing a pod: the real whereabouts v0.9.4 allocates on
the local apiserver (plain pools, and node-slice pools cut by its own node-slice controller),
`pyabouts-migrate` brings that over, and pyabouts' ADDs give the same pods the same addresses
and new pods none that whereabouts gave."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netaddr
import pytest

from deploy.local import whereabouts_install
from deploy.local.controlplane import ControlPlane
from deploy.local.netns import CniCall
from deploy.local.pod_objects import (
    create_namespace,
    create_node,
    create_pod,
    delete_node,
    delete_pod,
)
from deploy.local.pod_runtime import create_nad, install_nad_crd
from pyabouts.ipam.slices import REGISTRY_MARK
from tests.integration.plugin_fixtures import kubernetes_datastore
from tests.integration.plugin_processes import cni
from tests.integration.reconciler_env import reconcile_once
from tests.integration.stored_state import owners_on

pytestmark = pytest.mark.integration

NAMESPACE = "migrating"
RUNBOOK = Path(__file__).parents[2] / "docs" / "migration.md"
PYABOUTS = str(Path(sys.executable).parent / "pyabouts")  # the in-process plugin


@dataclass
class Whereabouts:
    cluster: ControlPlane
    flat_file: Path  # whereabouts' own: its ServiceAccount's kubeconfig, as on a node

    def call(self, command: str, ipam: dict[str, Any], pod: str, *, node: str = "") -> CniCall:
        """The whereabouts binary, called for `pod`'s net1 as macvlan calls it on `node`."""
        conf = {"cniVersion": "0.4.0", "name": "migrating", "type": "macvlan", "ipam": ipam}
        conf["ipam"] = {"type": "whereabouts", "configuration_path": str(self.flat_file), **ipam}
        return cni(
            str(whereabouts_install.BINARY),
            command,
            conf,
            f"wb-{pod}",
            pod_args(pod),
            extra_env={"NODENAME": node} if node else None,
        )

    def add(self, ipam: dict[str, Any], pod: str, *, node: str = "") -> list[str]:
        """whereabouts' ADD for `pod`: the addresses it gave."""
        result = self.call("ADD", ipam, pod, node=node).expect_success()
        return [ip["address"].split("/")[0] for ip in result["ips"]]

    def delete(self, ipam: dict[str, Any], pod: str) -> None:
        assert self.call("DEL", ipam, pod).returncode == 0


def pod_args(pod: str, uid: str = "") -> str:
    args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={pod}"
    return args + (f";K8S_POD_UID={uid}" if uid else "")


@pytest.fixture(scope="module")
def whereabouts(
    pyabouts_cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Whereabouts:
    kubeconfig = whereabouts_install.install_whereabouts(pyabouts_cluster)
    create_namespace(pyabouts_cluster, NAMESPACE)
    flat_file = tmp_path_factory.mktemp("whereabouts") / "whereabouts.conf"
    flat_file.write_text(
        json.dumps({"datastore": "kubernetes", "kubernetes": {"kubeconfig": str(kubeconfig)}})
    )
    return Whereabouts(pyabouts_cluster, flat_file)


@pytest.fixture
def flat_file(pyabouts_cluster: ControlPlane, tmp_path: Path) -> Path:
    """pyabouts' flat file: its IPPools, through the admin's kubeconfig (as an operator runs
    the migration)."""
    path = tmp_path / "pyabouts.conf"
    path.write_text(json.dumps(kubernetes_datastore(pyabouts_cluster)))
    return path


def migrate(flat_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """pyabouts-migrate as an operator runs it: the admin's kubeconfig, the nodes' flat file."""
    exe = str(Path(sys.executable).parent / "pyabouts-migrate")
    admin = json.loads(flat_file.read_text())["kubernetes"]["kubeconfig"]
    return subprocess.run(
        [exe, "--config", str(flat_file), "--kubeconfig", admin, *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def migrate_json(flat_file: Path, *extra: str) -> dict[str, Any]:
    done = migrate(flat_file, "-o", "json", *extra)
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def mine(document: dict[str, Any], networks: set[str], ranges: list[str]) -> list[dict[str, Any]]:
    """The holdings of this test's networks and ranges (the server is shared)."""
    inside = [netaddr.IPNetwork(r) for r in ranges]
    return [
        h
        for h in document["holdings"]
        if h["network"] in networks and any(netaddr.IPNetwork(h["address"]) in r for r in inside)
    ]


def pyabouts_add(
    cluster: ControlPlane, ipam: dict[str, Any], pod: str, *, node: str = "", uid: str = ""
) -> list[str]:
    """pyabouts' ADD for `pod`'s net1 from a new sandbox (the pod re-created on the switch)."""
    conf = {
        "cniVersion": "1.1.0",
        "name": "migrating",
        "type": "macvlan",
        "ipam": {"type": "pyabouts", **kubernetes_datastore(cluster), **ipam},
    }
    call = cni(
        PYABOUTS,
        "ADD",
        conf,
        f"pa-{pod}-{uuid.uuid4().hex[:6]}",
        pod_args(pod, uid=uid or str(uuid.uuid4())),
        extra_env={"NODE_NAME": node} if node else None,
    )
    return [ip["address"].split("/")[0] for ip in call.expect_success()["ips"]]


def unique_ranges() -> tuple[str, str]:
    n = random.randrange(256)
    return f"10.97.{n}.0/24", f"fd97:{n:x}:{random.randrange(1 << 16):x}::/64"


def test_a_dual_stack_network_moves_over_without_re_addressing_a_pod(
    whereabouts: Whereabouts, flat_file: Path, reconciler_kubeconfig: Path
) -> None:
    cluster = whereabouts.cluster
    v4, v6 = unique_ranges()
    # No network_name: whereabouts names these pools after the ranges alone.
    ipam: dict[str, Any] = {"ipRanges": [{"range": v4}, {"range": v6}]}
    pods = [f"web-{uuid.uuid4().hex[:6]}-{i}" for i in range(5)]
    uids = {pod: create_pod(cluster, NAMESPACE, pod) for pod in pods}
    given = {pod: whereabouts.add(ipam, pod) for pod in pods}
    whereabouts.delete(ipam, pods[-1])  # freed in whereabouts: nothing to bring over
    kept = {pod: given[pod] for pod in pods[:-1]}

    dry = migrate_json(flat_file, "--dry-run")
    assert dry["dryRun"] is True
    assert len(mine(dry, {""}, [v4, v6])) == 8
    assert not set(owners_on(cluster, "")) & {a for addrs in kept.values() for a in addrs}

    done = migrate_json(flat_file)
    moved = mine(done, {""}, [v4, v6])
    assert {(h["pod"], h["address"]) for h in moved} == {
        (f"{NAMESPACE}/{pod}", a) for pod, addrs in kept.items() for a in addrs
    }
    assert {h["result"] for h in moved} == {"added"}
    assert all(h["ifname"] == "net1" and h["containerID"].startswith("wb-") for h in moved)
    again = mine(migrate_json(flat_file), {""}, [v4, v6])  # idempotent
    assert sorted(h["address"] for h in again) == sorted(h["address"] for h in moved)
    assert {h["result"] for h in again} == {"present"}

    # A pod deleted after the migration, its DEL gone to whereabouts: pyabouts' reconciler
    # frees what was brought over for it, and keeps what live pods hold.
    gone, *alive = kept
    delete_pod(cluster, NAMESPACE, gone)
    reconcile_once(flat_file, reconciler_kubeconfig)
    left = owners_on(cluster, "")
    assert not set(kept[gone]) & set(left)
    assert all(left[a].pod == f"{NAMESPACE}/{pod}" for pod in alive for a in kept[pod])

    # A pod that finished meanwhile (a Job's, say): the reconciler frees its addresses, which
    # whereabouts, frozen, still holds for it.
    *running, finished = alive
    status = '{"status": {"phase": "Succeeded"}}'
    cluster.kubectl(
        *("patch", "pod", finished, "-n", NAMESPACE, "--subresource=status"),
        *("--type=merge", "-p", status),
    )
    reconcile_once(flat_file, reconciler_kubeconfig)
    assert not set(kept[finished]) & set(owners_on(cluster, ""))

    # The NAD now says pyabouts: the same pods get the same addresses, new pods others.
    pyabouts_ipam = {"ipRanges": [{"range": v4}, {"range": v6}]}
    for pod in running:
        assert pyabouts_add(cluster, pyabouts_ipam, pod, uid=uids[pod]) == kept[pod]
    held = {a for pod in running for a in kept[pod]}
    for i in range(3):
        fresh = pyabouts_add(cluster, pyabouts_ipam, f"new-{i}")
        assert not set(fresh) & held, fresh
        held |= set(fresh)
    # The runbook's check after the switch: the gone pod's addresses, given again by now, and
    # the finished pod's are left out as whereabouts' leaks, neither taken for conflicts nor
    # brought over again.
    final = {h["pod"]: h["result"] for h in mine(migrate_json(flat_file), {""}, [v4, v6])}
    assert final == {f"{NAMESPACE}/{p}": "pod-gone" for p in (gone, finished)} | {
        f"{NAMESPACE}/{pod}": "present" for pod in running
    }
    assert set(kept[gone]) <= set(owners_on(cluster, ""))  # given to new pods meanwhile


def test_it_refuses_when_pyabouts_gives_an_address_to_somebody_else(
    whereabouts: Whereabouts, flat_file: Path, pyabouts_cluster: ControlPlane
) -> None:
    network = f"wb-{uuid.uuid4().hex[:6]}"
    v4, _ = unique_ranges()
    ipam = {"range": v4, "network_name": network}
    for pod in ("first", "second", "third"):
        create_pod(pyabouts_cluster, NAMESPACE, pod)
    whereabouts.add(ipam, "first")
    migrate_json(flat_file)
    # pyabouts serves a pod before whereabouts was stopped, and whereabouts, knowing nothing of
    # it, gives the same address to another pod: what the runbook's freeze prevents.
    (taken,) = pyabouts_add(pyabouts_cluster, ipam, "served-by-pyabouts")
    (again,) = whereabouts.add(ipam, "second")
    assert again == taken
    (third,) = whereabouts.add(ipam, "third")  # no conflict, but not brought over either
    before = owners_on(pyabouts_cluster, network)
    try:
        refused = migrate(flat_file, "-o", "json")
        assert refused.returncode == 1, refused.stderr
        assert f"address {taken} (network_name {network!r})" in refused.stderr
        assert f"{NAMESPACE}/second" in refused.stderr
        assert f"{NAMESPACE}/served-by-pyabouts" in refused.stderr
        document = json.loads(refused.stdout)
        assert document["refused"] is True
        (conflict,) = [c for c in document["conflicts"] if c["network"] == network]
        assert conflict["heldBy"]["pod"] == f"{NAMESPACE}/served-by-pyabouts"
        assert owners_on(pyabouts_cluster, network) == before  # nothing changed
        assert third not in before
    finally:
        # The remedy the runbook gives: free one of the two holders, then migrate again. (The
        # apiserver is shared: a conflict left behind would refuse every later migration.)
        whereabouts.delete(ipam, "second")
    migrate_json(flat_file)
    assert owners_on(pyabouts_cluster, network)[third].pod == f"{NAMESPACE}/third"


def runbook_freeze(role: str) -> list[str]:
    """The runbook's freeze command (docs/migration.md, step 2), aimed at `role`."""
    (line,) = [
        line
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("kubectl patch clusterrole whereabouts-cni ")
    ]
    argv = shlex.split(line)
    argv[argv.index("whereabouts-cni")] = role
    return argv[1:]  # without "kubectl"


def test_the_runbooks_freeze_fails_whereabouts_adds_and_frees_nothing(
    whereabouts: Whereabouts, pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    """whereabouts' ADD fails (kubelet retries the sandbox) and stores nothing, so it cannot
    give an address pyabouts gives too; its DEL still succeeds, freeing nothing. On a copy of
    whereabouts' ClusterRole, bound to a node account of this test's own."""
    cluster = pyabouts_cluster
    account = f"frozen-{uuid.uuid4().hex[:6]}"
    role = json.loads(cluster.kubectl("get", "clusterrole", "whereabouts-cni", "-o", "json"))
    copy: dict[str, Any] = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole"}
    copy |= {"metadata": {"name": account}, "rules": role["rules"]}
    cluster.kubectl("create", "-f", "-", input=json.dumps(copy))
    cluster.kubectl("create", "serviceaccount", account, "-n", "kube-system")
    cluster.kubectl(
        "create",
        "clusterrolebinding",
        account,
        f"--clusterrole={account}",
        f"--serviceaccount=kube-system:{account}",
    )
    kubeconfig = cluster.service_account_kubeconfig("kube-system", account)
    flat = tmp_path / "whereabouts.conf"
    flat.write_text(
        json.dumps({"datastore": "kubernetes", "kubernetes": {"kubeconfig": str(kubeconfig)}})
    )
    node = Whereabouts(cluster, flat)
    network = f"wb-{uuid.uuid4().hex[:6]}"
    v4, _ = unique_ranges()
    ipam = {"range": v4, "network_name": network}
    node.add(ipam, "before")

    cluster.kubectl(*runbook_freeze(account))
    can_i = ("auth", "can-i", "update", f"ippools.{whereabouts_install.GROUP}", "-n", "kube-system")
    as_node = f"--as=system:serviceaccount:kube-system:{account}"
    deadline = time.monotonic() + 30
    while cluster.kubectl_run(*can_i, as_node).stdout.strip() != "no":
        assert time.monotonic() < deadline, "the freeze never took effect"
        time.sleep(0.2)

    def allocations() -> dict[str, Any]:
        name = f"{network}-{v4.replace('/', '-')}"
        kind = f"ippools.{whereabouts_install.GROUP}"
        answer = cluster.kubectl("get", kind, name, "-n", "kube-system", "-o", "json")
        found: dict[str, Any] = json.loads(answer)["spec"]["allocations"]
        return found

    held = allocations()
    assert len(held) == 1
    failed = node.call("ADD", ipam, "after")
    assert failed.returncode != 0 and "forbidden" in failed.stdout, failed.stdout
    assert allocations() == held
    node.delete(ipam, "before")  # succeeds, and frees nothing
    assert allocations() == held


@pytest.fixture
def node_slice_controller(pyabouts_cluster: ControlPlane, tmp_path: Path) -> Iterator[None]:
    """whereabouts' node-slice controller, as its manifest runs it (out of cluster here)."""
    install_nad_crd(pyabouts_cluster)
    log = (tmp_path / "node-slice-controller.log").open("wb")
    process = subprocess.Popen(
        [
            str(whereabouts_install.NODE_SLICE_CONTROLLER),
            f"--kubeconfig={pyabouts_cluster.kubeconfig}",
        ],
        env={**os.environ, "WHEREABOUTS_NAMESPACE": whereabouts_install.NAMESPACE},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def wait_for_slices(cluster: ControlPlane, name: str, nodes: set[str]) -> dict[str, str]:
    """node -> slice, once the NodeSlicePool `name` gives each of `nodes` one."""
    deadline = time.monotonic() + 60
    while True:
        answer = cluster.kubectl_run(
            "get",
            f"nodeslicepools.{whereabouts_install.GROUP}",
            name,
            "-n",
            whereabouts_install.NAMESPACE,
            "-o",
            "json",
        )
        if answer.returncode == 0:
            allocations = json.loads(answer.stdout).get("status", {}).get("allocations", [])
            held = {a["nodeName"]: a["sliceRange"] for a in allocations if a.get("nodeName")}
            if nodes <= set(held):
                return held
        assert time.monotonic() < deadline, (
            f"no slices for {nodes}: {answer.stdout} {answer.stderr}"
        )
        time.sleep(0.5)


def test_node_slices_move_over_with_their_nodes(
    whereabouts: Whereabouts,
    flat_file: Path,
    node_slice_controller: None,
    pyabouts_cluster: ControlPlane,
) -> None:
    network = f"wbs-{uuid.uuid4().hex[:6]}"
    # A /22 of /26 slices: 16, for every Node of the shared apiserver (the controller gives
    # each a slice).
    whole = f"10.98.{random.randrange(64) * 4}.0/22"
    ipam = {"range": whole, "node_slice_size": "/26", "network_name": network}
    nodes = [f"{network}-a", f"{network}-b"]
    with contextlib.ExitStack() as stack:
        for node in nodes:
            create_node(pyabouts_cluster, node)
            stack.callback(delete_node, pyabouts_cluster, node)
        create_nad(
            pyabouts_cluster,
            NAMESPACE,
            network,
            {
                "cniVersion": "0.4.0",
                "name": network,
                "type": "macvlan",
                "master": "eth0",
                # Its flat file, which the controller needs as well (its manifest mounts it).
                "ipam": {
                    "type": "whereabouts",
                    "configuration_path": str(whereabouts.flat_file),
                    **ipam,
                },
            },
        )
        slices = wait_for_slices(pyabouts_cluster, network, set(nodes))
        pods = {f"{node}-pod-{i}": node for node in nodes for i in range(3)}
        given = {}
        for pod, node in pods.items():
            create_pod(pyabouts_cluster, NAMESPACE, pod, node=node)
            (address,) = whereabouts.add(ipam, pod, node=node)
            assert netaddr.IPAddress(address) in netaddr.IPNetwork(slices[node])
            given[pod] = address

        done = migrate_json(flat_file)
        moved = [h for h in done["holdings"] if h["network"] == network]
        assert {(h["pod"], h["address"], h["node"]) for h in moved if h["kind"] == "address"} == {
            (f"{NAMESPACE}/{pod}", address, pods[pod]) for pod, address in given.items()
        }
        assert {(h["node"], h["address"]) for h in moved if h["kind"] == "slice"} == {
            (node, slices[node]) for node in nodes
        }
        registry = {
            owner.node: owner.container_id
            for network_name in {f"{network}{REGISTRY_MARK} {whole} /26"}
            for owner in owners_on(pyabouts_cluster, network_name).values()
        }
        assert registry == {node: slices[node] for node in nodes}
        table = migrate(flat_file)  # again, as a person reads it
        assert table.returncode == 0, table.stderr
        print(table.stdout)
        rows = [line.split() for line in table.stdout.splitlines() if f" {network} " in line]
        assert len(rows) == len(pods) + len(nodes)
        slice_row = ["present", "slice", network, slices[nodes[0]], "-", "slice", "-", nodes[0]]
        assert [*slice_row, "NodeSlicePool", f"kube-system/{network}"] in rows

        pyabouts_ipam = {"range": whole, "node_slice_size": "/26", "network_name": network}
        for pod, node in pods.items():
            assert pyabouts_add(pyabouts_cluster, pyabouts_ipam, pod, node=node) == [given[pod]]
        for node in nodes:
            (fresh,) = pyabouts_add(pyabouts_cluster, pyabouts_ipam, f"{node}-new", node=node)
            assert netaddr.IPAddress(fresh) in netaddr.IPNetwork(slices[node])
            assert fresh not in given.values()
