"""A private Kubernetes control plane for one benchmark run, and its request counters.

deploy.local.controlplane runs a real kube-apiserver (built once by
deploy/local/build_binaries.sh) on its own etcd. The run applies what `kubectl apply -k deploy/`
installs (the IPPool CRD, the plugin's ServiceAccount and RBAC) and calls the plugin as that
ServiceAccount, as a node would. The apiserver's `/metrics` (`apiserver_request_total`) tells how
many requests the plugin made to the `pyabouts.io` group.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deploy.local import whereabouts_install
from deploy.local.controlplane import KUBE_VERSION, ControlPlane, start_control_plane
from deploy.local.install import install_pyabouts
from pyabouts.ipam.stores.kubernetes import GROUP as API_GROUP

PLUGIN_NAMESPACE = "kube-system"
PLUGIN_SERVICE_ACCOUNT = "pyabouts"
PLUGIN_ROLE = "pyabouts-plugin"  # its IPPool rights, a Role and RoleBinding in its namespace
REQUEST_METRIC = "apiserver_request_total"
WHEREABOUTS_GROUP = whereabouts_install.GROUP
LEASE_GROUP = "coordination.k8s.io"
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)\{(?P<labels>.*)\}\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class KubeCluster:
    """The running control plane and what the plugin needs to reach it."""

    control_plane: ControlPlane
    plugin_kubeconfig: Path  # the `pyabouts` ServiceAccount's, as a node would have

    @property
    def version(self) -> str:
        return KUBE_VERSION

    def group_requests(self, *groups: str) -> Counter[str]:
        """Requests served so far to `groups` (default: pyabouts'), by "<VERB> <code>"
        (cumulative)."""
        status, body = self.control_plane.request("GET", "/metrics")
        if status != 200 or not isinstance(body, str):
            raise RuntimeError(f"GET /metrics answered {status}")
        counts: Counter[str] = Counter()
        for group in groups or (API_GROUP,):
            counts += requests_by_verb_and_code(body, group)
        return counts

    def plugin_kubeconfig_in(self, namespace: str) -> Path:
        """The plugin's kubeconfig with its IPPools in `namespace` (applied here, with the
        plugin's Role and RoleBinding of deploy/plugin-rbac.yaml there too, as the README asks
        of IPPools in another namespace). Each contender gets one of its own, so a contender's
        agents watch only its writes, as on a cluster that runs one of them, and not the other
        contenders' that share this server."""
        manifests = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}]
        for kind in ("role", "rolebinding"):
            found = self.control_plane.kubectl(
                "get", kind, PLUGIN_ROLE, "-n", PLUGIN_NAMESPACE, "-o", "json"
            )
            item = json.loads(found)
            item["metadata"] = {"name": PLUGIN_ROLE, "namespace": namespace}
            manifests.append(item)
        listed = {"apiVersion": "v1", "kind": "List", "items": manifests}
        self.control_plane.kubectl("apply", "-f", "-", input=json.dumps(listed))
        return self.control_plane.service_account_kubeconfig(
            PLUGIN_NAMESPACE,
            PLUGIN_SERVICE_ACCOUNT,
            self.plugin_kubeconfig.with_name(f"kubeconfig-pyabouts-in-{namespace}"),
            context_namespace=namespace,
        )

    def apiserver_cpu_seconds(self) -> float:
        """kube-apiserver's CPU time so far (not its etcd's)."""
        return self.control_plane.processes()["kube-apiserver"].cpu_seconds()

    def whereabouts_requests(self) -> Counter[str]:
        """whereabouts' requests: its IPPools and reservations, and the Lease it takes."""
        return self.group_requests(WHEREABOUTS_GROUP, LEASE_GROUP)


def install_whereabouts(cluster: KubeCluster, binary: Path) -> Path:
    """whereabouts' CRDs and RBAC (deploy.local.whereabouts_install); its node kubeconfig."""
    return whereabouts_install.install_whereabouts(cluster.control_plane, binary)


@contextlib.contextmanager
def running_cluster(state_dir: Path) -> Iterator[KubeCluster]:
    """Start the control plane, install pyabouts' CRDs and RBAC; stop it on the way out."""
    control_plane = start_control_plane(state_dir)
    try:
        install_pyabouts(control_plane)
        kubeconfig = control_plane.service_account_kubeconfig(
            PLUGIN_NAMESPACE, PLUGIN_SERVICE_ACCOUNT
        )
        yield KubeCluster(control_plane, kubeconfig)
    finally:
        control_plane.stop()


def requests_by_verb_and_code(metrics: str, group: str) -> Counter[str]:
    """Sum `apiserver_request_total` samples of `group` in Prometheus text, by verb and code."""
    counts: Counter[str] = Counter()
    for line in metrics.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match["name"] != REQUEST_METRIC:
            continue
        labels = dict(_LABEL.findall(match["labels"]))
        if labels.get("group") == group:
            counts[f"{labels.get('verb', '?')} {labels.get('code', '?')}"] += int(
                float(match["value"])
            )
    return counts


def conflicting_writes(requests: Counter[str]) -> int:
    """Of requests counted by "<VERB> <code>", the writes the apiserver refused as conflicting
    (409: a create of an object that exists, a replace on a resourceVersion that is gone)."""
    return sum(n for request, n in requests.items() if request.endswith(" 409"))
