"""The installer sidecar's check, on the real apiserver, of whether its DaemonSet was deleted:
it uninstalls only then, never through a rolling update, and never for a DaemonSet whose name
did not resolve when it started (a kustomize namePrefix renames the DaemonSet and not the
sidecar's --uninstall-with, nor the Role's resourceNames). The test's own namespace holds an
account with a Role like deploy/'s: get on the one DaemonSet it names."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from deploy.local.controlplane import ControlPlane
from deploy.local.node_shim import built_shim
from pyabouts.plugin.node_config import OwnDaemonSet

pytestmark = pytest.mark.integration

NAME = "pyabouts-agent"
NAMESPACE = "uninstall-check"
RBAC = """
apiVersion: v1
kind: Namespace
metadata: {{name: {NAMESPACE}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: agent, namespace: {NAMESPACE}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: agent-uninstall, namespace: {NAMESPACE}}}
rules: [{{apiGroups: [apps], resources: [daemonsets], resourceNames: [{NAME}], verbs: [get]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: agent-uninstall, namespace: {NAMESPACE}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: agent-uninstall}}
subjects: [{{kind: ServiceAccount, name: agent, namespace: {NAMESPACE}}}]
"""
DAEMONSET = """
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: {NAME}, namespace: {NAMESPACE}}}
spec:
  selector: {{matchLabels: {{app: uninstall-check}}}}
  template:
    metadata: {{labels: {{app: uninstall-check}}}}
    spec: {{containers: [{{name: agent, image: pause}}]}}
"""


@pytest.fixture
def pod_environment(
    pyabouts_cluster: ControlPlane, tmp_path: Path
) -> Iterator[tuple[dict[str, str], Path]]:
    """The sidecar's view: the in-cluster environment and its account's files."""
    namespace = f"{NAMESPACE}-{uuid.uuid4().hex[:6]}"
    pyabouts_cluster.kubectl("apply", "-f", "-", input=RBAC.format(NAMESPACE=namespace, NAME=NAME))
    account = tmp_path / "serviceaccount"
    account.mkdir()
    account.joinpath("token").write_text(pyabouts_cluster.service_account_token(namespace, "agent"))
    account.joinpath("ca.crt").write_text(pyabouts_cluster.ca_cert.read_text())
    account.joinpath("namespace").write_text(namespace)
    server = urlsplit(pyabouts_cluster.server)
    environ = {
        "KUBERNETES_SERVICE_HOST": str(server.hostname),
        "KUBERNETES_SERVICE_PORT": str(server.port),
    }
    yield environ, account
    pyabouts_cluster.kubectl("delete", "namespace", namespace, "--wait=false")


def test_only_a_deleted_or_replaced_daemonset_reads_as_deleted(
    pyabouts_cluster: ControlPlane, pod_environment: tuple[dict[str, str], Path]
) -> None:
    environ, account = pod_environment
    daemonset = DAEMONSET.format(NAMESPACE=account.joinpath("namespace").read_text(), NAME=NAME)
    pyabouts_cluster.kubectl("apply", "-f", "-", input=daemonset)
    own = OwnDaemonSet(NAME, environ, account)
    own.read()
    assert own.uid is not None
    assert not own.deleted()  # a rolling update, a drain

    pyabouts_cluster.kubectl("delete", "-f", "-", input=daemonset)
    assert own.deleted()

    pyabouts_cluster.kubectl("apply", "-f", "-", input=daemonset)  # another one of that name
    assert own.deleted()
    again = OwnDaemonSet(NAME, environ, account)
    again.read()
    assert again.uid not in (None, own.uid) and not again.deleted()


def test_a_daemonset_it_cannot_read_at_start_gives_nothing_to_uninstall_by(
    pod_environment: tuple[dict[str, str], Path],
) -> None:
    environ, account = pod_environment
    # Renamed by an overlay: the Role still names the old name, so the read is forbidden, for
    # good; and one that is not there is not found.
    for name in ("prod-pyabouts-agent", NAME):
        renamed = OwnDaemonSet(name, environ, account)
        renamed.read()
        assert renamed.answered and renamed.uid is None and not renamed.deleted()
    # An API out of reach when the pod starts is asked again: it is known once it answers.
    reachable_later = dict({**environ, "KUBERNETES_SERVICE_PORT": "1"})
    own = OwnDaemonSet(NAME, reachable_later, account)
    own.read()
    assert not own.answered and own.uid is None
    reachable_later.update(environ)
    own.read()
    assert own.answered


def start_installer(
    environ: dict[str, str], account: Path, node: Path, interval: float
) -> subprocess.Popen[str]:
    """The DaemonSet's sidecar (`pyabouts-install --keep-current`) on a node whose /opt/cni/bin
    and pyabouts.d are under `node`; once it has installed the plugin and written the files."""
    argv = [
        str(Path(sys.executable).parent / "pyabouts-install"),
        *("--shim", str(built_shim()), "--cni-bin-dir", str(node / "bin")),
        *("--node-config-dir", str(node / "pyabouts.d"), "--keep-current"),
        *("--uninstall-with", NAME, "--service-account-dir", str(account)),
        *("--interval", str(interval)),
    ]
    installer = subprocess.Popen(
        argv, env={**os.environ, **environ}, stdout=subprocess.PIPE, text=True
    )
    assert installer.stdout is not None
    for line in installer.stdout:
        if line.startswith("wrote "):
            return installer
    raise AssertionError(f"the installer stopped: {installer.wait()}")


def stopped(installer: subprocess.Popen[str]) -> str:
    """SIGTERM, as the kubelet stops the sidecar; what it printed then."""
    installer.send_signal(signal.SIGTERM)
    out, _ = installer.communicate(timeout=30)
    return out


@pytest.fixture
def daemonset(pyabouts_cluster: ControlPlane, pod_environment: tuple[dict[str, str], Path]) -> str:
    """deploy/'s DaemonSet in the test's namespace, as its manifest."""
    manifest = DAEMONSET.format(
        NAMESPACE=pod_environment[1].joinpath("namespace").read_text(), NAME=NAME
    )
    pyabouts_cluster.kubectl("apply", "-f", "-", input=manifest)
    return manifest


def test_a_sidecar_replaced_before_it_stopped_leaves_its_replacements_plugin_and_files(
    pyabouts_cluster: ControlPlane,
    pod_environment: tuple[dict[str, str], Path],
    daemonset: str,
    tmp_path: Path,
) -> None:
    """A force-deleted agent pod stops after its replacement started: its token, bound to the
    pod, is refused (401), which reads as its DaemonSet deleted (as the ServiceAccount of an
    uninstalled one is gone). It removed the plugin and the node's files, and nothing put the
    plugin back: every ADD and DEL on the node failed. (Here the DaemonSet is deleted, which
    reads the same.)"""
    environ, account = pod_environment
    node = tmp_path / "node"
    old = start_installer(environ, account, node, interval=0.2)
    replacement_account = tmp_path / "replacement"
    shutil.copytree(account, replacement_account)
    namespace = account.joinpath("namespace").read_text()
    token = pyabouts_cluster.service_account_token(namespace, "agent")  # a token of its own
    replacement_account.joinpath("token").write_text(token)
    replacement = start_installer(environ, replacement_account, node, interval=60)
    try:
        time.sleep(1)  # the old one's ticks meanwhile leave the replacement's files be
        pyabouts_cluster.kubectl("delete", "-f", "-", input=daemonset)
        said = stopped(old)
        assert "another installer's now: left to it" in said, said
        assert "another installer's now (the pod" in said and "removed" not in said, said
        assert {p.name for p in node.joinpath("pyabouts.d").iterdir()} == {
            "pyabouts.conf",
            "pyabouts.kubeconfig",
        }
        assert node.joinpath("bin", "pyabouts").is_file()
        # The one whose files they are uninstalls.
        assert "removed" in stopped(replacement)
        assert not node.joinpath("bin", "pyabouts").exists()
    finally:
        for installer in (old, replacement):
            installer.kill()
            installer.wait()


def test_a_sidecar_puts_back_the_plugin_it_finds_gone(
    pod_environment: tuple[dict[str, str], Path], daemonset: str, tmp_path: Path
) -> None:
    environ, account = pod_environment
    node = tmp_path / "node"
    installer = start_installer(environ, account, node, interval=0.2)
    try:
        plugin = node / "bin" / "pyabouts"
        installed = plugin.read_bytes()
        plugin.unlink()  # as the pod it replaced removed it, say
        deadline = time.monotonic() + 10
        while not plugin.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert plugin.read_bytes() == installed and os.access(plugin, os.X_OK)
    finally:
        installer.kill()
        installer.wait()
