"""The local cluster's processes besides etcd and kube-apiserver, as supervised processes.

containerd (Debian's) and the Kubernetes binaries that ``build_binaries.sh kubernetes`` caches:
kube-controller-manager, kube-scheduler, kubelet and kube-proxy, each with its configuration
in the state directory, its own client certificate (the identity the default RBAC roles name)
and a readiness probe on its health endpoint. What this host needs of them is in
shared/notes/environment.md ("A real single-node Kubernetes cluster"): cgroup v1 without
systemd, no CAP_SYS_RESOURCE (runc may not lower the pause container's OOM score), no disk
statistics for the eviction manager.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from deploy.local.commands import LocalToolError, run_command
from deploy.local.container_images import PAUSE_IMAGE
from deploy.local.controlplane import KUBE_VERSION, SERVICE_CLUSTER_IP_RANGE, cache_dir
from deploy.local.kubeconfigs import write_kubeconfig
from deploy.local.node_network import BRIDGE_ADDRESS, POD_CIDR
from deploy.local.pki import CLIENT_USAGE, issue_certificate
from deploy.local.supervision import ReadinessProbe, SupervisedProcess

NODE_NAME = "pyabouts-node"
CONTAINERD_SOCKET = Path("/run/containerd/containerd.sock")
#: Directories the kubelet and containerd make outside the state directory; ``down`` removes
#: them (with what they hold) once nothing runs, and the cluster's test checks that it did.
NODE_DIRS = (
    Path("/var/lib/kubelet"),
    Path("/run/containerd"),
    Path("/var/log/pods"),
    Path("/var/log/containers"),
)
CERT_DAYS = 365
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
HEALTH_PORTS = {
    "kube-controller-manager": 10257,
    "kube-scheduler": 10259,
    "kubelet": 10248,
    "kube-proxy": 10256,
}
#: The component's user name and groups, as its client certificate states them.
IDENTITIES = {
    "kube-controller-manager": "/CN=system:kube-controller-manager",
    "kube-scheduler": "/CN=system:kube-scheduler",
    "kubelet": f"/O=system:nodes/CN=system:node:{NODE_NAME}",
    "kube-proxy": "/CN=system:kube-proxy",
}


def kube_binary(name: str) -> Path:
    return cache_dir() / "bin" / f"{name}-{KUBE_VERSION}"


@dataclass(frozen=True)
class NodeLayout:
    """Where the node's components keep their files inside the cluster's state directory."""

    state_dir: Path
    #: The control plane's certificates: its CA signs the components' client certificates.
    pki: Path
    server: str

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def config_dir(self) -> Path:
        return self.state_dir / "config"

    @property
    def containerd_root(self) -> Path:
        return self.state_dir / "containerd"

    @property
    def host_local_dir(self) -> Path:
        return self.state_dir / "host-local"

    def kubeconfig(self, component: str) -> Path:
        return self.config_dir / f"{component}.kubeconfig"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"


def write_component_kubeconfigs(layout: NodeLayout) -> None:
    """A client certificate and a kubeconfig for each component (certificates reused)."""
    for component, subject in IDENTITIES.items():
        if not (layout.pki / f"{component}.crt").is_file():
            usage = "basicConstraints = critical, CA:FALSE\n" + CLIENT_USAGE
            issue_certificate(layout.pki, component, subject, usage, CERT_DAYS)
            (layout.pki / f"{component}.key").chmod(0o600)
        write_kubeconfig(
            layout.kubeconfig(component),
            server=layout.server,
            ca_cert=layout.pki / "ca.crt",
            client_cert=layout.pki / f"{component}.crt",
            client_key=layout.pki / f"{component}.key",
            user=component,
        )


# ---- containerd


def containerd_config(layout: NodeLayout) -> str:
    """``containerd config default`` with its own root, the local pause image, and OOM score
    adjustments restricted (root here lacks CAP_SYS_RESOURCE: runc would fail the sandbox)."""
    text = run_command(["containerd", "config", "default"])
    changes = {
        'root = "/var/lib/containerd"': f'root = "{layout.containerd_root / "root"}"',
        'path = "/opt/containerd"': f'path = "{layout.containerd_root / "opt"}"',
        "restrict_oom_score_adj = false": "restrict_oom_score_adj = true",
        'sandbox_image = "registry.k8s.io/pause:3.6"': f'sandbox_image = "{PAUSE_IMAGE}"',
    }
    for old, new in changes.items():
        if old not in text:
            raise LocalToolError(f"`containerd config default` has no line {old!r} to change")
        text = text.replace(old, new, 1)
    return text


def _containerd_answers() -> str | None:
    try:
        proc = subprocess.run(
            ["ctr", "--address", str(CONTAINERD_SOCKET), "version"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "ctr version timed out"
    return None if proc.returncode == 0 else proc.stderr.strip()[-300:]


def containerd(layout: NodeLayout) -> SupervisedProcess:
    config = layout.config_dir / "containerd.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(containerd_config(layout))
    return SupervisedProcess(
        name="containerd",
        argv=["/usr/bin/containerd", "--config", str(config)],
        log=layout.log("containerd"),
        ready=_containerd_answers,
        ready_timeout=READY_TIMEOUT_S,
        die_with_parent=False,
        stop_timeout=STOP_TIMEOUT_S,
    )


# ---- Kubernetes components


def _health_probe(url: str) -> ReadinessProbe:
    # The components' serving certificates are self-signed: only whether they answer matters.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    def probe() -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as response:
                body = response.read().decode(errors="replace").strip()
        except urllib.error.HTTPError as exc:
            return f"{url}: HTTP {exc.code}"
        return None if body in ("ok", "") or body.startswith("{") else f"{url}: {body[:200]}"

    return probe


def _component(
    layout: NodeLayout, name: str, args: list[str], health_url: str
) -> SupervisedProcess:
    return SupervisedProcess(
        name=name,
        argv=[str(kube_binary(name)), *args],
        log=layout.log(name),
        ready=_health_probe(health_url),
        ready_timeout=READY_TIMEOUT_S,
        die_with_parent=False,
        stop_timeout=STOP_TIMEOUT_S,
    )


def _serving_args(layout: NodeLayout, name: str) -> list[str]:
    kubeconfig = layout.kubeconfig(name)
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={HEALTH_PORTS[name]}",
        "--leader-elect=false",
    ]


def kube_controller_manager(layout: NodeLayout) -> SupervisedProcess:
    name = "kube-controller-manager"
    args = [
        *_serving_args(layout, name),
        f"--service-account-private-key-file={layout.pki / 'sa.key'}",
        f"--root-ca-file={layout.pki / 'ca.crt'}",
        # Each controller as its own ServiceAccount, with the roles made for it.
        "--use-service-account-credentials=true",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        # No cloud, and the pod range is the bridge's, not allocated per node.
        "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route",
    ]
    return _component(layout, name, args, f"https://127.0.0.1:{HEALTH_PORTS[name]}/healthz")


def kube_scheduler(layout: NodeLayout) -> SupervisedProcess:
    name = "kube-scheduler"
    args = _serving_args(layout, name)
    return _component(layout, name, args, f"https://127.0.0.1:{HEALTH_PORTS[name]}/healthz")


def kubelet_config(layout: NodeLayout) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # cgroup v1 and no systemd here.
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "cgroupsPerQOS": False,
        "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
        "address": BRIDGE_ADDRESS,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": HEALTH_PORTS["kubelet"],
        "readOnlyPort": 0,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(layout.pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        # The eviction manager cannot read this disk's statistics: thresholds it never reaches.
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
    }


def kubelet(layout: NodeLayout) -> SupervisedProcess:
    name = "kubelet"
    config = layout.config_dir / "kubelet.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(json.dumps(kubelet_config(layout), indent=2) + "\n")
    args = [
        f"--config={config}",
        f"--kubeconfig={layout.kubeconfig(name)}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={BRIDGE_ADDRESS}",
    ]
    return _component(layout, name, args, f"http://127.0.0.1:{HEALTH_PORTS[name]}/healthz")


def kube_proxy_args(layout: NodeLayout) -> list[str]:
    name = "kube-proxy"
    return [
        f"--kubeconfig={layout.kubeconfig(name)}",
        "--proxy-mode=iptables",
        f"--cluster-cidr={POD_CIDR}",
        f"--hostname-override={NODE_NAME}",
        f"--healthz-bind-address=127.0.0.1:{HEALTH_PORTS[name]}",
        "--metrics-bind-address=127.0.0.1:10249",
        # Leave the host's conntrack table size alone (and this host may not change it).
        "--conntrack-max-per-core=0",
    ]


def kube_proxy(layout: NodeLayout) -> SupervisedProcess:
    name = "kube-proxy"
    health = f"http://127.0.0.1:{HEALTH_PORTS[name]}/healthz"
    return _component(layout, name, kube_proxy_args(layout), health)


def kube_proxy_cleanup() -> None:
    """``kube-proxy --cleanup``: remove the rules it keeps in iptables (and nftables)."""
    subprocess.run(
        [str(kube_binary("kube-proxy")), "--cleanup"], capture_output=True, timeout=60, check=False
    )
