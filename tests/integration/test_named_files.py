"""The in-process plugin's executable, run as a runtime runs it (as root, with the runtime's
environment: no PYABOUTS_TRUSTED_DIRS), refuses a network config that names its files outside
the directories kept for them, before it opens any (plugin/named_files.py)."""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.netns import CniCall, run_cni
from pyabouts.plugin.named_files import TRUSTED_DIRS_ENV
from tests.kubeconfig_files import write_kubeconfig_document

pytestmark = pytest.mark.integration

IN_PROCESS = str(Path(sys.executable).parent / "pyabouts")
AS_A_RUNTIME = {TRUSTED_DIRS_ENV: ""}  # the tests' environment trusts /tmp; a runtime's does not


def add(ipam: dict[str, object]) -> CniCall:
    conf = {"cniVersion": "1.0.0", "name": "blue", "ipam": {"type": "pyabouts", **ipam}}
    return run_cni(
        IN_PROCESS,
        "ADD",
        conf,
        container_id="c1",
        netns="/var/run/netns/none",
        ifname="net1",
        cni_path="/usr/lib/cni",
        cni_args="K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1",
        extra_env=AS_A_RUNTIME,
    )


@pytest.fixture
def outside() -> Iterator[Path]:
    """A directory kept for none of the kinds (/var/tmp), removed afterwards."""
    directory = Path("/var/tmp") / f"pyabouts-named-files-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def test_a_kubeconfig_named_by_a_nad_runs_no_command_as_root(outside: Path) -> None:
    marker = outside / "ran-as-root"
    command = {"command": "/bin/sh", "args": ["-c", f"touch {marker}"]}
    command["apiVersion"] = "client.authentication.k8s.io/v1"
    kubeconfig = write_kubeconfig_document(
        outside / "kubeconfig", {"exec": command}, {"server": "https://127.0.0.1:1"}
    )
    call = add({"range": "10.0.0.0/24", "kubernetes": {"kubeconfig": str(kubeconfig)}})
    assert call.returncode == 1
    assert call.result["code"] == 7
    assert f"kubernetes.kubeconfig '{kubeconfig}' is outside" in call.result["msg"]
    assert not marker.exists()


def test_a_log_file_named_by_a_nad_elsewhere_is_not_opened(outside: Path) -> None:
    """Not a reason to fail the call (whereabouts' examples log to /tmp): said on stderr, and
    the call goes on without it."""
    log = outside / "profile.sh"
    call = add({"range": "10.0.0.0/24", "log_file": str(log)})
    assert f"log_file '{log}' is outside the directories this node keeps for it" in call.stderr
    # It goes on: to the datastore, which this config (no flat file here) does not name.
    assert (call.returncode, call.result["code"]) == (1, 7)
    assert "kubeconfig is required" in call.result["msg"]
    assert not log.exists()
