"""Pod and Node objects on the local apiserver, as the scheduler and kubelet would leave them.

There is no scheduler or kubelet: a Pod object is created with `spec.nodeName` set, its status is
patched through the status subresource, and a graceful deletion stays Terminating until a
deletion with grace period 0 (what kubelet's confirmation, or `kubectl delete --force`, does).
"""

from __future__ import annotations

import json
from typing import Any

from deploy.local.controlplane import ControlPlane
from pyabouts.controller.pods import NETWORK_STATUS


class PodRuntimeError(RuntimeError):
    """A step of playing the scheduler, kubelet or the runtime failed (not the code under test)."""


def _expect(answer: tuple[int, Any], *statuses: int) -> Any:
    status, body = answer
    if status not in statuses:
        raise PodRuntimeError(f"API answered {status}: {body}")
    return body


def create_namespace(cluster: ControlPlane, name: str) -> None:
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    _expect(cluster.request("POST", "/api/v1/namespaces", body), 201, 409)


def create_pod(
    cluster: ControlPlane,
    namespace: str,
    name: str,
    node: str = "node-a",
    annotations: dict[str, str] | None = None,
    *,
    termination_grace: int | None = None,
) -> str:
    """A Pod bound to `node` (with `termination_grace` as its terminationGracePeriodSeconds,
    else the API's default, 30); its UID."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        metadata["annotations"] = annotations
    spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "app", "image": "pause"}]}
    if termination_grace is not None:
        spec["terminationGracePeriodSeconds"] = termination_grace
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
    created = _expect(cluster.request("POST", f"/api/v1/namespaces/{namespace}/pods", body), 201)
    return str(created["metadata"]["uid"])


def set_status(cluster: ControlPlane, namespace: str, name: str, status: dict[str, Any]) -> None:
    path = f"/api/v1/namespaces/{namespace}/pods/{name}/status"
    _expect(cluster.request("PATCH", path, {"status": status}), 200)


def set_network_status(cluster: ControlPlane, namespace: str, name: str, *ips: str) -> None:
    """The annotation Multus writes after a successful ADD."""
    entries = [{"name": f"{namespace}/net", "interface": "net1", "ips": list(ips)}]
    patch = {"metadata": {"annotations": {NETWORK_STATUS: json.dumps(entries)}}}
    _expect(cluster.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}", patch), 200)


def network_status(cluster: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    """The network-status annotation Multus wrote on the pod ([] when there is none)."""
    pod = _expect(cluster.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}"), 200)
    entries: list[dict[str, Any]] = json.loads(
        pod["metadata"].get("annotations", {}).get(NETWORK_STATUS, "[]")
    )
    return entries


def delete_pod(
    cluster: ControlPlane, namespace: str, name: str, *, grace_seconds: int | None = 0
) -> None:
    """Delete the pod: at once (grace 0, a force-delete), or gracefully (it stays Terminating)."""
    path = f"/api/v1/namespaces/{namespace}/pods/{name}"
    if grace_seconds is not None:
        path += f"?gracePeriodSeconds={grace_seconds}"
    _expect(cluster.request("DELETE", path), 200, 202, 404)


def lost_node_condition() -> dict[str, Any]:
    """What the taint manager sets on a pod of an unreachable node before deleting it."""
    return {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "DeletionByTaintManager",
        "message": "Taint manager: deleting due to NoExecute taint",
    }


def create_node(cluster: ControlPlane, name: str) -> None:
    """A Node object, as a kubelet registers it (none runs for it: it never turns Ready)."""
    body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
    _expect(cluster.request("POST", "/api/v1/nodes", body), 201, 409)


def delete_node(cluster: ControlPlane, name: str) -> None:
    _expect(cluster.request("DELETE", f"/api/v1/nodes/{name}"), 200, 404)
