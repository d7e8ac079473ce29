"""The Kubernetes objects of the Multus quickstarts, as JSON for `kubectl apply -f -`, and what
`kubectl exec` shows of a pod's networks: the seed scenarios on the local cluster, for the tests
and the demo alike."""

from __future__ import annotations

import json
from typing import Any

from deploy.local.container_images import TEST_IMAGE
from deploy.local.controlplane import ControlPlane

NETWORKS = "k8s.v1.cni.cncf.io/networks"
NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"


def apply(cluster: ControlPlane, *objects: dict[str, Any]) -> None:
    """`kubectl apply -f -` of `objects`, as one List."""
    listed = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(listed))


def nad(namespace: str, name: str, config: dict[str, Any]) -> dict[str, Any]:
    """A NetworkAttachmentDefinition whose spec.config is `config` (a conf or a conflist)."""
    return {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"config": json.dumps(config)},
    }


def macvlan_nad(namespace: str, name: str, master: str, cidr: str) -> dict[str, Any]:
    """The quickstart's NAD: macvlan in bridge mode on `master`, pyabouts as its IPAM."""
    config = {
        "cniVersion": "0.3.1",
        "type": "macvlan",
        "master": master,
        "mode": "bridge",
        "ipam": {"type": "pyabouts", "range": cidr, "network_name": name},
    }
    return nad(namespace, name, config)


def pod(namespace: str, name: str, networks: str, command: str = "sleep 3600") -> dict[str, Any]:
    """A pod of the test image (busybox) annotated with `networks`, running `command`."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": {NETWORKS: networks}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": TEST_IMAGE, "command": ["sh", "-c", command]}],
        },
    }


def deployment(namespace: str, name: str, networks: str, replicas: int) -> dict[str, Any]:
    """`replicas` pods like :func:`pod`'s, labelled app=`name`."""
    one = pod(namespace, name, networks)
    template = {
        "metadata": {"labels": {"app": name}, "annotations": one["metadata"]["annotations"]},
        "spec": one["spec"],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": template,
        },
    }


def wait_ready(cluster: ControlPlane, namespace: str, *names: str) -> None:
    pods = [f"pod/{name}" for name in names]
    cluster.kubectl("wait", "--for=condition=Ready", *pods, "-n", namespace, "--timeout=120s")


def exec_in(cluster: ControlPlane, namespace: str, name: str, *command: str) -> str:
    """`kubectl exec` of `command` in the pod; its output."""
    return cluster.kubectl("exec", "-n", namespace, name, "--", *command)


def address_of(cluster: ControlPlane, namespace: str, name: str, interface: str = "net1") -> str:
    """`interface`'s IPv4 address with its prefix, as `ip` shows it inside the pod."""
    shown = exec_in(cluster, namespace, name, "ip", "-4", "-o", "addr", "show", interface).split()
    return shown[shown.index("inet") + 1]


def network_status(cluster: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    """The pod's network-status annotation, as Multus wrote it."""
    found = json.loads(cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json"))
    return list(json.loads(found["metadata"]["annotations"][NETWORK_STATUS]))
