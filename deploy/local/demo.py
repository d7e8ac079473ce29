"""The pyabouts demo: pods get addresses from pyabouts through Multus on a local Kubernetes API.

Run it through ``bash deploy/local/demo.sh`` (which prepares the machine first), or as
``.venv/bin/python -m deploy.local.demo [run|down]`` from the repository root, as root.

The story, printing what a person would check at each step: start etcd + kube-apiserver on
loopback; install pyabouts with ``kubectl apply -k deploy/`` and the NetworkAttachmentDefinition
CRD; start the node's pyabouts-agent and install the thin plugin that hands it each call; create
a NAD (macvlan with pyabouts as IPAM); start two pods annotated with it through the real Multus
thin plugin, as kubelet would; show their interfaces, the network-status annotation
and ``kubectl get ippools``; serve a page from one pod and fetch it from the other over net1;
crash a pod (deleted, no DEL) and let ``pyabouts-reconciler`` reclaim its address, which the
next pod gets; show what the agent served; then tear everything down.

Everything it creates carries a name prefix (namespaces and links ``pyademo*``, the temp dir
``pyabouts-demo-*``) and is removed on exit, also on Ctrl-C or an error. ``down`` removes the
leftovers of a run that was killed outright. Traffic flows only between the demo's own
namespaces, on 198.51.100.0/24.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from deploy.local.agent_process import running_agent
from deploy.local.controlplane import ControlPlane, ControlPlaneError, start_control_plane
from deploy.local.install import install_pyabouts
from deploy.local.netns import exec_in, http_get, macvlan_master, netns_names, ping, serve_http
from deploy.local.pod_objects import PodRuntimeError
from deploy.local.pod_runtime import (
    RunningPod,
    create_nad,
    install_nad_crd,
    macvlan_nad,
    running_node,
)
from pyabouts.controller.pods import NETWORK_STATUS
from pyabouts.plugin.install import install_thin_plugin

PREFIX = "pyademo"  # network namespaces and links
TMP_PREFIX = "pyabouts-demo-"
NAMESPACE = "default"
NAD_NAME = "macvlan-conf"
RANGE = "198.51.100.0/24"
HTTP_PORT = 8080
DESCRIPTION = "Pods get addresses from pyabouts through Multus on a local Kubernetes API."
BIN = Path(sys.executable).parent


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and why."""


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


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


def show_in_pod(pod: RunningPod, *argv: str) -> None:
    print(f"    [{pod.name}] $ {shlex.join(argv)}")
    detail(exec_in(pod.sandbox, list(argv)).stdout)


def address_of(pod: RunningPod, ifname: str = "net1") -> str:
    links = json.loads(exec_in(pod.sandbox, ["ip", "-j", "-4", "addr", "show", ifname]).stdout)
    return str(links[0]["addr_info"][0]["local"])


def write_agent_config(cluster: ControlPlane, directory: Path) -> Path:
    """The agent's own flat file: IPPools as ServiceAccount kube-system/pyabouts (what the
    DaemonSet runs as), whatever kubeconfig a NAD names."""
    directory.mkdir(parents=True, exist_ok=True)
    kubeconfig = cluster.service_account_kubeconfig("kube-system", "pyabouts")
    config = directory / "agent.conf"
    config.write_text(json.dumps({"kubernetes": {"kubeconfig": str(kubeconfig)}}))
    return config


def run_demo() -> None:
    refuse_leftovers()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)

        step("a local Kubernetes control plane: etcd + kube-apiserver v1.34.3 on 127.0.0.1")
        cluster = start_control_plane(workdir / "controlplane")
        stack.callback(cluster.stop)
        detail(f"API server {cluster.server}; kubeconfig {cluster.kubeconfig}")

        step("installing pyabouts as a user does (kubectl apply -k deploy/), and Multus's NAD CRD")
        install_pyabouts(cluster)
        install_nad_crd(cluster)
        show_kubectl(cluster, "get", "crd")

        step("the node agent (pyabouts-agent) and the thin plugin that hands it each CNI call")
        agent_config = write_agent_config(cluster, workdir / "agent")
        agent = stack.enter_context(running_agent(workdir / "agent", config=agent_config))
        thin = install_thin_plugin(workdir / "bin", socket_path=str(agent.socket))
        detail(f"agent on {agent.socket} (metrics on {agent.listen}); plugin {thin}")
        master = stack.enter_context(macvlan_master(PREFIX))
        node = stack.enter_context(running_node(cluster, workdir / "node", str(thin)))
        step(f"a NetworkAttachmentDefinition: macvlan on {master} with pyabouts as its IPAM")
        ipam = {"range": RANGE, "kubernetes": {"kubeconfig": str(cluster.kubeconfig)}}
        config = macvlan_nad(master, ipam)
        detail(json.dumps(config, indent=2))
        create_nad(cluster, NAMESPACE, NAD_NAME, config)
        show_kubectl(cluster, "get", "network-attachment-definitions", "-n", NAMESPACE)

        step(f"two pods annotated k8s.v1.cni.cncf.io/networks: {NAD_NAME}, set up by Multus")
        server = node.run_pod(NAMESPACE, f"{PREFIX}-server", NAD_NAME)
        client = node.run_pod(NAMESPACE, f"{PREFIX}-client", NAD_NAME)
        for pod in (server, client):
            show_in_pod(pod, "ip", "-br", "addr")
        show_network_status(cluster, client)
        show_kubectl(cluster, "get", "ippools", "-n", "kube-system")

        step("the client fetches a page from the server over net1, and they ping")
        talk(server, client)

        step("a leak: the client pod is force-deleted and its node never says DEL")
        node.crash_pod(client)
        show_kubectl(cluster, "get", "ippools", "-n", "kube-system")
        reclaim(cluster)
        show_kubectl(cluster, "get", "ippools", "-n", "kube-system")

        step("the next pod gets the reclaimed address")
        following = node.run_pod(NAMESPACE, f"{PREFIX}-next", NAD_NAME)
        detail(f"{following.name} net1: {address_of(following)}")

        step("what the agent served (its Prometheus metrics)")
        for line in agent.metrics().splitlines():
            if line.startswith(("pyabouts_agent_requests_total", "pyabouts_pool_addresses")):
                detail(line)

        step("cleaning up: DEL through Multus, pods, namespaces, veth pair, agent, control plane")
    remaining = leftovers()
    if remaining:
        raise DemoError("left behind: " + ", ".join(remaining))
    detail(f"nothing left behind; the demo took {time.monotonic() - started:.0f} s")


def show_network_status(cluster: ControlPlane, pod: RunningPod) -> None:
    jsonpath = "jsonpath={.metadata.annotations." + NETWORK_STATUS.replace(".", "\\.") + "}"
    show_kubectl(cluster, "get", "pod", pod.name, "-n", pod.namespace, "-o", jsonpath)


def talk(server: RunningPod, client: RunningPod) -> None:
    server_ip, client_ip = address_of(server), address_of(client)
    page = f"hello from {server.name} at {server_ip}, address by pyabouts\n"
    with serve_http(server.sandbox, server_ip, HTTP_PORT, page) as url:
        print(f"    [{client.name}] $ GET {url}")
        detail(http_get(client.sandbox, url))
    for src, dst in ((client, server_ip), (server, client_ip)):
        if not ping(src.sandbox, dst):
            raise DemoError(f"{src.name} cannot ping {dst}")
        detail(f"{src.name} -> {dst}: ping ok")


def reclaim(cluster: ControlPlane) -> None:
    argv = [str(BIN / "pyabouts-reconciler"), "--kubeconfig", str(cluster.kubeconfig)]
    print("    $ pyabouts-reconciler   # one pass, as its CronJob runs it")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise DemoError(f"the reconciler failed: {done.stderr.strip()}")
    summary = json.loads(done.stdout)
    detail(summary["summary"])
    for freed in summary["addresses"]:
        detail(f"freed {freed['ip']} of {freed['pod']} ({freed['reason']})")


# --------------------------------------------------------------------------------------------
# leftovers of interrupted runs


def demo_netns() -> list[str]:
    return [name for name in netns_names() if name.startswith(PREFIX)]


def demo_links() -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True)
    return [
        str(link["ifname"]) for link in json.loads(out.stdout) if link["ifname"].startswith(PREFIX)
    ]


def demo_dirs() -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"))


def leftovers() -> list[str]:
    return [
        *(f"netns {name}" for name in demo_netns()),
        *(f"link {name}" for name in demo_links()),
        *(f"dir {path}" for path in demo_dirs()),
    ]


def refuse_leftovers() -> None:
    found = leftovers()
    if found:
        raise DemoError(
            "found leftovers of an earlier run (" + ", ".join(found) + "): "
            "remove them with `bash deploy/local/demo.sh down`"
        )


def down() -> None:
    """Remove what an interrupted run left behind, found by its name prefixes."""
    found = leftovers()
    for path in demo_dirs():
        with contextlib.suppress(ControlPlaneError, OSError, ValueError):
            ControlPlane.load(path / "controlplane").stop()
            print(f"stopped the control plane of {path}")
        shutil.rmtree(path, ignore_errors=True)
        print(f"removed {path}")
    for name in demo_netns():
        subprocess.run(["ip", "netns", "del", name], check=False)
        print(f"deleted netns {name}")
    for name in demo_links():
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
        print(f"deleted link {name}")
    print("nothing to clean up" if not found else "clean")


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
    except (DemoError, PodRuntimeError, ControlPlaneError) as exc:
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
