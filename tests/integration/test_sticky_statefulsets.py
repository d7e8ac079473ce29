"""sticky_statefulsets on the real apiserver, through the plugin as kubelet runs it and the
reconciler's executable: a StatefulSet's pod re-created keeps its address, with its DEL and a
reconciler pass in between; other pods never get it; scaling 3 to 1 frees ordinals 1 and 2, and
deleting the StatefulSet frees the last."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.local.controlplane import ControlPlane
from deploy.local.pod_objects import create_namespace, create_pod, delete_pod
from tests.integration.plugin_fixtures import kubernetes_datastore
from tests.integration.plugin_processes import cni, netconf
from tests.integration.reconciler_env import reconcile_once
from tests.integration.stored_state import owners_on

pytestmark = pytest.mark.integration

NAMESPACE = "sticky"
PYABOUTS = str(Path(sys.executable).parent / "pyabouts")  # the in-process plugin


class Node:
    """The plugin, as one node's kubelet calls it, for one sticky network."""

    def __init__(self, cluster: ControlPlane, flat_file: Path, network: str) -> None:
        self.cluster = cluster
        self.conf = netconf(
            type="pyabouts",
            range="10.73.0.0/24",
            network_name=network,
            configuration_path=str(flat_file),
            sticky_statefulsets=True,
        )
        self.sandboxes: dict[str, str] = {}

    def start(self, pod: str) -> str:
        """The pod created (again), and its ADD from a new sandbox: the address it got."""
        uid = create_pod(self.cluster, NAMESPACE, pod)
        self.sandboxes[pod] = f"s-{pod}-{uuid.uuid4().hex[:6]}"
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={pod};K8S_POD_UID={uid}"
        call = cni(PYABOUTS, "ADD", self.conf, self.sandboxes[pod], args)
        return str(call.expect_success()["ips"][0]["address"].split("/")[0])

    def stop(self, pod: str) -> None:
        """Its sandbox's DEL, then the pod deleted."""
        cni(PYABOUTS, "DEL", self.conf, self.sandboxes[pod]).expect_success()
        delete_pod(self.cluster, NAMESPACE, pod)


@pytest.fixture
def flat_file(pyabouts_cluster: ControlPlane, tmp_path: Path) -> Path:
    path = tmp_path / "pyabouts.conf"
    path.write_text(json.dumps(kubernetes_datastore(pyabouts_cluster)))
    return path


@pytest.fixture
def statefulset(pyabouts_cluster: ControlPlane) -> Iterator[str]:
    """A StatefulSet of 3 (no controller-manager runs here: the test makes its pods)."""
    create_namespace(pyabouts_cluster, NAMESPACE)
    name = f"db-{uuid.uuid4().hex[:6]}"
    labels = {"app": name}
    body: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": 3,
            "serviceName": name,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "db", "image": "example.invalid/db"}]},
            },
        },
    }
    pyabouts_cluster.kubectl("create", "-f", "-", input=json.dumps(body))
    yield name
    pyabouts_cluster.kubectl("delete", "statefulset", name, "-n", NAMESPACE, "--ignore-not-found")


def held(cluster: ControlPlane, network: str) -> dict[str, str]:
    """address -> pod of `network`'s entries (reserved ones included)."""
    return {address: owner.pod for address, owner in owners_on(cluster, network).items()}


def test_a_statefulsets_pods_keep_their_addresses_until_it_no_longer_has_them(
    pyabouts_cluster: ControlPlane,
    statefulset: str,
    flat_file: Path,
    reconciler_kubeconfig: Path,
) -> None:
    network = f"sticky-{uuid.uuid4().hex[:6]}"
    node = Node(pyabouts_cluster, flat_file, network)
    pods = [f"{statefulset}-{i}" for i in range(3)]
    given = {pod: node.start(pod) for pod in pods}
    plain = f"web-{uuid.uuid4().hex[:6]}"  # no StatefulSet's
    plain_address = node.start(plain)

    def reconcile() -> None:
        reconcile_once(flat_file, reconciler_kubeconfig)

    # Ordinal 1 deleted (DEL, then the pod), a reconciler pass: its address stays reserved.
    node.stop(pods[1])
    node.stop(plain)
    reconcile()
    assert held(pyabouts_cluster, network)[given[pods[1]]] == f"{NAMESPACE}/{pods[1]}"
    assert plain_address not in held(pyabouts_cluster, network)  # not a StatefulSet's: freed
    # Other pods never get it (the lowest free address goes to them), and ordinal 1, created
    # again, takes it back.
    newcomers = [node.start(f"new-{uuid.uuid4().hex[:6]}") for _ in range(3)]
    assert given[pods[1]] not in newcomers
    assert node.start(pods[1]) == given[pods[1]]

    # Scaled from 3 to 1: the pods of ordinals 1 and 2 go, and a pass frees their addresses.
    pyabouts_cluster.kubectl("scale", "statefulset", statefulset, "-n", NAMESPACE, "--replicas=1")
    node.stop(pods[1])
    node.stop(pods[2])
    reconcile()
    after = held(pyabouts_cluster, network)
    assert given[pods[1]] not in after and given[pods[2]] not in after
    assert after[given[pods[0]]] == f"{NAMESPACE}/{pods[0]}"

    # Ordinal 0 deleted while the StatefulSet still has it: kept; the StatefulSet deleted: freed.
    node.stop(pods[0])
    reconcile()
    assert given[pods[0]] in held(pyabouts_cluster, network)
    pyabouts_cluster.kubectl("delete", "statefulset", statefulset, "-n", NAMESPACE)
    reconcile()
    assert given[pods[0]] not in held(pyabouts_cluster, network)
