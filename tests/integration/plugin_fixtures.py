"""Fixtures and config helpers for tests that run the `pyabouts` executable on real stores.

Every test that takes `pyabouts_exe` runs twice: with the in-process plugin (the `pyabouts`
console script, a whole pyabouts per call) and with the node shim (plugin/shim/, Go) as
`pyabouts-install --shim` installs it, talking to a real `pyabouts-agent`. The shim has no
in-process fallback, so a call no agent served fails the test. Tests that simulate several
nodes ask `node_agents` for one agent per node (none in in-process mode), each with the node's
flat file as its own datastore settings (it ignores what requests name).
"""

import contextlib
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.local.agent_process import AgentProcess, running_agent
from deploy.local.controlplane import ControlPlane
from deploy.local.install import install_pyabouts
from deploy.local.node_shim import built_shim
from pyabouts.plugin.install import install_shim
from tests.integration.etcd_fixtures import EtcdServer
from tests.integration.plugin_processes import FLAT_FILE_NAME

#: Starts an agent in a directory and returns it; None in in-process mode.
NodeAgents = Callable[[Path], AgentProcess] | None


@pytest.fixture(scope="session", params=["in-process", "agent"])
def plugin_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def pyabouts_exe(plugin_mode: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The plugin as kubelet runs it: the console script, or the shim with its agent."""
    if plugin_mode == "in-process":
        exe = Path(sys.executable).parent / "pyabouts"
        if not exe.is_file():
            raise RuntimeError(
                f"{exe} is missing: install the package (bash deploy/local/setup.sh)"
            )
        yield str(exe)
        return
    directory = tmp_path_factory.mktemp("agent")
    # It serves the stores of many tests, so it follows each request's datastore settings.
    with running_agent(directory) as agent:
        yield str(install_shim(directory / "bin", built_shim(), socket_path=str(agent.socket)))


@pytest.fixture
def node_agents(plugin_mode: str) -> Iterator[NodeAgents]:
    """In agent mode, a starter of per-node agents, each stopped after the test; each serves
    the datastore of its node's flat file (make_nodes writes it first)."""
    if plugin_mode == "in-process":
        yield None
        return
    with contextlib.ExitStack() as stack:
        yield lambda directory: stack.enter_context(
            running_agent(directory, config=directory / FLAT_FILE_NAME)
        )


def etcd_ipam(server: EtcdServer, **ipam: Any) -> dict[str, Any]:
    """An `ipam` section that points pyabouts at `server`."""
    settings: dict[str, Any] = {
        "type": "pyabouts",
        "datastore": "etcd",
        "etcd_host": server.endpoint,
    }
    if server.username:
        settings |= {"etcd_username": server.username, "etcd_password": server.password}
    if server.ca_cert:
        settings |= {
            "etcd_ca_cert_file": server.ca_cert,
            "etcd_cert_file": server.cert,
            "etcd_key_file": server.key,
        }
    return settings | ipam


@pytest.fixture(scope="session")
def pyabouts_cluster(kube_apiserver: ControlPlane) -> ControlPlane:
    """The local apiserver with what `kubectl apply -k deploy/` installs (CRDs, RBAC)."""
    install_pyabouts(kube_apiserver)
    return kube_apiserver


def kubernetes_ipam(cluster: ControlPlane, **ipam: Any) -> dict[str, Any]:
    """An `ipam` section that points pyabouts at the local apiserver."""
    settings = {"type": "pyabouts", "kubernetes": {"kubeconfig": str(cluster.kubeconfig)}}
    return settings | ipam


def kubernetes_datastore(cluster: ControlPlane) -> dict[str, Any]:
    """Flat-file settings that point pyabouts at the local apiserver as its admin."""
    return {"datastore": "kubernetes", "kubernetes": {"kubeconfig": str(cluster.kubeconfig)}}


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
