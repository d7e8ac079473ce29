"""The pyabouts demo: the Multus quickstart on a real single-node cluster, with pyabouts as IPAM.

Run it through ``bash deploy/local/demo.sh`` (which prepares the machine first), or as
``.venv/bin/python -m deploy.local.demo [run|down]`` from the repository root, as root.

The story, each step as a user types it, with what they would check: the local cluster
(deploy/local/cluster.py: etcd, kube-apiserver, controller-manager, scheduler, containerd,
kubelet, kube-proxy); pyabouts installed with ``kubectl apply -k`` (deploy/, the image built
here); Multus from its own thin DaemonSet manifest; a NetworkAttachmentDefinition (macvlan with
pyabouts as IPAM); two annotated pods, their ``net1``, the network-status annotation and
``kubectl get ippools``; HTTP and ping between them over net1; a pod force-deleted while its
kubelet is down, whose address the reconciler's controller frees; with the controller scaled to
zero (a cluster that runs only the CronJob), a pod of a node gone for good, whose address a
run of the reconciler's CronJob as a Job frees; the next pod gets the lowest freed address; then
everything uninstalled and the cluster taken down.

A cluster that was already running (``cluster.sh up``) is used and left running. Everything the
demo adds carries its name (pods ``pyademo-*``, links ``pyademo*``) and is removed on exit, also
on Ctrl-C or an error; ``down`` removes what a run that was killed outright left. Traffic flows
only between the demo's pods, on 198.51.100.0/24.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from deploy.local.cluster import Cluster, default_state_dir, up
from deploy.local.cluster import down as cluster_down
from deploy.local.cluster_objects import (
    NETWORK_STATUS,
    address_of,
    apply,
    exec_in,
    macvlan_nad,
    pod,
    wait_ready,
)
from deploy.local.commands import LocalToolError
from deploy.local.controlplane import ControlPlane
from deploy.local.install import (
    NODE_CONFIG,
    PLUGIN,
    install_on_cluster,
    local_overlay,
    uninstall_from_cluster,
)
from deploy.local.multus_install import (
    THIN,
    install_multus,
    multus_overlay,
    uninstall_multus,
)
from deploy.local.netns import macvlan_master, run_cni
from pyabouts.ipam.stores.kubernetes import block_of_ippool

PREFIX = "pyademo"  # pods, links
NAMESPACE = "default"
NAD_NAME = "macvlan-conf"
RANGE = "198.51.100.0/24"
HTTP_PORT = 8080
DESCRIPTION = "The Multus quickstart on a real single-node cluster, with pyabouts as IPAM."


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


_STARTED = time.monotonic()


def step(text: str) -> None:
    """A step's header, with the seconds since the demo started (what each step costs)."""
    print(f"\n==> [{time.monotonic() - _STARTED:4.0f} s] {text}", flush=True)


def detail(text: str) -> None:
    for line in text.rstrip("\n").splitlines():
        print(f"    {line}".rstrip())
    sys.stdout.flush()


def show_kubectl(cluster: ControlPlane, *args: str) -> str:
    """Print a kubectl command as a user would type it, run it, print and return its output."""
    print(f"    $ kubectl {shlex.join(args)}")
    out = cluster.kubectl(*args)
    detail(out)
    return out


def show_in_pod(cluster: ControlPlane, name: str, *argv: str) -> str:
    print(f"    $ kubectl exec {name} -- {shlex.join(argv)}")
    out = exec_in(cluster, NAMESPACE, name, *argv)
    detail(out)
    return out


def run_demo() -> None:
    started = time.monotonic()
    state_dir = default_state_dir()
    with contextlib.ExitStack() as stack:
        node = use_cluster(state_dir, stack)
        cluster = node.control_plane
        assert cluster is not None
        install(cluster, state_dir, stack)

        master = stack.enter_context(macvlan_master(PREFIX))
        step(f"a NetworkAttachmentDefinition: macvlan on {master}, pyabouts as its IPAM")
        stack.callback(delete_demo_objects, cluster)
        definition = macvlan_nad(NAMESPACE, NAD_NAME, master, RANGE)
        detail(json.dumps(json.loads(definition["spec"]["config"]), indent=2))
        apply(cluster, definition)
        show_kubectl(cluster, "get", "network-attachment-definitions", "-n", NAMESPACE)

        server, client = f"{PREFIX}-server", f"{PREFIX}-client"
        step(f"two pods annotated k8s.v1.cni.cncf.io/networks: {NAD_NAME}")
        page = f"echo hello from {server} over net1 > /tmp/index.html"
        apply(
            cluster,
            pod(NAMESPACE, server, NAD_NAME, f"{page} && httpd -f -p {HTTP_PORT} -h /tmp"),
            pod(NAMESPACE, client, NAD_NAME),
        )
        detail(f"$ kubectl wait --for=condition=Ready pod/{server} pod/{client}")
        wait_ready(cluster, NAMESPACE, server, client)
        show_in_pod(cluster, client, "ip", "-4", "addr", "show", "net1")
        jsonpath = "jsonpath={.metadata.annotations." + NETWORK_STATUS.replace(".", "\\.") + "}"
        show_kubectl(cluster, "get", "pod", client, "-n", NAMESPACE, "-o", jsonpath)
        show_kubectl(cluster, "get", "ippools", "-n", "kube-system")

        step("the client fetches a page from the server over net1, and they ping")
        client_ip = talk(cluster, server, client)

        freed = reclaim_leaks(node, cluster, definition, client, client_ip)

        step("the next pod gets the lowest reclaimed address")
        following = f"{PREFIX}-next"
        apply(cluster, pod(NAMESPACE, following, NAD_NAME))
        wait_ready(cluster, NAMESPACE, following)
        given = address_of(cluster, NAMESPACE, following).split("/")[0]
        lowest = min(freed, key=ipaddress.ip_address)
        detail(f"{following} net1: {given}, freed above (the lowest free address)")
        if given != lowest:
            raise DemoError(f"{following} got {given}, not the reclaimed {lowest}")

        step("cleaning up: the demo's pods (their DELs run), Multus, pyabouts, the cluster")
    remaining = leftovers()
    if remaining:
        raise DemoError("left behind: " + ", ".join(remaining))
    detail(f"nothing left behind; the demo took {time.monotonic() - started:.0f} s")


def use_cluster(state_dir: Path, stack: contextlib.ExitStack) -> Cluster:
    """The local cluster: the one running, else one brought up now (and down at the end)."""
    step(f"the local cluster (bash deploy/local/cluster.sh up; state in {state_dir})")
    running = Cluster.load(state_dir)
    if running is not None and running.running() and running.node_ready() == "True":
        detail("already running: used, and left running afterwards")
        node = running
    else:
        node = up(state_dir)
        stack.callback(cluster_down, state_dir)
    assert node.control_plane is not None
    detail(f"export KUBECONFIG={node.control_plane.kubeconfig}")
    show_kubectl(node.control_plane, "get", "nodes", "-o", "wide")
    return node


def install(cluster: ControlPlane, state_dir: Path, stack: contextlib.ExitStack) -> None:
    """pyabouts and Multus, as users install them; uninstalled at the end."""
    step("pyabouts, as users install it: kubectl apply -k deploy/ (the image built here)")
    overlay = local_overlay(state_dir / "demo-install")
    stack.callback(uninstall_from_cluster, cluster, overlay)
    detail(f"$ kubectl apply -k {overlay}   # deploy/ with image localhost/pyabouts")
    install_on_cluster(cluster, overlay)
    show_kubectl(cluster, "get", "pods", "-n", "kube-system", "-o", "wide")
    detail(f"the agent's sidecar wrote {PLUGIN} and {NODE_CONFIG}/")

    step("Multus, from its own thin DaemonSet manifest (only the image renamed)")
    multus = multus_overlay(state_dir / "demo-multus")
    stack.callback(uninstall_multus, cluster, multus)
    detail(f"$ kubectl apply -k {multus}   # deployments/multus-daemonset.yml of v4.2.3")
    install_multus(cluster, multus)
    delegate = json.loads(THIN.config.read_text())["plugins"][0]["delegates"][0]["name"]
    detail(f"{THIN.config} written: the cluster network ({delegate}) stays eth0")


def talk(cluster: ControlPlane, server: str, client: str) -> str:
    """HTTP from `client` to `server` over net1, and a ping each way; the client's address."""
    server_ip = address_of(cluster, NAMESPACE, server).split("/")[0]
    client_ip = address_of(cluster, NAMESPACE, client).split("/")[0]
    request = f"printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {server_ip} {HTTP_PORT}"
    answer = show_in_pod(cluster, client, "sh", "-c", request)
    if "hello from" not in answer:
        raise DemoError(f"{client} got no page from {server_ip}")
    for name, there in ((client, server_ip), (server, client_ip)):
        show_in_pod(cluster, name, "ping", "-c", "1", "-W", "5", there)
    return client_ip


def reclaim_leaks(
    node: Cluster, cluster: ControlPlane, definition: dict[str, Any], client: str, client_ip: str
) -> list[str]:
    """Two leaks and the reconciler freeing them: the controller, then the CronJob's Job alone.
    Returns the freed addresses."""
    step("a leak: kubelet stops, the client pod is force-deleted, so no DEL can run")
    with kubelet_down(node):
        force_delete(cluster, client)
        seconds = wait_freed(cluster, client, client_ip)
        detail(f"pyabouts-reconciler's controller freed {client_ip} in {seconds:.1f} s")
    show_controller_log(cluster, client_ip)

    step("where only the CronJob runs (the controller scaled to zero): a node gone for good")
    with controller_scaled_to_zero(cluster):
        lost = f"{PREFIX}-lost"
        lost_ip = leak_on_a_lost_node(cluster, definition, lost)
        step("the reconciler's CronJob, run now as a Job (every 5 minutes otherwise)")
        run_reconciler_job(cluster, lost_ip)
        if held_by(cluster, f"{NAMESPACE}/{lost}"):
            raise DemoError(f"the CronJob's Job did not free {lost_ip}")
    return [client_ip, lost_ip]


@contextlib.contextmanager
def kubelet_down(node: Cluster) -> Iterator[None]:
    """kubelet stopped: the node is down as far as its pods are concerned, so no DEL runs."""
    kubelet = node.processes["kubelet"]
    detail("(kubelet stopped)")
    kubelet.stop()
    try:
        yield
    finally:
        kubelet.start()
        node.save()
        detail("(kubelet started again)")


def force_delete(cluster: ControlPlane, name: str) -> None:
    show_kubectl(cluster, "delete", "pod", name, "-n", NAMESPACE, "--force", "--grace-period=0")


def wait_freed(cluster: ControlPlane, name: str, ip: str) -> float:
    """Seconds until no IPPool holds an address for pod `name`."""
    t0 = time.monotonic()
    while held_by(cluster, f"{NAMESPACE}/{name}"):
        if time.monotonic() - t0 > 60:
            raise DemoError(f"{ip} was not freed")
        time.sleep(0.2)
    return time.monotonic() - t0


def show_controller_log(cluster: ControlPlane, ip: str) -> None:
    """The lines about `ip` in the log of the controller replica holding the Lease."""
    leader = cluster.kubectl(
        *("get", "lease", "pyabouts-reconciler", "-n", "kube-system"),
        *("-o", "jsonpath={.spec.holderIdentity}"),
    )
    deadline = time.monotonic() + 30
    while (logs := cluster.kubectl_run("logs", "-n", "kube-system", leader)).returncode:
        if time.monotonic() > deadline:  # kubelet serves logs once it is back
            raise DemoError(f"no logs of {leader}: {logs.stderr.strip()}")
        time.sleep(0.5)
    print(f"    $ kubectl logs -n kube-system {leader}   # the controller holding the Lease")
    detail("\n".join(line for line in logs.stdout.splitlines() if ip in line))


@contextlib.contextmanager
def controller_scaled_to_zero(cluster: ControlPlane) -> Iterator[None]:
    deployment = "deployment/pyabouts-reconciler"
    replicas = cluster.kubectl(
        "get", deployment, "-n", "kube-system", "-o", "jsonpath={.spec.replicas}"
    )
    show_kubectl(cluster, "scale", deployment, "-n", "kube-system", "--replicas=0")
    selector = "app.kubernetes.io/name=pyabouts-reconciler"
    cluster.kubectl(
        *("wait", "--for=delete", "pod", "-n", "kube-system", "-l", selector, "--timeout=90s")
    )
    try:
        yield
    finally:
        show_kubectl(cluster, "scale", deployment, "-n", "kube-system", f"--replicas={replicas}")


def leak_on_a_lost_node(cluster: ControlPlane, definition: dict[str, Any], name: str) -> str:
    """An address held for pod `name` of a node that is gone for good (a VM deleted with its
    pods, say): no kubelet will ever run that pod's DEL. This cluster has one node, whose kubelet
    must run the Job, so the lost node is played: a pod bound to a node that does not exist, the
    node's plugin called for it by hand as that node's kubelet would, then the pod force-deleted.
    Returns the address."""
    gone = f"{PREFIX}-gone-node"
    manifest = pod(NAMESPACE, name, NAD_NAME)
    manifest["spec"]["nodeName"] = gone  # never runs: no kubelet serves that node
    apply(cluster, manifest)
    uid = cluster.kubectl("get", "pod", name, "-n", NAMESPACE, "-o", "jsonpath={.metadata.uid}")
    config = {"name": NAD_NAME, **json.loads(definition["spec"]["config"])}
    print(f"    $ CNI_COMMAND=ADD ... {PLUGIN}   # as {gone}'s kubelet, for {NAMESPACE}/{name}")
    call = run_cni(
        str(PLUGIN),
        "ADD",
        config,
        container_id=f"{name}-sandbox",
        netns=f"/var/run/netns/{name}",  # IPAM only: the plugin never enters it
        ifname="net1",
        cni_path=str(PLUGIN.parent),
        cni_args=f"K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={name};K8S_POD_UID={uid}",
    )
    if call.returncode:
        raise DemoError(f"the plugin's ADD for {name} failed: {call.stdout or call.stderr}")
    ip = str(call.result["ips"][0]["address"].split("/")[0])
    detail(f"{NAMESPACE}/{name} holds {ip}; then {gone} is lost and its pod force-deleted")
    force_delete(cluster, name)
    if not held_by(cluster, f"{NAMESPACE}/{name}"):
        raise DemoError(f"{ip} was freed with no reconciler running")
    detail(f"{ip} is still held by {NAMESPACE}/{name}, a pod that is gone")
    return ip


def held_by(cluster: ControlPlane, pod_ref: str) -> bool:
    """Whether an IPPool holds an address for pod `pod_ref` ("namespace/name")."""
    pools = json.loads(cluster.kubectl("get", "ippools", "-n", "kube-system", "-o", "json"))
    return any(
        owner.pod == pod_ref
        for pool in pools["items"]
        for owner in block_of_ippool(pool).entries.values()
    )


def run_reconciler_job(cluster: ControlPlane, ip: str) -> None:
    """A Job made from the CronJob: it runs one pass to completion; its log names `ip` freed."""
    job = f"{PREFIX}-pass"
    show_kubectl(
        cluster, "create", "job", job, "-n", "kube-system", "--from=cronjob/pyabouts-reconciler"
    )
    try:
        cluster.kubectl(
            "wait", "--for=condition=Complete", f"job/{job}", "-n", "kube-system", "--timeout=120s"
        )
        out = cluster.kubectl("logs", "-n", "kube-system", f"job/{job}")
        # Its log holds its stderr's lines and, on stdout, the pass's JSON summary.
        start = out.index("{") if out.startswith("{") else out.index("\n{") + 1
        summary, _ = json.JSONDecoder().raw_decode(out[start:])
        detail(f"the Job's pass: {summary['summary']}")
        detail("\n".join(line for line in out[:start].splitlines() if ip in line))
        if ip not in out:
            raise DemoError(f"the Job's log does not name {ip}")
    finally:
        cluster.kubectl_run("delete", "job", job, "-n", "kube-system", "--wait=false")


def delete_demo_objects(cluster: ControlPlane) -> None:
    pods = cluster.kubectl("get", "pods", "-n", NAMESPACE, "-o", "name").split()
    mine = [p for p in pods if p.startswith(f"pod/{PREFIX}-")]
    if mine:
        cluster.kubectl("delete", *mine, "-n", NAMESPACE, "--wait=true", "--timeout=120s")
    cluster.kubectl_run("delete", "network-attachment-definition", NAD_NAME, "-n", NAMESPACE)


# --------------------------------------------------------------------------------------------
# leftovers of interrupted runs


def demo_links() -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True)
    return [
        str(link["ifname"]) for link in json.loads(out.stdout) if link["ifname"].startswith(PREFIX)
    ]


def leftovers() -> list[str]:
    on_node = [path for path in (PLUGIN, NODE_CONFIG, THIN.config) if path.exists()]
    return [*(f"link {name}" for name in demo_links()), *map(str, on_node)]


def down() -> None:
    """Remove what an interrupted run left behind: the demo's links, what it installed, and the
    cluster (as `cluster.sh down` does)."""
    state_dir = default_state_dir()
    found = leftovers()
    running = Cluster.load(state_dir)
    if running is not None and running.control_plane is not None and running.running():
        for remove, overlay in (
            (uninstall_multus, state_dir / "demo-multus"),
            (uninstall_from_cluster, state_dir / "demo-install"),
        ):
            if overlay.is_dir():
                with contextlib.suppress(LocalToolError):
                    remove(running.control_plane, overlay)
                    print(f"removed what {overlay} installed")
    if running is not None:
        cluster_down(state_dir)
        print("cluster down")
    for name in demo_links():
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
        print(f"deleted link {name}")
    print("nothing to clean up" if not found and running is None else "clean")


# --------------------------------------------------------------------------------------------


class StoppedError(Exception):
    """SIGTERM or SIGHUP arrived; raised so that every finally runs, as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise StoppedError(signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo.sh", description=DESCRIPTION)
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=["run", "down"],
        help="run the demo (default), or remove leftovers of an interrupted run",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo creates network namespaces and links: run it as root", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGHUP, _stop_on_signal)
    try:
        if args.command == "down":
            down()
        else:
            run_demo()
    except (DemoError, LocalToolError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 128 + signal.SIGINT
    except StoppedError as stop:
        print(f"\nstopped by {stop}; cleaned up", file=sys.stderr)
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
