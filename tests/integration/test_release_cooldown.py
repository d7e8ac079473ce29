"""release_cooldown through the plugin as kubelet runs it (in process, and through the shim
and its agent) on the real apiserver: a released address rests for the cooldown, given to
nobody else until it ends and given once it has; a pod re-created under its name takes its
address back at once."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from deploy.local.controlplane import ControlPlane
from tests.integration.plugin_fixtures import kubernetes_ipam
from tests.integration.plugin_processes import cni, netconf

pytestmark = pytest.mark.integration

COOLDOWN = 8  # seconds: whole seconds, so a rest lasts 7 to 8


def call(exe: str, command: str, conf: dict[str, Any], pod: str, sandbox: str) -> Any:
    """`command` for `pod`'s net1 from `sandbox`, with a UID of its own (as a new pod has)."""
    args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=rest;K8S_POD_NAME={pod};K8S_POD_UID={uuid.uuid4()}"
    return cni(exe, command, conf, sandbox, args)


def address(outcome: Any) -> str:
    return str(outcome.expect_success()["ips"][0]["address"].split("/")[0])


def test_a_released_address_rests_for_others_but_not_for_its_pod(
    pyabouts_exe: str, pyabouts_cluster: ControlPlane
) -> None:
    network = f"rest-{uuid.uuid4().hex[:6]}"
    conf = netconf(
        **kubernetes_ipam(
            pyabouts_cluster,
            range="10.72.0.0/29",  # six addresses
            network_name=network,
            release_cooldown=COOLDOWN,
        )
    )
    given = {
        f"p{i}": address(call(pyabouts_exe, "ADD", conf, f"p{i}", f"s-p{i}")) for i in range(6)
    }

    # p1's pod is re-created under its name: its new sandbox's ADD gets its address back at once.
    call(pyabouts_exe, "DEL", conf, "p1", "s-p1").expect_success()
    assert address(call(pyabouts_exe, "ADD", conf, "p1", "s-p1-again")) == given["p1"]

    call(pyabouts_exe, "DEL", conf, "p2", "s-p2").expect_success()
    released = time.monotonic()
    refused = call(pyabouts_exe, "ADD", conf, "newcomer", "s-new")
    assert time.monotonic() - released < COOLDOWN - 1  # asked well within the rest
    assert refused.returncode != 0
    assert "exhausted" in refused.result["msg"] and "rest" in refused.result["msg"]
    time.sleep(max(0.0, released + COOLDOWN + 0.2 - time.monotonic()))
    assert address(call(pyabouts_exe, "ADD", conf, "newcomer", "s-new")) == given["p2"]
