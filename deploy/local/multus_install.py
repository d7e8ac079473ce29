"""Multus on the local cluster as its users install it: its own DaemonSet manifest, applied with
kubectl, with only the image names changed.

The image, ``localhost/multus-cni:<version>``, holds what upstream's image holds for the thin
DaemonSet (the ``multus`` and ``passthru`` plugins, ``/thin_entrypoint``, ``/install_multus``),
built from the Multus Go module by build_binaries.sh; the binaries are static but for the
``multus`` plugin, which runs on the host. The manifest is the module's
``deployments/multus-daemonset.yml``, copied unchanged next to the binaries; the overlay that
renames its image is written into the cluster's state directory (upstream files are never part
of the repo).

Multus' DaemonSet leaves on the node what it wrote there (its config, its kubeconfig, its
plugins): :func:`uninstall_multus` deletes the DaemonSet and then those.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from deploy.local.commands import LocalToolError
from deploy.local.container_images import cached_archive, docker_archive
from deploy.local.controlplane import ControlPlane
from deploy.local.node_network import CNI_BIN_DIR, CNI_CONF_DIR
from deploy.local.pod_runtime import CACHE_BIN, MULTUS_BINARY, MULTUS_VERSION

UPSTREAM_IMAGE = "ghcr.io/k8snetworkplumbingwg/multus-cni"
MULTUS_IMAGE = f"localhost/multus-cni:{MULTUS_VERSION}"
THIN_MANIFEST = CACHE_BIN / f"multus-{MULTUS_VERSION}-daemonset.yml"
LICENSE = CACHE_BIN / f"multus-{MULTUS_VERSION}-LICENSE"
DAEMONSET = "daemonset/kube-multus-ds"
NAMESPACE = "kube-system"
#: What the thin DaemonSet writes on the node and leaves there when it is deleted.
#: Its entrypoint writes this (a conflist, as the cluster's own network is one).
MULTUS_CONFIG = CNI_CONF_DIR / "00-multus.conflist"
CONFIG_TIMEOUT_S = 30.0
LEFT_ON_THE_NODE = (
    MULTUS_CONFIG,
    CNI_CONF_DIR / "multus.d",
    CNI_BIN_DIR / "multus",
    CNI_BIN_DIR / "passthru",
    Path("/var/lib/cni/multus"),
)


def multus_archive() -> Path:
    """The Multus image's archive, made again only when a binary or the license changed."""
    binaries = {
        "multus": MULTUS_BINARY,
        "thin_entrypoint": CACHE_BIN / f"multus-thin_entrypoint-{MULTUS_VERSION}",
        "install_multus": CACHE_BIN / f"multus-install_multus-{MULTUS_VERSION}",
        "passthru": CACHE_BIN / f"multus-passthru-cni-{MULTUS_VERSION}",
    }
    contents = {name: path.read_bytes() for name, path in binaries.items()}
    license_text = LICENSE.read_bytes()

    def make() -> bytes:
        files = {f"usr/src/multus-cni/bin/{n}": (c, 0o755) for n, c in contents.items()}
        files["usr/src/multus-cni/LICENSE"] = (license_text, 0o644)
        files["thin_entrypoint"] = (contents["thin_entrypoint"], 0o755)
        files["install_multus"] = (contents["install_multus"], 0o755)
        dirs = {
            d: 0o755 for d in ("usr", "usr/src", "usr/src/multus-cni", "usr/src/multus-cni/bin")
        }
        return docker_archive(
            MULTUS_IMAGE, files, ["/thin_entrypoint"], dirs={**dirs, "tmp": 0o1777}
        )

    return cached_archive(f"multus-cni-{MULTUS_VERSION}", [*contents.values(), license_text], make)


def multus_overlay(directory: Path) -> Path:
    """`directory`, holding the upstream thin manifest and a kustomization renaming its image."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(THIN_MANIFEST, directory / "multus-daemonset.yml")
    name, tag = MULTUS_IMAGE.rsplit(":", 1)
    (directory / "kustomization.yaml").write_text(
        "# Written by deploy/local/multus_install.py: Multus' own manifest, the image built here.\n"
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        "resources:\n  - multus-daemonset.yml\n"
        f"images:\n  - {{name: {UPSTREAM_IMAGE}, newName: {name}, newTag: '{tag}'}}\n"
    )
    return directory


def install_multus(control_plane: ControlPlane, overlay: Path) -> None:
    """`kubectl apply -k overlay`; returns once Multus runs on the node and has written its
    config (from then on kubelet's CNI calls go through it)."""
    control_plane.kubectl("apply", "-k", str(overlay))
    control_plane.kubectl("rollout", "status", DAEMONSET, "-n", NAMESPACE, "--timeout=180s")
    deadline = time.monotonic() + CONFIG_TIMEOUT_S
    while not MULTUS_CONFIG.is_file():
        if time.monotonic() > deadline:
            raise LocalToolError(f"Multus runs but wrote no {MULTUS_CONFIG}")
        time.sleep(0.2)


def uninstall_multus(control_plane: ControlPlane, overlay: Path) -> None:
    """Delete the DaemonSet (and its CRD, RBAC, ConfigMap), then what it left on the node."""
    control_plane.kubectl("delete", "-k", str(overlay), "--wait=true", "--timeout=120s")
    # (an error when no pod is left to wait for)
    control_plane.kubectl_run(
        "wait", "--for=delete", "pod", "-n", NAMESPACE, "-l", "app=multus", "--timeout=60s"
    )
    # (and the temporary copies its installer leaves when a copy fails)
    for path in [
        *LEFT_ON_THE_NODE,
        *CNI_BIN_DIR.glob("multus.temp*"),
        *CNI_BIN_DIR.glob("passthru.temp*"),
    ]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
