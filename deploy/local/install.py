"""Install pyabouts into a cluster the way a user does: `kubectl apply -k deploy/`.

On the local cluster (deploy/local/cluster.py) the install is deploy/ with the image built here
(``localhost/pyabouts:<version>``): a kustomize overlay written into the cluster's state
directory, since kustomize refuses an overlay inside its base and wants a relative path to it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from deploy.local.cluster import down, up
from deploy.local.controlplane import ControlPlane
from deploy.local.node_network import CNI_BIN_DIR, CNI_CONF_DIR
from deploy.local.project_image import PROJECT_REPOSITORY, project_version

REPO = Path(__file__).resolve().parents[2]
CRD = "crd/ippools.pyabouts.io"
NAMESPACE = "kube-system"
AGENT = "daemonset/pyabouts-agent"
RECONCILER = "deployment/pyabouts-reconciler"
ROLLOUT_TIMEOUT = "180s"
PLUGIN = CNI_BIN_DIR / "pyabouts"
NODE_CONFIG = CNI_CONF_DIR / "pyabouts.d"


def install_pyabouts(control_plane: ControlPlane) -> None:
    """Apply the CRDs and RBAC of deploy/, and wait until the IPPool CRD is served."""
    control_plane.kubectl("apply", "-k", str(REPO / "deploy"))
    control_plane.kubectl("wait", "--for=condition=Established", CRD, "--timeout=60s")


def local_overlay(directory: Path, tag: str | None = None) -> Path:
    """`directory`, holding a kustomization of deploy/ with the image ``localhost/pyabouts:<tag>``
    (default: the package's version)."""
    directory.mkdir(parents=True, exist_ok=True)
    base = os.path.relpath(REPO / "deploy", directory)
    image = (
        f"{{name: pyabouts, newName: {PROJECT_REPOSITORY}, newTag: '{tag or project_version()}'}}"
    )
    (directory / "kustomization.yaml").write_text(
        "# Written by deploy/local/install.py: deploy/ with the image built here.\n"
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources:\n  - {base}\n"
        "images:\n"
        f"  - {image}\n"
    )
    return directory


def install_on_cluster(control_plane: ControlPlane, overlay: Path) -> None:
    """`kubectl apply -k overlay`, then wait until the agent runs on every node and the
    reconciler's replicas are available."""
    control_plane.kubectl("apply", "-k", str(overlay))
    control_plane.kubectl("wait", "--for=condition=Established", CRD, "--timeout=60s")
    for workload in (AGENT, RECONCILER):
        control_plane.kubectl(
            "rollout", "status", workload, "-n", NAMESPACE, f"--timeout={ROLLOUT_TIMEOUT}"
        )


def uninstall_from_cluster(control_plane: ControlPlane, overlay: Path) -> None:
    """`kubectl delete -k overlay`; once the agent's pod is gone (its sidecar removes what it
    wrote on the node), whatever is still there is removed with `pyabouts-install --uninstall`,
    as the README tells users to when the sidecar could not."""
    control_plane.kubectl_run("delete", "-k", str(overlay), "--wait=true", "--timeout=120s")
    control_plane.kubectl_run(  # (an error when there was no pod to wait for)
        *("wait", "--for=delete", "pod", "-n", NAMESPACE, "--timeout=120s"),
        "-l=app.kubernetes.io/name=pyabouts-agent",
    )
    uninstall = [f"--cni-bin-dir={CNI_BIN_DIR}", f"--node-config-dir={NODE_CONFIG}", "--uninstall"]
    subprocess.run(
        [sys.executable, "-m", "pyabouts.plugin.install", *uninstall],
        check=True,
        capture_output=True,
    )


@contextlib.contextmanager
def cluster_with_pyabouts(state_dir: Path) -> Iterator[ControlPlane]:
    """The local cluster up in `state_dir` and pyabouts installed (its overlay in
    `state_dir`/install); afterwards uninstalled and the cluster down."""
    running = up(state_dir)
    assert running.control_plane is not None
    control_plane = running.control_plane
    overlay = install_overlay(state_dir)
    try:
        install_on_cluster(control_plane, overlay)
        yield control_plane
    finally:
        uninstall_from_cluster(control_plane, overlay)
        down(state_dir)


def install_overlay(state_dir: Path) -> Path:
    """The overlay cluster_with_pyabouts installs from, in the cluster's state directory."""
    return local_overlay(state_dir / "install")
