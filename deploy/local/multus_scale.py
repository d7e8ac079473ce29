"""A Deployment scaled up and down on two networks of one IPAM through Multus on the local
cluster: the scale figures of the Multus tests (tests/e2e/test_cluster_multus.py) and of the
Multus thick benchmark (bench/multus_scale.py), measured the same way in both.

In thick mode every delegate (pyabouts' shim, host-local, macvlan) runs inside the Multus
daemon's container, within its limits: whether the daemon restarted (OOM-killed) while an IPAM
served is part of the figures.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from deploy.local.cluster_objects import (
    apply,
    deployment,
    macvlan_nad,
    pod_addresses,
    scale_and_wait,
)
from deploy.local.controlplane import ControlPlane, KubectlError
from deploy.local.multus_install import DAEMONSET
from deploy.local.multus_install import NAMESPACE as MULTUS_NAMESPACE

#: host-local keeps its reservations here, a directory per network, left after the DELs.
HOST_LOCAL_DATA = Path("/var/lib/cni/networks")
RESOURCE_LIMITS = "/spec/template/spec/containers/0/resources/limits"
#: Two disjoint /25s per IPAM, one per network, none on the host side.
RANGES = {
    "pyabouts": ("198.19.2.0/25", "198.19.2.128/25"),
    "host-local": ("198.19.3.0/25", "198.19.3.128/25"),
}
INTERFACES = ("net1", "net2")


@dataclass(frozen=True)
class ScaleFigures:
    """One IPAM's round: the Deployment scaled 0 -> `replicas` and back."""

    ipam: str
    replicas: int
    up_seconds: float | None  # until every pod was Ready; None: not within the round's time
    ready: int  # pods Ready at the end of the scale-up (all of them, or when its time ran out)
    down_seconds: float  # until every pod was gone
    #: Each Multus container's (restart count, why it last ended), before and after the round
    #: (its scale-up and its scale-down).
    restarts_before: tuple[tuple[int, str], ...]
    restarts_after: tuple[tuple[int, str], ...]
    #: per network: pod -> the address it got there, at full scale.
    addresses: Mapping[str, Mapping[str, str]]

    @property
    def multus_restarted(self) -> bool:
        return self.restarts_after != self.restarts_before

    @property
    def duplicates(self) -> int:
        """Addresses given to more than one pod of a network."""
        return sum(len(held) - len(set(held.values())) for held in self.addresses.values())


def networks_of(ipam: str) -> tuple[str, str]:
    return (f"scale-{ipam}-a", f"scale-{ipam}-b")


def multus_restarts(cluster: ControlPlane) -> tuple[tuple[int, str], ...]:
    """Each Multus container's restart count and why it last ended (OOMKilled, ...)."""
    listed = json.loads(
        cluster.kubectl("get", "pods", "-n", MULTUS_NAMESPACE, "-l", "app=multus", "-o", "json")
    )["items"]
    statuses = [c for item in listed for c in item["status"]["containerStatuses"]]
    ended = [c.get("lastState", {}).get("terminated", {}) for c in statuses]
    return tuple(
        (c["restartCount"], e.get("reason", "-")) for c, e in zip(statuses, ended, strict=True)
    )


def set_multus_limits(cluster: ControlPlane, limits: Mapping[str, str]) -> None:
    """Replace the Multus container's resource limits (what its users do, Multus #1346) and
    wait for the new daemon."""
    patch = [{"op": "replace", "path": RESOURCE_LIMITS, "value": dict(limits)}]
    cluster.kubectl(
        "patch", DAEMONSET, "-n", MULTUS_NAMESPACE, "--type=json", f"-p={json.dumps(patch)}"
    )
    cluster.kubectl("rollout", "status", DAEMONSET, "-n", MULTUS_NAMESPACE, "--timeout=180s")


#: Called at full scale with each network's pod -> address: what the pools hold is checked there.
AtFullScale = Callable[[Mapping[str, Mapping[str, str]]], None]


def scale_round(
    cluster: ControlPlane,
    namespace: str,
    master: str,
    ipam: str,
    replicas: int,
    *,
    at_full_scale: AtFullScale | None = None,
    ready_timeout_s: int = 600,
) -> ScaleFigures:
    """A Deployment on two macvlan NADs of `ipam` (on `master`), scaled from 0 to `replicas`
    (timed until all are Ready, for `ready_timeout_s` at most; each pod's addresses read then)
    and back to 0. A round whose pods were not all Ready in time restarts the Multus daemon
    after it (a daemon OOM-killed over and over waits minutes in back-off)."""
    name = f"scale-{ipam}"
    networks = networks_of(ipam)
    nads = [
        macvlan_nad(namespace, network, master, cidr, ipam=ipam)
        for network, cidr in zip(networks, RANGES[ipam], strict=True)
    ]
    apply(cluster, *nads, deployment(namespace, name, ",".join(networks), 0))
    before = multus_restarts(cluster)
    try:
        up: float | None = None
        with contextlib.suppress(KubectlError):  # not all Ready in time: a figure too
            up = scale_and_wait(cluster, namespace, name, replicas, timeout_s=ready_timeout_s)
        ready = ready_pods(cluster, namespace, name)
        addresses = {
            network: pod_addresses(cluster, namespace, f"app={name}", interface)
            for network, interface in zip(networks, INTERFACES, strict=True)
        }
        if at_full_scale is not None and up is not None:
            at_full_scale(addresses)
        down = scale_and_wait(cluster, namespace, name, 0)
        # After the scale-down too: a restart there loses DELs (Multus' shim answers a DEL the
        # daemon never got with success), so it belongs to the round.
        after = multus_restarts(cluster)
    finally:
        for network in networks:
            shutil.rmtree(HOST_LOCAL_DATA / network, ignore_errors=True)
    if up is None:
        restart_multus(cluster)  # out of its crash-loop back-off, for the next round
    return ScaleFigures(ipam, replicas, up, ready, down, before, after, addresses)


def ready_pods(cluster: ControlPlane, namespace: str, name: str) -> int:
    found = json.loads(cluster.kubectl("get", f"deployment/{name}", "-n", namespace, "-o", "json"))
    return int(found.get("status", {}).get("readyReplicas") or 0)


def restart_multus(cluster: ControlPlane) -> None:
    """A fresh Multus daemon, as one that was OOM-killed in a row waits minutes to start again."""
    cluster.kubectl("delete", "pod", "-n", MULTUS_NAMESPACE, "-l", "app=multus", "--wait=true")
    cluster.kubectl("rollout", "status", DAEMONSET, "-n", MULTUS_NAMESPACE, "--timeout=180s")
