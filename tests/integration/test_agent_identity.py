"""The node agent acts with its own identity, never with the credentials a request names.

NetworkAttachmentDefinitions are written by namespace users and the agent runs as root on every
node: a request's kubeconfig (with an exec plugin), certificate paths, etcd host or flat file
must not make it run a command, open a file or connect anywhere. And its /readyz says whether
its own datastore answers it: a release that cannot reach its IPPools never becomes Ready, so a
DaemonSet's rolling update stops at its first node. Real agents, the real apiserver, real etcd.
"""

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.local.agent_process import AgentProcess, running_agent
from deploy.local.controlplane import ControlPlane
from deploy.local.etcd_server import running_etcd
from deploy.local.netns import CniCall
from deploy.local.node_shim import built_shim
from pyabouts.ipam.errors import INVALID_CONFIG
from pyabouts.plugin.install import install_shim
from tests.integration.etcd_fixtures import EtcdServer
from tests.integration.kube_fixtures import exec_kubeconfig, forbidden_kubeconfig
from tests.integration.plugin_fixtures import etcd_ipam
from tests.integration.plugin_processes import cni, metric, netconf
from tests.integration.stored_state import stored, stored_allocations
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def add(agent: AgentProcess, ipam: dict[str, Any], container: str) -> CniCall:
    """An ADD through the node shim to `agent`."""
    shim = install_shim(agent.directory / "bin", built_shim(), socket_path=str(agent.socket))
    # A short timeout: a request that made the agent open one of the FIFOs would hang.
    return cni(str(shim), "ADD", netconf("1.0.0", **ipam), container, timeout=30)


def agent_config(directory: Path, settings: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "agent.conf"
    config.write_text(json.dumps(settings))
    return config


def marking_kubeconfig(path: Path, cluster: ControlPlane, marker: Path) -> str:
    """A kubeconfig whose exec plugin leaves `marker` behind when it runs, and then gives a
    token that works: followed, it would succeed, so only the marker tells."""
    return exec_kubeconfig(path, cluster, run_first=f"touch {marker}")


def fifo(path: Path) -> str:
    """A path that hangs whoever opens it for reading (nobody ever writes it)."""
    os.mkfifo(path)
    return str(path)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP port on loopback that counts as contacted if anyone connects to it."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        yield server


def contacted(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
    except BlockingIOError:
        return False
    return True


@pytest.fixture
def kubernetes_agent(pyabouts_cluster: ControlPlane, tmp_path: Path) -> Iterator[AgentProcess]:
    """An agent that serves IPPools as ServiceAccount kube-system/pyabouts, as the DaemonSet."""
    own = pyabouts_cluster.service_account_kubeconfig("kube-system", "pyabouts")
    config = agent_config(tmp_path / "node", {"kubernetes": {"kubeconfig": str(own)}})
    with running_agent(tmp_path / "node", config=config) as agent:
        yield agent


def test_an_agent_with_its_own_datastore_watches_the_ippools_before_any_request(
    kubernetes_agent: AgentProcess,
) -> None:
    """Its store client is opened at start, so the node's first pod finds it warm: the watch
    that tells it which blocks others wrote is live with no request served yet."""
    deadline = time.monotonic() + 20
    while metric(kubernetes_agent, "pyabouts_agent_block_feed_live") != 1:
        assert time.monotonic() < deadline, "the IPPool watch never went live"
        time.sleep(0.2)
    assert metric(kubernetes_agent, "pyabouts_agent_requests_total") == 0


def test_a_requests_kubeconfig_certificates_and_flat_file_are_never_followed(
    kubernetes_agent: AgentProcess,
    pyabouts_cluster: ControlPlane,
    listener: socket.socket,
    tmp_path: Path,
) -> None:
    network = f"own-{uuid.uuid4().hex[:6]}"
    marker = tmp_path / "exec-plugin-ran"
    hostile_flat = tmp_path / "flat.conf"
    port = listener.getsockname()[1]
    hostile_flat.write_text(json.dumps({"datastore": "etcd", "etcd_host": f"127.0.0.1:{port}"}))
    ipam = {
        "type": "pyabouts",
        "range": "10.92.0.0/24",
        "network_name": network,
        "kubernetes": {"kubeconfig": marking_kubeconfig(tmp_path / "kc", pyabouts_cluster, marker)},
        "configuration_path": str(hostile_flat),
    }
    first = add(kubernetes_agent, ipam, "exec").expect_success()
    fifos = {
        "kubernetes": {"kubeconfig": fifo(tmp_path / "kubeconfig.fifo")},
        "etcd_ca_cert_file": fifo(tmp_path / "ca.fifo"),
        "etcd_cert_file": fifo(tmp_path / "cert.fifo"),
        "etcd_key_file": fifo(tmp_path / "key.fifo"),
        "configuration_path": fifo(tmp_path / "flat.fifo"),
    }
    second = add(kubernetes_agent, ipam | fifos, "fifo").expect_success()

    # Served from the agent's own store (a NAD ported from whereabouts names a kubeconfig and
    # keeps working), with nothing the requests named run, opened or contacted.
    assert stored(pyabouts_cluster, network) == {"10.92.0.1": "exec", "10.92.0.2": "fifo"}
    assert [first["ips"][0]["address"], second["ips"][0]["address"]] == [
        "10.92.0.1/24",
        "10.92.0.2/24",
    ]
    assert not marker.exists()
    assert not contacted(listener)


def test_an_agent_that_trusts_requests_does_run_their_exec_plugin(
    pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    # The other side of the test above: what --trust-request-datastore (tests, single-user
    # hosts) allows, and what the marker would show if the agent followed a request.
    marker = tmp_path / "exec-plugin-ran"
    ipam = {
        "type": "pyabouts",
        "range": "10.93.0.0/24",
        "network_name": f"trusting-{uuid.uuid4().hex[:6]}",
        "kubernetes": {"kubeconfig": marking_kubeconfig(tmp_path / "kc", pyabouts_cluster, marker)},
    }
    with running_agent(tmp_path / "node") as trusting:  # no config: trusts requests
        add(trusting, ipam, "trusted").expect_success()
    assert marker.exists()


def test_a_request_for_the_datastore_the_agent_does_not_serve_is_refused_by_name(
    kubernetes_agent: AgentProcess, listener: socket.socket
) -> None:
    port = listener.getsockname()[1]
    ipam = {
        "type": "pyabouts",
        "range": "10.94.0.0/24",
        "datastore": "etcd",
        "etcd_host": f"127.0.0.1:{port}",
    }
    refused = add(kubernetes_agent, ipam, "etcd")
    assert (refused.returncode, refused.result["code"]) == (1, INVALID_CONFIG)
    assert "serves datastore 'kubernetes'" in refused.result["msg"]
    assert "asks for datastore 'etcd'" in refused.result["msg"]
    assert not contacted(listener)


def test_an_agent_serving_etcd_fills_requests_from_its_own_config(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    network = f"etcd-own-{uuid.uuid4().hex[:6]}"
    settings = etcd_ipam(etcd_server)
    del settings["type"]
    config = agent_config(tmp_path / "node", settings)
    with running_agent(tmp_path / "node", config=config) as agent:
        # No datastore in the NAD: the agent's config fills it, as the node's flat file would.
        ipam = {"type": "pyabouts", "range": "10.95.0.0/24", "network_name": network}
        add(agent, ipam, "e1").expect_success()
        assert list(stored_allocations(etcd_server, network)) == ["10.95.0.0/24+1"]
        refused = add(agent, ipam | {"datastore": "kubernetes"}, "k1")
        assert refused.result["code"] == INVALID_CONFIG
        assert f"serves datastore 'etcd' at {etcd_server.endpoint}" in refused.result["msg"]


def test_an_agent_whose_own_settings_are_unusable_does_not_start(tmp_path: Path) -> None:
    missing = tmp_path / "node" / "missing.kubeconfig"
    config = agent_config(tmp_path / "node", {"kubernetes": {"kubeconfig": str(missing)}})
    with pytest.raises(RuntimeError, match=f"kubeconfig {missing}"):
        AgentProcess(tmp_path / "node", config=config).start()
    with pytest.raises(RuntimeError, match="not running in a cluster"):
        AgentProcess(tmp_path / "other", config=agent_config(tmp_path / "other", {})).start()


def test_an_agent_whose_etcd_stops_answering_is_not_ready_until_it_answers_again(
    tmp_path: Path,
) -> None:
    with running_etcd(tmp_path / "etcd") as etcd:
        config = agent_config(tmp_path / "node", {"datastore": "etcd", "etcd_host": etcd.endpoint})
        flags = ["--command-deadline", "3"]
        with running_agent(tmp_path / "node", config=config, extra_args=flags) as agent:
            wait_for(agent.ready, 10, "ready once etcd answered its probe")
            ipam = {"type": "pyabouts", "range": "10.97.0.0/24", "network_name": "ready-etcd"}
            add(agent, ipam, "before").expect_success()
            etcd.kill()
            refused = add(agent, ipam, "during")
            assert refused.result["code"] == 11, refused.result
            assert not agent.ready() and agent.endpoint("/healthz") == "ok"
            etcd.start_again()
            wait_for(agent.ready, 15, "ready again once etcd answers (the probe asks it)")
            add(agent, ipam, "after").expect_success()


def test_an_agent_without_the_rights_to_its_ippools_is_not_ready_until_it_has_them(
    tmp_path: Path, pyabouts_cluster: ControlPlane
) -> None:
    account = f"no-rbac-{uuid.uuid4().hex[:6]}"
    kubeconfig = forbidden_kubeconfig(pyabouts_cluster, account)
    config = agent_config(tmp_path / "node", {"kubernetes": {"kubeconfig": str(kubeconfig)}})
    binding = f"rolebinding/{account}"
    try:
        with running_agent(tmp_path / "node", config=config) as agent:
            time.sleep(3)  # the watch's list and the probes refused meanwhile
            assert not agent.ready() and agent.endpoint("/healthz") == "ok"
            pyabouts_cluster.kubectl(
                *("create", "rolebinding", account, "-n", "kube-system"),
                *("--role=pyabouts-plugin", f"--serviceaccount=kube-system:{account}"),
            )
            wait_for(agent.ready, 30, "ready once its account may read the IPPools")
    finally:
        pyabouts_cluster.kubectl_run("delete", binding, "-n", "kube-system", "--ignore-not-found")
        pyabouts_cluster.kubectl_run("delete", "serviceaccount", account, "-n", "kube-system")
