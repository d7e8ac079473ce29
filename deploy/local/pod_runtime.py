"""Pods as kubelet and the container runtime make them, on the local apiserver, through Multus.

A pod is a Pod object (bound to this node, as after scheduling) plus a network namespace. Its
network is set up exactly as a node does it: the Multus thin plugin (built from its Go module by
build_binaries.sh) is called with the runtime's CNI environment; it reads the pod's
`k8s.v1.cni.cncf.io/networks` annotation and the NetworkAttachmentDefinitions, delegates eth0 to
the cluster-default network (ptp + host-local) and each attachment to its NAD's plugins (macvlan
with pyabouts as IPAM), and writes the pod's network-status annotation.

Addresses: eth0 comes from DEFAULT_SUBNET, 198.19.0.0/25, unless a node is given another range.
ptp puts that range on the host side (the gateway address on every pod's veth and a /32 route to
each pod), so it must not overlap a route the host has: a node refuses such a range
(RouteOverlapError, naming the route) before it sets anything up. Never 203.0.113.0/24: the
package mirrors resolve into it on these machines, and host-local hands out every address of its
range sooner or later. NADs (macvlan inside the pods, nothing on the host) use 198.51.100.0/24.

The rule for the check: every route the host has counts, from every table (the local table holds
the host's own addresses), except default routes and routes to pods, i.e. a single address on a
veth whose other end is in another namespace, which is what ptp makes. So several nodes may share
a range at once (tests on two xdist workers, each with its own node and host-local data dir): a
pod address may then be in use twice, which nothing here minds, as no packet goes over eth0.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.local.controlplane import ControlPlane
from deploy.local.netns import (
    CNI_REFERENCE_DIR,
    CniCall,
    Pod,
    pod_namespace,
    refuse_overlapping_routes,
    run_cni,
)
from deploy.local.pod_objects import PodRuntimeError, create_pod, delete_pod, network_status

MULTUS_VERSION = "v4.2.3"
CACHE_BIN = Path(os.environ.get("PYABOUTS_CACHE", Path.home() / ".cache" / "pyabouts")) / "bin"
MULTUS_BINARY = CACHE_BIN / f"multus-{MULTUS_VERSION}"
NAD_CRD = CACHE_BIN / f"multus-{MULTUS_VERSION}-nad-crd.yaml"
NETWORKS = "k8s.v1.cni.cncf.io/networks"
# eth0's range, on the host side through ptp. Inside 198.18.0.0/15 but clear of 198.18.0.0/24,
# which the environment notes' kubelet cluster puts on its cni0 bridge.
DEFAULT_SUBNET = "198.19.0.0/25"
# Multus thin reads the pod with a short deadline and fails the ADD with this when it passes.
MULTUS_GAVE_UP = "error waiting for pod"
SANDBOX_RETRIES = 4  # kubelet itself never stops retrying a sandbox
REFERENCE_PLUGINS = ("macvlan", "tuning", "ptp", "host-local", "loopback", "static")


def install_nad_crd(cluster: ControlPlane) -> None:
    """The NetworkAttachmentDefinition CRD from the Multus module, served and established."""
    if not NAD_CRD.is_file():
        raise PodRuntimeError(
            f"{NAD_CRD} is missing: run bash deploy/local/build_binaries.sh multus"
        )
    cluster.kubectl("apply", "-f", str(NAD_CRD))
    crd = "crd/network-attachment-definitions.k8s.cni.cncf.io"
    cluster.kubectl("wait", "--for=condition=Established", crd, "--timeout=60s")


def create_nad(cluster: ControlPlane, namespace: str, name: str, config: dict[str, Any]) -> None:
    """A NetworkAttachmentDefinition whose spec.config is `config` (a conf or a conflist)."""
    body = {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"config": json.dumps(config)},
    }
    path = f"/apis/k8s.cni.cncf.io/v1/namespaces/{namespace}/network-attachment-definitions"
    status, answer = cluster.request("POST", path, body)
    if status not in (201, 409):
        raise PodRuntimeError(f"creating NAD {namespace}/{name}: {status} {answer}")


@dataclass
class RunningPod:
    namespace: str
    name: str
    uid: str
    sandbox: Pod  # its network namespace
    container_id: str
    result: dict[str, Any] = field(default_factory=dict)  # Multus's CNI result

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


class Node:
    """One node's CNI set-up: a bin dir (multus, the reference plugins, pyabouts) and Multus's
    config, with the admin kubeconfig so that Multus can read NADs and annotate pods. Its pods'
    eth0 come from `subnet` (ptp + host-local), which must overlap no route of the host."""

    def __init__(
        self,
        cluster: ControlPlane,
        workdir: Path,
        pyabouts: str,
        name: str,
        subnet: str = DEFAULT_SUBNET,
    ) -> None:
        refuse_overlapping_routes(subnet)  # before anything is set up
        if not MULTUS_BINARY.is_file():
            raise PodRuntimeError(
                f"{MULTUS_BINARY} is missing: run bash deploy/local/build_binaries.sh multus"
            )
        self.cluster = cluster
        self.name = name
        self.bin_dir = workdir / "bin"
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        _link(self.bin_dir / "multus", MULTUS_BINARY)
        _link(self.bin_dir / "pyabouts", Path(pyabouts))
        for plugin in REFERENCE_PLUGINS:
            _link(self.bin_dir / plugin, Path(CNI_REFERENCE_DIR) / plugin)
        self.multus_conf = {
            "cniVersion": "0.3.1",
            "name": "multus-cni-network",
            "type": "multus",
            "kubeconfig": str(cluster.kubeconfig),
            "cniDir": str(workdir / "multus-cache"),
            "binDir": str(self.bin_dir),
            "delegates": [
                {
                    "cniVersion": "0.3.1",
                    "name": "cluster-default",
                    "type": "ptp",
                    "ipam": {
                        "type": "host-local",
                        "subnet": subnet,
                        "dataDir": str(workdir / "host-local"),
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                }
            ],
        }
        self._stack = contextlib.ExitStack()
        self._lock = threading.Lock()  # pods may start from several threads at once
        self.pods: dict[str, RunningPod] = {}

    def close(self) -> None:
        """Tear down every pod still running (DEL through Multus), then their namespaces."""

        def stop(pod: RunningPod) -> None:
            with contextlib.suppress(PodRuntimeError):
                self.stop_pod(pod)

        with ThreadPoolExecutor(max_workers=10) as pool:  # as kubelet does, several at once
            list(pool.map(stop, list(self.pods.values())))
        self._stack.close()

    # ---- what the scheduler and kubelet do

    def create_pod(self, namespace: str, name: str, networks: str | list[Any]) -> str:
        """The Pod object, bound to this node, annotated with its attachments; its UID."""
        annotation = networks if isinstance(networks, str) else json.dumps(networks)
        return create_pod(self.cluster, namespace, name, self.name, {NETWORKS: annotation})

    def start_pod(self, namespace: str, name: str, uid: str) -> RunningPod:
        """The sandbox: a network namespace, and CNI ADD through Multus."""
        with self._lock:
            sandbox = self._stack.enter_context(pod_namespace(name[:20]))
        pod = RunningPod(namespace, name, uid, sandbox, container_id=uuid.uuid4().hex)
        call = self._multus("ADD", pod)
        for _ in range(SANDBOX_RETRIES):
            if call.ok or MULTUS_GAVE_UP not in call.stdout:
                break
            # Multus could not read the pod in time (busy apiserver): the runtime tears the
            # sandbox's network down and tries again, as kubelet does.
            self._multus("DEL", pod)
            call = self._multus("ADD", pod)
        if not call.ok:
            raise PodRuntimeError(f"ADD of {pod.ref} failed: {call.stdout} {call.stderr[-2000:]}")
        pod.result = call.result
        with self._lock:
            self.pods[pod.ref] = pod
        return pod

    def run_pod(self, namespace: str, name: str, networks: str | list[Any]) -> RunningPod:
        """create_pod, then start_pod: a pod as it comes up on this node."""
        return self.start_pod(namespace, name, self.create_pod(namespace, name, networks))

    def stop_pod(self, pod: RunningPod) -> None:
        """Delete the pod as kubelet does: CNI DEL through Multus, then the Pod object goes."""
        call = self._multus("DEL", pod)
        if not call.ok:
            raise PodRuntimeError(f"DEL of {pod.ref} failed: {call.stdout} {call.stderr[-2000:]}")
        delete_pod(self.cluster, pod.namespace, pod.name)
        with self._lock:
            self.pods.pop(pod.ref, None)

    def crash_pod(self, pod: RunningPod) -> None:
        """The pod is force-deleted and its node never says DEL: only the Pod object goes."""
        delete_pod(self.cluster, pod.namespace, pod.name)
        with self._lock:
            self.pods.pop(pod.ref, None)

    def network_status(self, pod: RunningPod) -> list[dict[str, Any]]:
        return network_status(self.cluster, pod.namespace, pod.name)

    def _multus(self, command: str, pod: RunningPod) -> CniCall:
        args = (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
            f"K8S_POD_INFRA_CONTAINER_ID={pod.container_id};K8S_POD_UID={pod.uid}"
        )
        return run_cni(
            str(self.bin_dir / "multus"),
            command,
            self.multus_conf,
            container_id=pod.container_id,
            netns=pod.sandbox.netns_path,
            ifname="eth0",
            cni_path=str(self.bin_dir),
            cni_args=args,
            timeout=120,
        )


@contextlib.contextmanager
def running_node(
    cluster: ControlPlane,
    workdir: Path,
    pyabouts: str,
    name: str = "node-a",
    subnet: str = DEFAULT_SUBNET,
) -> Iterator[Node]:
    node = Node(cluster, workdir, pyabouts, name, subnet)
    try:
        yield node
    finally:
        node.close()


def macvlan_nad(master: str, ipam: dict[str, Any], **plugin: Any) -> dict[str, Any]:
    """A NAD config: macvlan on `master` (bridge mode) with pyabouts as its IPAM."""
    return {
        "cniVersion": "0.3.1",
        "type": "macvlan",
        "master": master,
        "mode": "bridge",
        **plugin,
        "ipam": {"type": "pyabouts", **ipam},
    }


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    resolved = target if target.is_absolute() else Path(shutil.which(str(target)) or target)
    link.symlink_to(resolved.absolute())
