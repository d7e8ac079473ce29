"""Pods as the reconciler sees them: read from the API as raw JSON, reduced to PodState.

Lists go page by page and skip the client's model classes (json.loads is ~50x faster than the
generated deserializers on 10k pods). A list without a resourceVersion is a consistent read
from etcd, never a cache, which the reconciler's safety argument relies on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from pyabouts.controller.leaks import DEFAULT_STOP_GRACE_SECONDS, PodState

log = logging.getLogger(__name__)

NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
MIRROR_OF = "kubernetes.io/config.mirror"  # on a static pod's mirror: the kubelet's UID of it
LIST_PAGE = 500
REQUEST_TIMEOUT = 30.0


def pod_state(pod: Mapping[str, Any]) -> PodState:
    """The PodState of a pod object (a dict as the API sends it)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    spec = pod.get("spec") or {}
    conditions = status.get("conditions") or []
    annotations = meta.get("annotations") or {}
    return PodState(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        phase=str(status.get("phase") or "Pending"),
        created=_epoch(meta.get("creationTimestamp")),
        deleting_by=_epoch(meta["deletionTimestamp"]) if meta.get("deletionTimestamp") else None,
        disrupted=any(
            c.get("type") == "DisruptionTarget"
            and c.get("status") == "True"
            and c.get("reason") == "DeletionByTaintManager"
            for c in conditions
            if isinstance(c, dict)
        ),
        network_ips=network_status_ips(annotations.get(NETWORK_STATUS)),
        mirror_of=str(annotations.get(MIRROR_OF) or ""),
        node=str(spec.get("nodeName") or ""),
        stop_grace=_seconds_or(
            spec.get("terminationGracePeriodSeconds"), DEFAULT_STOP_GRACE_SECONDS
        ),
        deleted_at_once=bool(meta.get("deletionTimestamp"))
        and meta.get("deletionGracePeriodSeconds") == 0,
        containers_terminated=_all_terminated(status),
    )


# Every container of the pod's sandbox: sidecars (init containers that keep running) and
# ephemeral containers share its network namespace, and outlive its main containers.
_CONTAINER_STATUSES = ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses")


def _all_terminated(status: dict[str, Any]) -> bool:
    """Whether the pod's status lists its containers (status.containerStatuses) and every one
    of its containers' statuses, init and ephemeral ones too, says terminated."""
    if not isinstance(status.get("containerStatuses"), list) or not status["containerStatuses"]:
        return False
    lists = [status.get(key) or [] for key in _CONTAINER_STATUSES]
    return all(
        isinstance(statuses, list)
        and all(
            isinstance(c, dict) and isinstance(c.get("state"), dict) and "terminated" in c["state"]
            for c in statuses
        )
        for statuses in lists
    )


def _seconds_or(value: object, default: float) -> float:
    """`value` as seconds if it is a number of them (not a bool, not negative), else `default`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return default
    return float(value)


def network_status_ips(annotation: object) -> frozenset[str] | None:
    """The IPs Multus recorded in the network-status annotation; None if it has none (yet)."""
    if not isinstance(annotation, str):
        return None
    try:
        entries = json.loads(annotation)
    except (ValueError, RecursionError):  # anyone who may create a pod writes it
        return None
    if not isinstance(entries, list):
        return None
    # Whoever may create or patch a pod writes it: anything but a list of strings is no IPs.
    return frozenset(
        ip.split("/")[0]
        for entry in entries
        if isinstance(entry, dict) and isinstance(entry.get("ips"), list)
        for ip in entry["ips"]
        if isinstance(ip, str)
    )


@dataclass(frozen=True, slots=True)
class PodListing:
    pods: dict[str, PodState]  # by "namespace/name"
    resource_version: str  # where a watch that follows the listing starts


class PodReader:
    """Reads pods through one API client."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self._api = k8s.CoreV1Api(api_client)
        self._apps = k8s.AppsV1Api(api_client)

    def list_all(self) -> PodListing:
        pods: dict[str, PodState] = {}
        version = ""
        for page in list_pages(self._api.list_pod_for_all_namespaces):
            for item in page.get("items") or []:
                state = pod_state(item)
                pods[state.ref] = state
            version = str((page.get("metadata") or {}).get("resourceVersion", ""))
        return PodListing(pods, version)

    def statefulsets(self) -> dict[str, range] | None:
        """The ordinals each StatefulSet ("namespace/name") has now, none for one being
        deleted. None when they cannot be listed (RBAC not updated, say): every sticky address
        is then kept for now."""
        found: dict[str, range] = {}
        try:
            for page in list_pages(self._apps.list_stateful_set_for_all_namespaces):
                for item in page.get("items") or []:
                    meta, spec = item.get("metadata") or {}, item.get("spec") or {}
                    start = int((spec.get("ordinals") or {}).get("start", 0))
                    replicas = 0 if meta.get("deletionTimestamp") else int(spec.get("replicas", 1))
                    name = f"{meta.get('namespace')}/{meta.get('name')}"
                    found[name] = range(start, start + replicas)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("cannot list StatefulSets, keeping every sticky address: %s", exc)
            return None
        return found

    def node_names(self) -> set[str] | None:
        """The names of the cluster's nodes (for node slices: a node gone gives its back). None
        when this reconciler may not list them (RBAC not updated, say): no slice is then given
        back, and a static pod without a mirror pod keeps its address, while the rest is
        reconciled. Any other failure fails the pass, as the API down does."""
        try:
            return {
                str((item.get("metadata") or {}).get("name", ""))
                for page in list_pages(self._api.list_node)
                for item in page.get("items") or []
            }
        except ApiException as exc:
            if exc.status not in (401, 403):
                raise
            log.warning("may not list nodes, giving back no node slice: %s", exc.reason)
            return None

    def read(self, ref: str) -> PodState | None:
        """The pod "namespace/name", or None if there is none."""
        namespace, _, name = ref.partition("/")
        try:
            pod = _json(
                self._api.read_namespaced_pod(
                    name, namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
                )
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return pod_state(pod)


def list_pages(list_call: Callable[..., Any]) -> Iterator[dict[str, Any]]:
    """A list, page by page; the last page's metadata carries the list's resourceVersion."""
    token: str | None = None
    while True:
        page = _json(
            list_call(
                limit=LIST_PAGE,
                _continue=token,
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT,
            )
        )
        yield page
        token = (page.get("metadata") or {}).get("continue") or None
        if token is None:
            return


def _json(response: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(response.data)
    return body


def _epoch(timestamp: object) -> float:
    if not isinstance(timestamp, str):
        return 0.0
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
