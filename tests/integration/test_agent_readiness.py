"""The agent's /readyz says whether its own datastore answers it, on a real etcd and a real
kube-apiserver: a release that cannot reach its IPPools never becomes Ready, so a DaemonSet's
rolling update stops at its first node."""

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from deploy.local.agent_process import running_agent
from deploy.local.controlplane import ControlPlane
from deploy.local.etcd_server import running_etcd
from tests.integration.test_agent_identity import add, agent_config
from tests.integration.test_kubernetes_datastore import forbidden_kubeconfig

pytestmark = pytest.mark.integration


def eventually(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_an_agent_whose_etcd_stops_answering_is_not_ready_until_it_answers_again(
    tmp_path: Path,
) -> None:
    with running_etcd(tmp_path / "etcd") as etcd:
        config = agent_config(tmp_path / "node", {"datastore": "etcd", "etcd_host": etcd.endpoint})
        flags = ["--command-deadline", "3"]
        with running_agent(tmp_path / "node", config=config, extra_args=flags) as agent:
            eventually(agent.ready, 10, "ready once etcd answered its probe")
            ipam = {"type": "pyabouts", "range": "10.97.0.0/24", "network_name": "ready-etcd"}
            add(agent, ipam, "before").expect_success()
            etcd.kill()
            refused = add(agent, ipam, "during")
            assert refused.result["code"] == 11, refused.result
            assert not agent.ready() and agent.endpoint("/healthz") == "ok"
            etcd.start_again()
            eventually(agent.ready, 15, "ready again once etcd answers (the probe asks it)")
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
            eventually(agent.ready, 30, "ready once its account may read the IPPools")
    finally:
        pyabouts_cluster.kubectl_run("delete", binding, "-n", "kube-system", "--ignore-not-found")
        pyabouts_cluster.kubectl_run("delete", "serviceaccount", account, "-n", "kube-system")
