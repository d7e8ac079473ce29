"""pyabouts installed into the real local cluster the way users install it: `kubectl apply -k` of
deploy/ (with the image built here), nothing done by hand on the node.

The agent DaemonSet's pod runs in the host's network with its own ServiceAccount; its sidecar
installs the node plugin and writes the node's flat file and kubeconfig; the CNI calls below are
made on the host with the installed plugin, as kubelet's runtime makes them. The reconciler runs
as the Deployment (holding its Lease) and as the CronJob's Job. The cluster is the whole host's
(kubelet's places are fixed), so the module runs in the "processes" group.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.local.controlplane import ControlPlane
from deploy.local.install import (
    NAMESPACE,
    NODE_CONFIG,
    PLUGIN,
    cluster_with_pyabouts,
    install_on_cluster,
    install_overlay,
)
from deploy.local.netns import CniCall, run_cni
from deploy.local.node_network import CNI_BIN_DIR
from pyabouts.ipam.pool import PoolId
from pyabouts.ipam.ranges import build_range
from pyabouts.ipam.slices import SlicedRange, preferred_slice
from pyabouts.plugin.install import SHIM_SLOT_MARKER
from tests.e2e.local_cluster import CLUSTER_MODULE_MARKS, kube_json
from tests.integration.stored_state import stored, table_entries

pytestmark = CLUSTER_MODULE_MARKS

AGENT_SA = "system:serviceaccount:kube-system:pyabouts"
RECONCILER_SA = "system:serviceaccount:kube-system:pyabouts-reconciler"
RECLAIM_TIMEOUT_S = 40.0  # the controller frees within seconds of its graces (13 s here)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def overlay(state_dir: Path) -> Path:
    return install_overlay(state_dir)


@pytest.fixture(scope="module")
def cluster(state_dir: Path) -> Iterator[ControlPlane]:
    with cluster_with_pyabouts(state_dir) as control_plane:
        yield control_plane


def pods_of(cluster: ControlPlane, app: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/name={app}"
    return list(kube_json(cluster, "get", "pods", "-n", NAMESPACE, "-l", selector)["items"])


def network_conf(network: str, **ipam: Any) -> dict[str, Any]:
    """A NAD's config as Multus hands it to the plugin; it names a kubeconfig nobody wrote,
    which the agent never follows (it uses its own ServiceAccount)."""
    return {
        "cniVersion": "1.0.0",
        "name": network,
        "type": "macvlan",
        "ipam": {
            "type": "pyabouts",
            "range": "10.77.0.0/28",
            "network_name": network,
            "kubernetes": {"kubeconfig": "/etc/cni/net.d/whereabouts.d/not-there.kubeconfig"},
        }
        | ipam,
    }


def plugin_call(
    command: str, network: str, container: str, pod: str, uid: str = "", **ipam: Any
) -> CniCall:
    """The installed plugin, run on the host as the runtime runs it for `pod` ("ns/name"), with
    `ipam` over network_conf's."""
    namespace, name = pod.split("/")
    cni_args = f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"
    return run_cni(
        str(PLUGIN),
        command,
        network_conf(network, **ipam),
        container_id=container,
        netns=f"/var/run/netns/{container}",
        ifname="net1",
        cni_path=str(CNI_BIN_DIR),
        cni_args=cni_args + (f";K8S_POD_UID={uid}" if uid else ""),
    )


def add(network: str, container: str, pod: str, uid: str = "") -> str:
    result = plugin_call("ADD", network, container, pod, uid).expect_success()
    return str(result["ips"][0]["address"].split("/")[0])


def lease_holder(cluster: ControlPlane) -> str | None:
    found = cluster.kubectl_run(
        "get",
        "lease",
        "-n",
        NAMESPACE,
        "pyabouts-reconciler",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    )
    return found.stdout.strip() or None


def wait_until_freed(cluster: ControlPlane, network: str, address: str) -> float:
    """Seconds until the IPPools no longer hold `address`; fails after RECLAIM_TIMEOUT_S."""
    t0 = time.monotonic()
    while address in stored(cluster, network):
        assert time.monotonic() - t0 < RECLAIM_TIMEOUT_S, f"{address} still held"
        time.sleep(0.25)
    return time.monotonic() - t0


def test_the_agent_runs_in_the_hosts_network_as_root_without_capabilities(
    cluster: ControlPlane,
) -> None:
    (pod,) = pods_of(cluster, "pyabouts-agent")
    assert pod["status"]["phase"] == "Running"
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "True"
    assert pod["spec"]["hostNetwork"] is True
    assert pod["status"]["podIP"] == pod["status"]["hostIP"]
    assert pod["spec"]["serviceAccountName"] == "pyabouts"
    for container in [*pod["spec"]["containers"], *pod["spec"]["initContainers"]]:
        context = container["securityContext"]
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
    log = cluster.kubectl("logs", "-n", NAMESPACE, pod["metadata"]["name"], "-c", "agent")
    assert "serving datastore 'kubernetes' (IPPools in namespace kube-system" in log


def test_the_installer_wrote_the_plugin_and_a_private_kubeconfig_of_the_agents_account(
    cluster: ControlPlane,
) -> None:
    assert PLUGIN.stat().st_mode & 0o777 == 0o755
    # The image's static shim, with the agent's socket written into its slot: no Python needed.
    plugin = PLUGIN.read_bytes()
    assert plugin.startswith(b"\x7fELF")
    assert SHIM_SLOT_MARKER + b"/run/pyabouts/agent.sock\0" in plugin
    kubeconfig = NODE_CONFIG / "pyabouts.kubeconfig"
    assert kubeconfig.stat().st_mode & 0o777 == 0o600
    flat = json.loads((NODE_CONFIG / "pyabouts.conf").read_text())
    assert flat == {"datastore": "kubernetes", "kubernetes": {"kubeconfig": str(kubeconfig)}}
    # The node reaches the API with it through the `kubernetes` Service, as the agent.
    who = cluster.kubectl(
        "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}", kubeconfig=kubeconfig
    )
    assert who == AGENT_SA
    # The sidecar keeps it there: removed, it is back within the sidecar's interval.
    kubeconfig.unlink()
    deadline = time.monotonic() + 30
    while not kubeconfig.exists():
        assert time.monotonic() < deadline, "the kubeconfig was not written again"
        time.sleep(0.5)
    assert kubeconfig.stat().st_mode & 0o777 == 0o600


# An operator's kubeconfig, as --kubeconfig takes it: the pod's own credentials, with the CA
# inline (certificate-authority-data), which the Kubernetes client writes to a temporary file.
INLINE_KUBECONFIG = """
import base64, json, os, pathlib, subprocess, sys, tempfile
account = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")
server = f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
ca = base64.b64encode((account / "ca.crt").read_bytes()).decode()
token = (account / "token").read_text()
config = {
    "apiVersion": "v1", "kind": "Config", "current-context": "c",
    "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority-data": ca}}],
    "users": [{"name": "u", "user": {"token": token}}],
    "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
}
with tempfile.NamedTemporaryFile("w", suffix=".kubeconfig", delete=False) as out:
    json.dump(config, out)
sys.exit(subprocess.run(["pyabouts-reconciler", "--dry-run", "--kubeconfig", out.name]).returncode)
"""


def test_the_reconciler_reads_a_kubeconfig_with_inline_certificates_on_its_read_only_root(
    cluster: ControlPlane,
) -> None:
    """Its root filesystem is read-only; the Kubernetes client needs a writable /tmp for a
    kubeconfig's inline certificates (README: --kubeconfig, and --config for etcd)."""
    deployment = "deploy/pyabouts-reconciler"
    summary = cluster.kubectl(
        "exec", "-n", NAMESPACE, deployment, "--", "python3", "-c", INLINE_KUBECONFIG
    )
    assert json.loads(summary)["dryRun"] is True


def test_the_installed_plugin_is_served_by_the_agent_with_its_own_identity(
    cluster: ControlPlane,
) -> None:
    (agent,) = pods_of(cluster, "pyabouts-agent")
    pod = f"{NAMESPACE}/{agent['metadata']['name']}"  # one that exists: nothing reclaims it
    network = f"install-{uuid.uuid4().hex[:6]}"
    address = add(network, "c-served", pod)
    assert stored(cluster, network) == {address: "c-served"}
    plugin_call("DEL", network, "c-served", pod).expect_success()
    assert stored(cluster, network) == {}


def test_a_node_slice_is_taken_in_the_name_the_daemonset_gives_the_agent(
    cluster: ControlPlane,
) -> None:
    (agent,) = pods_of(cluster, "pyabouts-agent")
    node = agent["spec"]["nodeName"]  # NODE_NAME, from the downward API: never /etc/hostname
    pod = f"{NAMESPACE}/{agent['metadata']['name']}"
    network = f"sliced-{uuid.uuid4().hex[:6]}"
    sliced = {"range": "10.77.1.0/24", "node_slice_size": "/27"}
    result = plugin_call("ADD", network, "c-sliced", pod, **sliced).expect_success()
    # The slice the node's name picks (the local cluster's node picks the fifth of the eight),
    # and its first address (.1 in the range's first slice).
    rng = build_range(
        "10.77.1.0/24", range_start=None, range_end=None, exclude=[], pool=PoolId(network, 4)
    )
    cut = SlicedRange(rng, 27)
    index = preferred_slice(cut.registry_range(), node)
    mine = cut.within(index)
    assert result["ips"][0]["address"] == mine.format(mine.first)
    pools = kube_json(cluster, "get", "ippools", "-n", NAMESPACE)["items"]
    (registry,) = [p for p in pools if p["spec"]["network"].startswith(f"{network}#node-slices")]
    assert registry["spec"]["range"] == "10.77.1.0/24 in /27 slices"
    assert table_entries(registry["spec"]["allocations"]) == {
        str(index): {"containerID": str(cut.slice_network(index)), "ifname": "slice", "node": node}
    }
    plugin_call("DEL", network, "c-sliced", pod, **sliced).expect_success()
    assert stored(cluster, network) == {}


def test_the_controller_holds_its_lease_and_frees_a_force_deleted_pods_address(
    cluster: ControlPlane,
) -> None:
    replicas = {p["metadata"]["name"] for p in pods_of(cluster, "pyabouts-reconciler")}
    assert len(replicas) == 2
    deadline = time.monotonic() + 30
    while (holder := lease_holder(cluster)) not in replicas:
        assert time.monotonic() < deadline, f"Lease held by {holder!r}, not by {replicas}"
        time.sleep(0.5)

    network = f"reclaim-{uuid.uuid4().hex[:6]}"
    victim = ("pod/victim", "-n", "default")
    grace = json.dumps({"apiVersion": "v1", "spec": {"terminationGracePeriodSeconds": 3}})
    cluster.kubectl(
        "run", "victim", "-n", "default", "--image=localhost/pause:3.10", f"--overrides={grace}"
    )
    cluster.kubectl("wait", "--for=condition=Ready", *victim, "--timeout=60s")
    uid = kube_json(cluster, "get", *victim)["metadata"]["uid"]
    address = add(network, "c-victim", "default/victim", uid)
    cluster.kubectl("delete", *victim, "--force", "--grace-period=0")
    seconds = wait_until_freed(cluster, network, address)
    # Its kubelet stops a force-deleted pod with the pod's own grace (3 s), then tears the
    # sandbox down: the address waits that and --gone-grace (10 s) from the deletion.
    assert seconds >= 12.0, seconds
    print(f"force-deleted pod's address freed by the controller in {seconds:.1f} s")


def test_the_cronjobs_job_runs_to_completion_and_frees_a_leak(cluster: ControlPlane) -> None:
    deployment = "deployment/pyabouts-reconciler"
    cluster.kubectl("scale", deployment, "-n", NAMESPACE, "--replicas=0")  # only the Job acts
    # Nor the CronJob's own runs, every 5 minutes: one freed the leak first in a CI run.
    suspend(cluster, suspended=True)
    cluster.kubectl(
        "wait",
        "--for=delete",
        "pod",
        "-n",
        NAMESPACE,
        "-l",
        "app.kubernetes.io/name=pyabouts-reconciler",
        "--timeout=90s",
    )
    try:
        network = f"leak-{uuid.uuid4().hex[:6]}"
        address = add(network, "c-leaked", "default/never-existed")
        job = f"pass-{uuid.uuid4().hex[:6]}"
        cluster.kubectl("create", "job", job, "-n", NAMESPACE, "--from=cronjob/pyabouts-reconciler")
        cluster.kubectl(
            "wait", "--for=condition=Complete", f"job/{job}", "-n", NAMESPACE, "--timeout=120s"
        )
        assert stored(cluster, network) == {}, address
        log = cluster.kubectl("logs", "-n", NAMESPACE, f"job/{job}")
        assert address in log
        # The pod gone, with a grace a pass cannot know: freed once 30 s (Kubernetes' default
        # terminationGracePeriodSeconds) and its --gone-grace (10 s) had passed.
        assert "judged again in 40 s" in log
    finally:
        suspend(cluster, suspended=False)
        cluster.kubectl("scale", deployment, "-n", NAMESPACE, "--replicas=2")
        cluster.kubectl("rollout", "status", deployment, "-n", NAMESPACE, "--timeout=120s")


def suspend(cluster: ControlPlane, *, suspended: bool) -> None:
    patch = json.dumps({"spec": {"suspend": suspended}})
    cluster.kubectl("patch", "cronjob/pyabouts-reconciler", "-n", NAMESPACE, "-p", patch)


def permissions(cluster: ControlPlane, user: str, namespace: str) -> set[tuple[str, str]]:
    """(resource, verb) pairs `user` may use in `namespace`, from `kubectl auth can-i --list`
    by impersonation; the resource names a rule is limited to are kept with the resource."""
    table = cluster.kubectl("auth", "can-i", "--list", "-n", namespace, f"--as={user}")
    found = set()
    for line in table.splitlines()[1:]:  # Resources, Non-Resource URLs, Resource Names, Verbs
        resource = line.split("[", 1)[0].strip()
        urls, names, verbs = re.findall(r"\[[^\]]*\]", line)
        subject = resource or urls
        if names != "[]":
            subject = f"{subject}{names}"
        for verb in verbs.strip("[]").split():
            found.add((subject, verb))
    return found


@pytest.mark.parametrize(
    ("user", "needed"),
    [
        (
            AGENT_SA,
            {("ippools.pyabouts.io", v) for v in ("get", "list", "watch", "create", "update")}
            | {("daemonsets.apps[pyabouts-agent]", "get")},  # does the uninstall apply?
        ),
        (
            RECONCILER_SA,
            {("pods", v) for v in ("get", "list", "watch")}
            | {("nodes", "list")}  # node slices of gone nodes
            | {("statefulsets.apps", "list")}  # sticky_statefulsets
            | {("ippools.pyabouts.io", v) for v in ("get", "list", "update")}
            | {("ippools.pyabouts.io", "delete")}  # blocks that hold nothing
            | {("leases.coordination.k8s.io", "create")}  # create knows no name yet
            | {("leases.coordination.k8s.io[pyabouts-reconciler]", v) for v in ("get", "update")},
        ),
    ],
    ids=["agent", "reconciler"],
)
def test_each_service_account_may_do_exactly_what_its_component_needs(
    cluster: ControlPlane, user: str, needed: set[tuple[str, str]]
) -> None:
    """Beyond what every authenticated user may (an account of no role is the baseline). In
    another namespace only what is read cluster-wide: IPPools, Leases and the DaemonSet are
    the component's own namespace's."""
    nobody = f"system:serviceaccount:kube-system:nobody-{uuid.uuid4().hex[:6]}"
    own_namespace_only = ("ippools", "leases", "daemonsets")
    for namespace in (NAMESPACE, "default"):
        baseline = permissions(cluster, nobody, namespace)
        extra = permissions(cluster, user, namespace) - baseline
        expected = {
            (resource, verb)
            for resource, verb in needed
            if namespace == NAMESPACE or not resource.startswith(own_namespace_only)
        }
        assert extra == expected, namespace


def test_kubectl_delete_removes_the_plugin_and_the_nodes_files(
    cluster: ControlPlane, overlay: Path
) -> None:
    """The uninstall users run; then installed again, as the other tests found it."""
    assert PLUGIN.exists() and NODE_CONFIG.exists()
    t0 = time.monotonic()
    cluster.kubectl("delete", "-k", str(overlay), "--wait=true", "--timeout=120s")
    while pods_of(cluster, "pyabouts-reconciler"):
        # Stopped by SIGTERM as their container's PID 1, not killed after their 30 s grace.
        assert time.monotonic() - t0 < 25, "the reconciler's pods outlived SIGTERM"
        time.sleep(0.5)
    while pods_of(cluster, "pyabouts-agent") or PLUGIN.exists() or NODE_CONFIG.exists():
        assert time.monotonic() - t0 < 120, "still installed on the node"
        time.sleep(0.5)
    install_on_cluster(cluster, overlay)
    assert PLUGIN.exists() and (NODE_CONFIG / "pyabouts.kubeconfig").exists()
