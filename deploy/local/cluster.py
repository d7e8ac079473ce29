"""A real single-node Kubernetes cluster on this host: ``bash deploy/local/cluster.sh up``.

etcd and kube-apiserver (the control plane of ``controlplane.py``, listening on the pod
bridge's address), kube-controller-manager, kube-scheduler, containerd, kubelet and kube-proxy
(``node_components.py``), each a :class:`~deploy.local.supervision.SupervisedProcess` that
outlives the command; pods on the bridge ``cni0`` (``node_network.py``). The recipe, with its
traps, is shared/notes/environment.md ("A real single-node Kubernetes cluster").

Its state directory (``$PYABOUTS_CLUSTER_DIR``, default ``/var/lib/pyabouts-cluster``) holds
its certificates, kubeconfigs, configuration, logs, containerd's root (emptied by ``down``)
and the state file ``cluster.json`` (pids, and what was changed on the host). Outside it, only
what Kubernetes puts in its fixed places: ``/etc/cni/net.d``, ``/opt/cni/bin``,
``/var/lib/kubelet``, ``/run/containerd``, ``/var/log/pods``, pod network namespaces,
``KUBE-*`` iptables chains and the bridge; :func:`down` removes all of them (and etcd's data,
in /dev/shm), keeping the state directory's logs and certificates for the next ``up``. Both
``up`` and ``down`` remove what Multus' DaemonSets leave on the node
(``multus_install.remove_multus_leftovers``), which a run killed before it uninstalled Multus
leaves behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.local import node_components as node
from deploy.local import node_leftovers as leftovers
from deploy.local.commands import LocalToolError, run_command
from deploy.local.container_images import busybox_archive, import_image, pause_archive
from deploy.local.controlplane import (
    STATE_FILE,
    ControlPlane,
    start_control_plane,
)
from deploy.local.multus_install import multus_archive, remove_multus_leftovers
from deploy.local.node_network import (
    BRIDGE,
    BRIDGE_ADDRESS,
    HostChanges,
    set_up_pod_network,
    undo_pod_network,
)
from deploy.local.project_image import project_image, saved_archive
from deploy.local.supervision import SupervisedProcess

DEFAULT_STATE_DIR = Path("/var/lib/pyabouts-cluster")
CLUSTER_STATE_FILE = "cluster.json"
#: In starting order; stopped in reverse, with the pods deleted before the kubelet stops.
NODE_COMPONENTS = (
    "containerd",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
)
NODE_READY_TIMEOUT_S = 120.0
PODS_GONE_TIMEOUT_S = 120.0


class ClusterError(LocalToolError):
    """The cluster could not be started or stopped."""


def default_state_dir() -> Path:
    env = os.environ.get("PYABOUTS_CLUSTER_DIR")
    return Path(env) if env else DEFAULT_STATE_DIR


def _say(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


@dataclass
class Cluster:
    """The cluster recorded in ``state_dir`` (or being started there)."""

    state_dir: Path
    host_changes: HostChanges = field(default_factory=HostChanges)
    control_plane: ControlPlane | None = None
    processes: dict[str, SupervisedProcess] = field(default_factory=dict)

    @property
    def control_plane_dir(self) -> Path:
        return self.state_dir / "controlplane"

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane_dir / "kubeconfig"

    def layout(self) -> node.NodeLayout:
        server = "" if self.control_plane is None else self.control_plane.server
        return node.NodeLayout(self.state_dir, self.control_plane_dir / "pki", server)

    # ---- the state file

    def save(self) -> None:
        state = {
            "host_changes": self.host_changes.to_json(),
            "processes": {
                name: {"pid": p.pid, "argv": p.argv, "log": str(p.log)}
                for name, p in self.processes.items()
            },
        }
        tmp = self.state_dir / (CLUSTER_STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_dir / CLUSTER_STATE_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> Cluster | None:
        """The cluster ``up`` recorded, its processes adopted by pid; None if there is none."""
        try:
            state: dict[str, Any] = json.loads((state_dir / CLUSTER_STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        cluster = cls(state_dir, HostChanges.from_json(state.get("host_changes", {})))
        if (cluster.control_plane_dir / STATE_FILE).is_file():
            cluster.control_plane = ControlPlane.load(cluster.control_plane_dir)
        for name, record in state.get("processes", {}).items():
            cluster.processes[name] = SupervisedProcess(
                name=name,
                argv=[str(a) for a in record["argv"]],
                log=Path(record["log"]),
                die_with_parent=False,
                stop_timeout=node.STOP_TIMEOUT_S,
                pid=None if record["pid"] is None else int(record["pid"]),
            )
        return cluster

    # ---- what runs

    def all_processes(self) -> dict[str, SupervisedProcess]:
        found = {} if self.control_plane is None else dict(self.control_plane.processes())
        found.update(self.processes)
        return found

    def running(self) -> bool:
        names = {"etcd", "kube-apiserver", *NODE_COMPONENTS}
        processes = self.all_processes()
        return set(processes) == names and all(p.alive() for p in processes.values())

    def kubectl(self, *args: str) -> str:
        if self.control_plane is None:
            raise ClusterError("the control plane was never started")
        return self.control_plane.kubectl(*args)

    def node_ready(self) -> str:
        """The node's Ready condition ("True", "False", "Unknown"), or why it cannot be read."""
        try:
            return self.kubectl(
                "get",
                "node",
                node.NODE_NAME,
                "-o",
                'jsonpath={.status.conditions[?(@.type=="Ready")].status}',
            ).strip()
        except (LocalToolError, OSError) as exc:
            return f"unknown ({str(exc).strip()[:200]})"


# ---- up


def _start(cluster: Cluster, process: SupervisedProcess) -> None:
    """Start one component and record it at once, so that ``down`` finds it if a later one
    fails."""
    t0 = time.monotonic()
    process.spawn()
    cluster.processes[process.name] = process
    cluster.save()
    process.wait_ready()
    _say(f"{process.name} ready in {time.monotonic() - t0:.1f} s (pid {process.pid})")


def _default_service_account(cluster: Cluster) -> str:
    try:
        return cluster.kubectl("get", "serviceaccount", "default", "-n", "default", "-o", "name")
    except LocalToolError as exc:
        return str(exc)


def _wait_usable(cluster: Cluster) -> None:
    """The node Ready, and the ``default`` ServiceAccount made (pods are refused without it)."""
    deadline = time.monotonic() + NODE_READY_TIMEOUT_S
    while (ready := cluster.node_ready()) != "True":
        if time.monotonic() > deadline:
            raise ClusterError(f"node {node.NODE_NAME} not Ready after 120 s: {ready}")
        time.sleep(0.5)
    while not (answer := _default_service_account(cluster)).startswith("serviceaccount/"):
        if time.monotonic() > deadline:
            raise ClusterError(f"no default ServiceAccount after 120 s: {answer}")
        time.sleep(0.5)


def _missing_binaries() -> list[str]:
    wanted = [node.kube_binary(n) for n in ("kube-apiserver", *NODE_COMPONENTS[1:])]
    missing = [str(p) for p in wanted if not p.is_file()]
    missing += [b for b in ("containerd", "ctr", "runc", "gcc") if shutil.which(b) is None]
    return missing


def up(state_dir: Path) -> Cluster:
    """Start the cluster (a no-op when it runs); return it once its node is Ready.

    What a half-started or killed earlier run left is taken down first. On failure everything
    is taken down again (the logs stay) and ClusterError says why.
    """
    old = Cluster.load(state_dir)
    if old is not None and old.running() and old.node_ready() == "True":
        _say(f"already running (state: {state_dir})")
        return old
    if old is not None:
        _say("taking down what an earlier run left")
        down(state_dir)
    missing = _missing_binaries()
    if missing:
        raise ClusterError(
            f"missing: {', '.join(missing)}; run `bash deploy/local/setup.sh` (first time: "
            "the Kubernetes binaries build in about 10 minutes)"
        )
    t0 = time.monotonic()
    # Built (or found cached) before anything starts: the first build takes minutes.
    images = [pause_archive(), busybox_archive(), multus_archive(), saved_archive(project_image())]
    _say(f"images ready in {time.monotonic() - t0:.1f} s")
    state_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(state_dir)
    cluster.save()
    try:
        # What a run killed before it uninstalled Multus left (its own state directory is not
        # this one, so no down swept it): containerd would take Multus' config for the pods'.
        remove_multus_leftovers()
        cluster.host_changes = set_up_pod_network(cluster.layout().host_local_dir)
        cluster.save()
        cluster.control_plane = start_control_plane(
            cluster.control_plane_dir,
            die_with_parent=False,
            address=BRIDGE_ADDRESS,
            serves_nodes=True,
        )
        _say(f"kube-apiserver ready at {cluster.control_plane.server}")
        layout = cluster.layout()
        node.write_component_kubeconfigs(layout)
        _start(cluster, node.containerd(layout))
        t_import = time.monotonic()
        for archive in images:
            import_image(archive, node.CONTAINERD_SOCKET)
        _say(f"images in containerd in {time.monotonic() - t_import:.1f} s")
        for make in (node.kube_controller_manager, node.kube_scheduler, node.kubelet):
            _start(cluster, make(layout))
        _start(cluster, node.kube_proxy(layout))
        _wait_usable(cluster)
    except (LocalToolError, OSError) as exc:
        _say(f"up failed, taking down what started: {exc}")
        down(state_dir)
        raise ClusterError(f"up failed (logs in {state_dir}): {exc}") from exc
    _say(f"node {node.NODE_NAME} Ready; cluster up in {time.monotonic() - t0:.1f} s")
    return cluster


# ---- down


def _delete_pods(cluster: Cluster) -> None:
    """Delete every pod and wait until the kubelet has run their CNI DELs and let them go;
    force whatever it cannot finish (no kubelet)."""
    kubelet = cluster.processes.get("kubelet")
    if kubelet is None or not kubelet.alive() or cluster.control_plane is None:
        return
    if not cluster.control_plane.running():
        return
    cluster.kubectl("delete", "pods", "--all", "--all-namespaces", "--wait=false")
    deadline = time.monotonic() + PODS_GONE_TIMEOUT_S
    while cluster.kubectl("get", "pods", "--all-namespaces", "-o", "name").strip():
        if time.monotonic() > deadline:
            _say("pods still there after 120 s: deleting them by force")
            cluster.kubectl(
                "delete", "pods", "--all", "--all-namespaces", "--force", "--grace-period=0"
            )
            break
        time.sleep(0.5)


def _remove_containers() -> None:
    """Whatever containerd still runs for the kubelet (sandboxes not yet collected)."""
    ctr = ["ctr", "--address", str(node.CONTAINERD_SOCKET), "-n", "k8s.io"]
    for task in run_command([*ctr, "tasks", "ls", "-q"]).split():
        run_command([*ctr, "tasks", "kill", "-s", "SIGKILL", task])
    for kind in ("tasks", "containers"):
        ids = run_command([*ctr, kind, "ls", "-q"]).split()
        if ids:
            run_command([*ctr, kind, "rm", *(["-f"] if kind == "tasks" else []), *ids])


def _stop(cluster: Cluster, name: str) -> None:
    process = cluster.processes.get(name)
    if process is not None:
        process.stop()


def down(state_dir: Path) -> None:
    """Delete the pods, stop everything, remove what the cluster left outside ``state_dir``.

    Safe to run again, and after a killed ``up``: every sweep looks for the cluster's own
    leftovers, recorded or not.
    """
    cluster = Cluster.load(state_dir) or Cluster(state_dir)
    errors: list[str] = []

    def attempt(what: str, step: Any, *args: Any) -> None:
        t0 = time.monotonic()
        try:
            step(*args)
        except (LocalToolError, OSError) as exc:
            errors.append(f"{what}: {exc}")
        if time.monotonic() - t0 > 1:
            _say(f"{what}: {time.monotonic() - t0:.1f} s")

    # No controller may replace the pods deleted next, nor the scheduler place them.
    attempt("stop kube-controller-manager", _stop, cluster, "kube-controller-manager")
    attempt("stop kube-scheduler", _stop, cluster, "kube-scheduler")
    attempt("delete pods", _delete_pods, cluster)
    attempt("stop kube-proxy", _stop, cluster, "kube-proxy")
    attempt("kube-proxy --cleanup", node.kube_proxy_cleanup)
    attempt("stop kubelet", _stop, cluster, "kubelet")
    containerd = cluster.processes.get("containerd")
    if containerd is not None and containerd.alive():
        attempt("remove containers", _remove_containers)
    attempt("stop containerd", _stop, cluster, "containerd")
    # A killed containerd leaves its shims and their containers running.
    shims = leftovers.processes_matching(
        ["containerd-shim-runc-v2", "containerd-shim"], [str(node.CONTAINERD_SOCKET)]
    )
    leftovers.kill_processes(shims + leftovers.processes_matching(["pause"]))
    layout = cluster.layout()
    attempt("remove pod network namespaces", leftovers.remove_pod_netns)
    attempt(
        "unmount",
        leftovers.unmount,
        leftovers.mounts_under([*node.NODE_DIRS, layout.containerd_root]),
    )
    attempt("remove KUBE-* chains", leftovers.remove_kube_chains)
    # A run killed before it uninstalled Multus: the next cluster's pods would go through it.
    # Before undo_pod_network, which removes the directories it made only when they are empty.
    attempt("remove Multus' files", remove_multus_leftovers)
    attempt("undo the pod network", undo_pod_network, cluster.host_changes)
    for directory in (*node.NODE_DIRS, layout.containerd_root, layout.host_local_dir):
        attempt(f"remove {directory}", shutil.rmtree, directory, True)
    if cluster.control_plane is not None:
        # SIGKILL: kube-apiserver's graceful shutdown takes more than 15 s here, for data
        # that goes with etcd's a moment later anyway.
        if "kube-apiserver" in cluster.control_plane.processes():
            attempt("kill kube-apiserver", cluster.control_plane.kill, "kube-apiserver")
        attempt("stop the control plane", cluster.control_plane.stop)
        (cluster.control_plane_dir / STATE_FILE).unlink(missing_ok=True)
    (state_dir / CLUSTER_STATE_FILE).unlink(missing_ok=True)
    if errors:
        raise ClusterError("down left errors: " + "; ".join(errors))


# ---- status


def status_lines(cluster: Cluster | None) -> list[str]:
    """One line per component (running or not, its pid), then the node and the kubeconfig."""
    if cluster is None:
        return ["not running (no cluster state)"]
    processes = cluster.all_processes()
    lines = [
        f"{name}: {processes[name].status() if name in processes else 'not running'}"
        for name in ("etcd", "kube-apiserver", *NODE_COMPONENTS)
    ]
    lines.append(f"node {node.NODE_NAME}: Ready={cluster.node_ready()}")
    lines.append(f"bridge {BRIDGE}: {BRIDGE_ADDRESS}/24")
    lines.append(f"kubeconfig: {cluster.kubeconfig}")
    return lines
