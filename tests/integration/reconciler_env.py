"""What the reconciler tests share: a datastore (IPPools or etcd) with pods on the local apiserver,
the plugin to allocate as kubelet would, and the `pyabouts-reconciler` executable."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import etcd3
import netaddr
import pytest

from deploy.local.cluster_objects import apply
from deploy.local.controlplane import ControlPlane
from deploy.local.etcd_server import EtcdServer
from deploy.local.netns import CniCall
from deploy.local.pod_objects import create_namespace
from pyabouts.ipam.pool import BlockKey, Owner, PoolId
from pyabouts.ipam.store import PoolStore
from pyabouts.ipam.stores.etcd import block_key
from pyabouts.ipam.stores.kubernetes import object_name
from tests.integration.plugin_processes import cni, netconf
from tests.integration.stored_state import etcd_store, kubernetes_store, owners_in

NAMESPACE = "recon"
RECONCILER_SA = "pyabouts-reconciler"


@dataclass
class ReconcilerEnv:
    datastore: str
    cluster: ControlPlane
    flat_file: Path  # the nodes' flat file: which datastore, and how to reach it
    kubeconfig: Path  # the reconciler's ServiceAccount, as its Deployment would have
    store: PoolStore  # to look at what is stored
    plugin: str
    network: str  # this test's pool
    etcd: EtcdServer | None = None  # the datastore, when it is etcd

    def conf(self, cidr: str = "10.70.0.0/24") -> dict[str, Any]:
        ipam = {
            "type": "pyabouts",
            "range": cidr,
            "network_name": self.network,
            "configuration_path": str(self.flat_file),
        }
        return netconf(**ipam)

    def add(
        self,
        pod: str,
        uid: str,
        container: str | None = None,
        cidr: str = "10.70.0.0/24",
        *,
        node: str | None = None,
        ip: str | None = None,
    ) -> str:
        """ADD for `pod` (in NAMESPACE) as kubelet sends it (on `node`: the plugin's NODE_NAME,
        else this host's; asking for `ip`, as CNI_ARGS IP=); the address given."""
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={pod};K8S_POD_UID={uid}"
        args += f";IP={ip}" if ip else ""
        sandbox = container or f"sandbox-{pod}"
        env = {"NODE_NAME": node} if node else None
        call: CniCall = cni(self.plugin, "ADD", self.conf(cidr), sandbox, args, extra_env=env)
        return str(call.expect_success()["ips"][0]["address"].split("/")[0])

    @contextlib.contextmanager
    def block_broken(self, cidr: str) -> Iterator[str]:
        """The stored block of this test's pool at `cidr` (an aligned /24) made unreadable, as
        a hand edit gone wrong leaves it: its name in the datastore. Deleted on the way out."""
        key = BlockKey(PoolId(self.network, 4), int(netaddr.IPNetwork(cidr).first))
        if self.etcd is None:
            listed = json.loads(self.cluster.kubectl("get", "ippools", "-A", "-o", "json"))
            [item] = [i for i in listed["items"] if i["metadata"]["name"] == object_name(key)]
            where = ["-n", item["metadata"]["namespace"], "ippool", object_name(key)]
            broken = {"spec": {"allocations": "offset containerID\n7 sandbox-7"}}
            self.cluster.kubectl("patch", *where, "--type=merge", "-p", json.dumps(broken))
            try:
                yield f"IPPool {object_name(key)}"
            finally:
                self.cluster.kubectl("delete", *where)
            return
        client = etcd3.client(host=self.etcd.host, port=self.etcd.port)
        try:
            client.put(block_key(key), "{not json")
            yield f"etcd key {block_key(key)}"
        finally:
            client.delete(block_key(key))
            client.close()

    def held(self) -> dict[str, Owner]:
        """This test's allocations: address -> owner, as the store holds them."""
        return owners_in(self.store, self.network)

    def reconciler_argv(self, *extra: str) -> list[str]:
        return reconciler_argv(self.flat_file, self.kubeconfig, *extra)

    def reconcile(self, *extra: str) -> dict[str, Any]:
        """One pass of the executable; its summary, narrowed to this test's network."""
        summary = reconcile_once(self.flat_file, self.kubeconfig, *extra)
        summary["addresses"] = [a for a in summary["addresses"] if a["network"] == self.network]
        return summary


def reconciler_argv(flat_file: Path, kubeconfig: Path, *extra: str) -> list[str]:
    exe = str(Path(sys.executable).parent / "pyabouts-reconciler")
    return [exe, "--config", str(flat_file), "--kubeconfig", str(kubeconfig), *extra]


def reconcile_once(flat_file: Path, kubeconfig: Path, *extra: str) -> dict[str, Any]:
    """One pass of `pyabouts-reconciler` (the CronJob's), as `kubeconfig`, that must exit 0;
    its JSON summary. Graces as run_reconciler's."""
    done = run_reconciler(flat_file, kubeconfig, *extra)
    assert done.returncode == 0, done.stderr
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def run_reconciler(
    flat_file: Path, kubeconfig: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """One pass of `pyabouts-reconciler`, as `kubeconfig`, whatever its exit. With no
    --gone-grace or --stop-grace in `extra`, 0: a leak found is freed at once, not judged again
    10 s (or 40 s) later (test_reconciler_once has the test of that)."""
    for flag in ("--gone-grace", "--stop-grace"):
        if not any(arg.startswith(flag) for arg in extra):
            extra = (f"{flag}=0", *extra)
    argv = reconciler_argv(flat_file, kubeconfig, *extra)
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def kubeconfig_that_may_not_list_nodes(cluster: ControlPlane) -> Path:
    """A ServiceAccount's kubeconfig that may do what the reconciler does, but list nodes."""
    return _reconciler_kubeconfig_but(cluster, "pyabouts-test-no-nodes", ippools_delete=True)


def kubeconfig_that_may_not_delete_ippools(cluster: ControlPlane) -> Path:
    """The same, that may list nodes but not delete IPPools: a Role of an earlier release."""
    return _reconciler_kubeconfig_but(
        cluster, "pyabouts-test-no-deletes", nodes=True, ippools_delete=False
    )


def _reconciler_kubeconfig_but(
    cluster: ControlPlane, name: str, *, nodes: bool = False, ippools_delete: bool
) -> Path:
    """A ServiceAccount `name` that may read pods and read and update IPPools, and list nodes
    and delete IPPools as told: its kubeconfig."""
    ippool_verbs = ["get", "list", "update", *(["delete"] if ippools_delete else [])]
    node_rules = [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}] if nodes else []
    subject = {"kind": "ServiceAccount", "name": name, "namespace": "kube-system"}
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": "kube-system"},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                {"apiGroups": ["pyabouts.io"], "resources": ["ippools"], "verbs": ippool_verbs},
                *node_rules,
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [subject],
        },
    ]
    apply(cluster, *objects)
    return cluster.service_account_kubeconfig("kube-system", name)


@pytest.fixture(scope="session")
def reconciler_kubeconfig(pyabouts_cluster: ControlPlane) -> Path:
    create_namespace(pyabouts_cluster, NAMESPACE)
    return pyabouts_cluster.service_account_kubeconfig("kube-system", RECONCILER_SA)


@pytest.fixture(params=["kubernetes", "etcd"])
def recon(
    request: pytest.FixtureRequest,
    pyabouts_cluster: ControlPlane,
    reconciler_kubeconfig: Path,
    pyabouts_exe: str,
    tmp_path: Path,
) -> Iterator[ReconcilerEnv]:
    store: PoolStore
    etcd = None
    if request.param == "kubernetes":
        settings: dict[str, Any] = {
            "datastore": "kubernetes",
            "kubernetes": {"kubeconfig": str(pyabouts_cluster.kubeconfig)},
        }
        store = kubernetes_store(str(pyabouts_cluster.kubeconfig))
    else:
        etcd = request.getfixturevalue("etcd_server")
        settings = {"datastore": "etcd", "etcd_host": etcd.endpoint}
        store = etcd_store(etcd)
    flat = tmp_path / "pyabouts.conf"
    flat.write_text(json.dumps(settings))
    yield ReconcilerEnv(
        datastore=request.param,
        cluster=pyabouts_cluster,
        flat_file=flat,
        kubeconfig=reconciler_kubeconfig,
        store=store,
        plugin=pyabouts_exe,
        network=f"recon-{uuid.uuid4().hex[:8]}",
        etcd=etcd,
    )
    store.close()


def pod_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"
