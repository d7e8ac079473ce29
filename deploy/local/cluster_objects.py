"""The Kubernetes objects of the Multus quickstarts, as JSON for `kubectl apply -f -`, and what
`kubectl exec` shows of a pod's networks: the seed scenarios on the local cluster, for the tests
and the demo alike."""

from __future__ import annotations

import json
import time
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


def macvlan_nad(
    namespace: str,
    name: str,
    master: str,
    cidr: str,
    *,
    ipam: str = "pyabouts",
    gateway: str | None = None,
    node_slice_size: str | None = None,
) -> dict[str, Any]:
    """The quickstart's NAD: macvlan in bridge mode on `master`, with pyabouts (or the reference
    plugins' host-local, the baseline of the scale figures) as its IPAM."""
    settings: dict[str, Any] = (
        {"type": "pyabouts", "range": cidr, "network_name": name}
        if ipam == "pyabouts"
        else {"type": ipam, "ranges": [[{"subnet": cidr}]]}
    )
    if gateway:
        settings["gateway"] = gateway
    if node_slice_size:
        settings["node_slice_size"] = node_slice_size
    config = {
        "cniVersion": "0.3.1",
        "type": "macvlan",
        "master": master,
        "mode": "bridge",
        "ipam": settings,
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


def scale_and_wait(
    cluster: ControlPlane, namespace: str, name: str, replicas: int, *, timeout_s: int = 600
) -> float:
    """Scale deployment `name` to `replicas` and wait until its rollout is complete (every pod
    Ready, or every pod gone at 0); the seconds that took. KubectlError after `timeout_s`."""
    started = time.monotonic()
    cluster.kubectl("scale", f"deployment/{name}", "-n", namespace, f"--replicas={replicas}")
    cluster.kubectl(
        "rollout", "status", f"deployment/{name}", "-n", namespace, f"--timeout={timeout_s}s"
    )
    if replicas == 0:
        selector = f"app={name}"
        cluster.kubectl(
            "wait", "--for=delete", "pod", "-l", selector, "-n", namespace, "--timeout=300s"
        )
    return time.monotonic() - started


def pod_addresses(
    cluster: ControlPlane, namespace: str, selector: str, interface: str = "net1"
) -> dict[str, str]:
    """`interface`'s address of each pod matching `selector`, from its network-status (pods
    without one, whose sandbox Multus has not set up, are left out)."""
    listed = json.loads(
        cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
    )["items"]
    found = {}
    for item in listed:
        annotations = item["metadata"].get("annotations", {})
        if NETWORK_STATUS not in annotations:  # not (yet) set up by Multus
            continue
        status = json.loads(annotations[NETWORK_STATUS])
        (entry,) = [e for e in status if e["interface"] == interface]
        found[item["metadata"]["name"]] = entry["ips"][0]
    return found
