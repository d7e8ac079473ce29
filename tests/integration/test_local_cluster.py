"""``deploy/local/cluster.sh``: a real cluster comes up, runs a pod, and goes without a trace.

In order: ``up`` (every component running, the node Ready, a stale Multus config that a
killed run left removed first), a pod of the pause image Running on the bridge, ``up`` again
changing nothing, ``down``, then every kind of leftover checked: processes, mounts, network
namespaces, links, iptables rules and chains, files. Then the same checks after a ``down`` that
follows a node killed under a running pod, with the files a run killed before it uninstalled
Multus leaves.
It is the whole cluster of this host (kubelet's and containerd's places are fixed), so it runs
in the "processes" group, never beside the heavy bursts; a component that fails to start fails
it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local import node_leftovers as leftovers
from deploy.local.cluster import NODE_COMPONENTS, Cluster
from deploy.local.controlplane import ControlPlane
from deploy.local.multus_install import THIN, multus_leftovers
from deploy.local.node_components import NODE_DIRS, kube_binary
from deploy.local.node_network import (
    BRIDGE,
    CNI_BIN_DIR,
    CNI_CONF_DIR,
    POD_CIDR,
    cached_results,
    link_exists,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.xdist_group("processes"),
    pytest.mark.timeout(900),
]

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "deploy" / "local" / "cluster.sh"
POD = """
apiVersion: v1
kind: Pod
metadata: {name: sandbox-only, namespace: default}
spec:
  containers:
  - {name: pause, image: localhost/pause:3.10, imagePullPolicy: Never}
"""
#: Where a cluster could leave files (two levels deep is where a stray one shows). Podman's
#: runtime places and /var/lib/cni change while other tests run beside this one: /run/netns
#: and the cluster's CNI results are checked by name below. /dev/shm is not listed (other
#: tests' etcds keep their data there): the cluster's own etcd data directory is checked.
WATCHED_DIRS = (Path("/etc"), Path("/opt"), Path("/var/lib"), Path("/var/log"), Path("/run"))
NOISY_DIRS = (
    *("/run/netns", "/run/containers", "/run/libpod", "/run/podman", "/run/user"),
    "/var/lib/cni",  # other tests' host-local and cached results; this cluster's are checked
)


def cluster_sh(state_dir: Path, command: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYABOUTS_CLUSTER_DIR=str(state_dir))
    return subprocess.run(
        ["bash", str(CLUSTER_SH), command],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


def files_two_deep() -> set[str]:
    found: set[str] = set()
    for top in WATCHED_DIRS:
        for entry in top.iterdir():
            found.add(str(entry))
            if entry.is_dir() and not entry.is_symlink() and str(entry) not in NOISY_DIRS:
                found.update(str(p) for p in entry.iterdir())
    return found


def veths_into_unnamed_namespaces() -> set[str]:
    """Host-side veths whose peer lives in a network namespace with no name in /run/netns:
    what a pod's link would be if its namespace outlived the runtime's bookkeeping. The pod
    harnesses of tests running beside this one name their namespaces (ptp's veths lead there)
    or keep both ends of a veth on the host (macvlan masters), so theirs never count."""

    def ip_json(*args: str) -> list[dict[str, object]]:
        done = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
        return list(json.loads(done.stdout or "[]"))

    named = {entry.get("nsid") for entry in ip_json("netns", "list-id") if "name" in entry}
    return {
        str(link["ifname"])
        for link in ip_json("-d", "link", "show", "type", "veth")
        if "link_netnsid" in link and link["link_netnsid"] not in named
    }


def run_pod(cp: ControlPlane) -> str:
    """Create the pod (once the controller-manager has made the default ServiceAccount the
    admission wants) and wait until it is Running; its IP."""
    deadline = time.monotonic() + 60
    while (made := cp.kubectl_run("apply", "-f", "-", input=POD)).returncode:
        assert time.monotonic() < deadline, made.stderr
        time.sleep(0.5)
    ready = cp.kubectl_run(
        "wait",
        "-n",
        "default",
        "--for=condition=Ready",
        "pod/sandbox-only",
        "--timeout=50s",
    )
    described = cp.kubectl_run("describe", "-n", "default", "pod/sandbox-only").stdout
    assert ready.returncode == 0, f"{ready.stderr}\n{described}"
    return cp.kubectl("get", "-n", "default", "pod/sandbox-only", "-o", "jsonpath={.status.podIP}")


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    assert not link_exists(BRIDGE), f"{BRIDGE} exists: a cluster already runs on this host"
    state = tmp_path / "cluster"
    yield state
    cluster_sh(state, "down")  # after a failure half-way; a no-op after the test's own


def test_up_pod_idempotent_up_and_down_without_leftovers(state_dir: Path) -> None:
    CNI_CONF_DIR.mkdir(parents=True, exist_ok=True)  # podman's place too: made before counting
    files_before, veths_before = files_two_deep(), veths_into_unnamed_namespaces()
    # The config a run killed before it uninstalled Multus left: containerd would take it for
    # the pods' network, and no pod would start.
    stale = leave_thin_multus_files(plugins=False)
    t0 = time.monotonic()
    up = cluster_sh(state_dir, "up")
    assert up.returncode == 0, up.stderr
    assert [path for path in stale if path.exists()] == []
    kubeconfig = state_dir / "controlplane" / "kubeconfig"
    assert up.stdout == f"export KUBECONFIG={kubeconfig}\n"
    print(f"up in {time.monotonic() - t0:.1f} s")

    status = cluster_sh(state_dir, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("etcd", "kube-apiserver", *NODE_COMPONENTS):
        assert f"{name}: running (pid " in status.stdout, status.stdout
    assert "Ready=True" in status.stdout

    t1 = time.monotonic()
    pod_ip = run_pod(ControlPlane.load(state_dir / "controlplane"))
    assert ipaddress.ip_address(pod_ip) in ipaddress.ip_network(POD_CIDR)
    print(f"pod Running in {time.monotonic() - t1:.1f} s at {pod_ip}")

    again = cluster_sh(state_dir, "up")
    assert again.returncode == 0, again.stderr
    assert again.stdout == up.stdout
    assert "already running" in again.stderr
    assert cluster_sh(state_dir, "status").stdout == status.stdout  # the same pids

    t2 = time.monotonic()
    down = cluster_sh(state_dir, "down")
    assert down.returncode == 0, down.stderr
    print(f"down in {time.monotonic() - t2:.1f} s")

    assert_nothing_left(state_dir, files_before, veths_before)


def test_down_after_the_node_was_killed_leaves_nothing(state_dir: Path) -> None:
    """kubelet and containerd SIGKILLed under a running pod: no pod DEL ever runs, and down
    still finds and removes what the pod held (its namespace, veth, mounts, shim), and what a
    Multus whose uninstall never ran left on the node (every later cluster's pods would go
    through it)."""
    files_before, veths_before = files_two_deep(), veths_into_unnamed_namespaces()
    up = cluster_sh(state_dir, "up")
    assert up.returncode == 0, up.stderr
    run_pod(ControlPlane.load(state_dir / "controlplane"))
    left = leave_thin_multus_files()
    assert set(multus_leftovers()) >= left
    cluster = Cluster.load(state_dir)
    assert cluster is not None
    for name in ("kubelet", "containerd"):
        cluster.processes[name].kill()
    down = cluster_sh(state_dir, "down")
    assert down.returncode == 0, down.stderr
    assert_nothing_left(state_dir, files_before, veths_before)


def leave_thin_multus_files(*, plugins: bool = True) -> set[Path]:
    """Write what thin Multus' installer writes on the node, as a run killed before it
    uninstalled Multus leaves it: its config (which sorts first, so containerd takes it for
    the pods' network), its kubeconfig and, with `plugins`, its plugins. Returns their paths.
    The sweep goes by the paths: the contents are placeholders."""
    THIN.config.write_text('{"cniVersion": "1.0.0", "name": "multus-cni-network"}\n')
    (CNI_CONF_DIR / "multus.d").mkdir(exist_ok=True)
    (CNI_CONF_DIR / "multus.d" / "multus.kubeconfig").write_text("apiVersion: v1\n")
    written = {THIN.config, CNI_CONF_DIR / "multus.d"}
    if plugins:
        for plugin in (CNI_BIN_DIR / "multus", CNI_BIN_DIR / "passthru"):
            plugin.write_bytes(b"#!/bin/sh\nexit 1\n")
            written.add(plugin)
    return written


def assert_nothing_left(state_dir: Path, files_before: set[str], veths_before: set[str]) -> None:
    binaries = [kube_binary(n).name for n in ("kube-apiserver", *NODE_COMPONENTS[1:])]
    etcd_data = ControlPlane(state_dir / "controlplane").etcd_data_dir
    assert leftovers.processes_matching(binaries, [str(state_dir)]) == []
    assert leftovers.processes_matching(["containerd", "containerd-shim-runc-v2", "pause"]) == []
    assert leftovers.processes_matching(["etcd"], [str(etcd_data)]) == []
    assert not etcd_data.exists()
    assert leftovers.mounts_under([*NODE_DIRS, state_dir]) == []
    assert leftovers.pod_netns_mounts() == []
    assert leftovers.pod_netns() == []
    assert not link_exists(BRIDGE)
    assert veths_into_unnamed_namespaces() - veths_before == set()
    assert leftovers.kube_chains() == []
    assert leftovers.rules_mentioning([BRIDGE, POD_CIDR.rsplit(".", 1)[0] + "."]) == []
    assert sorted(files_two_deep() - files_before) == []
    assert cached_results() == []
    assert multus_leftovers() == []
