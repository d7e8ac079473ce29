"""Multus on the local cluster as its users install it: its own DaemonSet manifest, thin or
thick, applied with kubectl, with only the image names changed.

The image, ``localhost/multus-cni:<version>``, holds what upstream's images hold for both
DaemonSets: for the thin one the ``multus`` and ``passthru`` plugins, ``/thin_entrypoint`` and
``/install_multus``; for the thick one ``multus-daemon`` (which runs every delegate, chrooted
into the host's root, inside its own container and its 50Mi/100m limits) and ``multus-shim``
(the node's plugin, which hands calls to the daemon). All built from the Multus Go module by
build_binaries.sh; static but for the ``multus`` plugin, which runs on the host. The manifests
are the module's ``deployments/multus-daemonset.yml`` and ``multus-daemonset-thick.yml``,
copied unchanged next to the binaries; the overlay that renames the image is written into the
cluster's state directory (upstream files are never part of the repo).

Multus' DaemonSet leaves on the node what it wrote there (its config, its kubeconfig, its
plugins): :func:`uninstall_multus` deletes the DaemonSet and then those. A run killed before its
uninstall leaves them to every later cluster of the host, whose pods would then all go through
a Multus that no longer runs: the cluster's ``up`` and ``down`` remove them
(:func:`remove_multus_leftovers`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.local.commands import LocalToolError
from deploy.local.container_images import cached_archive, docker_archive
from deploy.local.controlplane import ControlPlane
from deploy.local.node_network import CNI_BIN_DIR, CNI_CONF_DIR
from deploy.local.pod_runtime import CACHE_BIN, MULTUS_BINARY, MULTUS_VERSION

UPSTREAM_IMAGE = "ghcr.io/k8snetworkplumbingwg/multus-cni"
MULTUS_IMAGE = f"localhost/multus-cni:{MULTUS_VERSION}"
LICENSE = CACHE_BIN / f"multus-{MULTUS_VERSION}-LICENSE"
DAEMONSET = "daemonset/kube-multus-ds"
NAMESPACE = "kube-system"
CONFIG_TIMEOUT_S = 30.0
#: Part of the image archive's key: bump it when what multus_archive puts in changes.
IMAGE_RECIPE = b"thin and thick binaries, root in /etc/passwd and /etc/group, /var/run"
#: Where both keep each sandbox's delegates until their DEL (Multus' CNIDir).
MULTUS_CACHE = Path("/var/lib/cni/multus")


@dataclass(frozen=True)
class MultusMode:
    """One of Multus' two DaemonSets: its manifest, the config it writes on the node (from then
    on kubelet's CNI calls go through Multus) and what it leaves there when deleted."""

    name: str
    manifest: Path
    config: Path
    left_on_the_node: tuple[Path, ...]


THIN = MultusMode(
    "thin",
    CACHE_BIN / f"multus-{MULTUS_VERSION}-daemonset.yml",
    CNI_CONF_DIR / "00-multus.conflist",  # its installer writes one for a cniVersion 1.0.0 network
    (CNI_CONF_DIR / "multus.d", CNI_BIN_DIR / "multus", CNI_BIN_DIR / "passthru", MULTUS_CACHE),
)
THICK = MultusMode(
    "thick",
    CACHE_BIN / f"multus-{MULTUS_VERSION}-daemonset-thick.yml",
    CNI_CONF_DIR / "00-multus.conf",
    (
        CNI_BIN_DIR / "multus-shim",
        CNI_BIN_DIR / "passthru",  # its installer copies it in thick mode too
        MULTUS_CACHE,
        Path("/run/multus"),  # the daemon's socket
        Path("/etc/cni/multus"),  # its hostPath volumes, made by the runtime
        Path("/run/k8s.cni.cncf.io"),
    ),
)


def multus_archive() -> Path:
    """The Multus image's archive, made again only when a binary or the license changed."""
    binaries = {
        "multus": MULTUS_BINARY,
        "thin_entrypoint": CACHE_BIN / f"multus-thin_entrypoint-{MULTUS_VERSION}",
        "install_multus": CACHE_BIN / f"multus-install_multus-{MULTUS_VERSION}",
        "passthru": CACHE_BIN / f"multus-passthru-cni-{MULTUS_VERSION}",
        "multus-daemon": CACHE_BIN / f"multus-multus-daemon-{MULTUS_VERSION}",
        "multus-shim": CACHE_BIN / f"multus-multus-shim-{MULTUS_VERSION}",
    }
    contents = {name: path.read_bytes() for name, path in binaries.items()}
    license_text = LICENSE.read_bytes()

    def make() -> bytes:
        files = {f"usr/src/multus-cni/bin/{n}": (c, 0o755) for n, c in contents.items()}
        files["usr/src/multus-cni/LICENSE"] = (license_text, 0o644)
        files["thin_entrypoint"] = (contents["thin_entrypoint"], 0o755)
        files["install_multus"] = (contents["install_multus"], 0o755)
        # multus-daemon checks that it runs as root by name (os/user reads /etc/passwd): what
        # upstream's Debian-based image has and these images need.
        files["etc/passwd"] = (b"root:x:0:0:root:/root:/sbin/nologin\n", 0o644)
        files["etc/group"] = (b"root:x:0:\n", 0o644)
        dirs = {
            d: 0o755
            for d in ("etc", "usr", "usr/src", "usr/src/multus-cni", "usr/src/multus-cni/bin")
        }
        # The thick daemon opens the pods' network namespaces by the paths kubelet names,
        # /var/run/netns/..., with the host's /run/netns mounted at /run/netns.
        return docker_archive(
            MULTUS_IMAGE,
            files,
            ["/thin_entrypoint"],
            links={"var/run": "../run"},
            dirs={**dirs, "tmp": 0o1777, "var": 0o755, "run": 0o755},
        )

    inputs = [*contents.values(), license_text, IMAGE_RECIPE]
    return cached_archive(f"multus-cni-{MULTUS_VERSION}", inputs, make)


def multus_overlay(directory: Path, mode: MultusMode = THIN) -> Path:
    """`directory`, holding the upstream manifest of `mode` and a kustomization renaming its
    image."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mode.manifest, directory / mode.manifest.name)
    name, tag = MULTUS_IMAGE.rsplit(":", 1)
    (directory / "kustomization.yaml").write_text(
        "# Written by deploy/local/multus_install.py: Multus' own manifest, the image built here.\n"
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources:\n  - {mode.manifest.name}\n"
        f"images:\n  - {{name: {UPSTREAM_IMAGE}, newName: {name}, newTag: '{tag}'}}\n"
    )
    return directory


def install_multus(control_plane: ControlPlane, overlay: Path, mode: MultusMode = THIN) -> None:
    """`kubectl apply -k overlay`; returns once Multus runs on the node and has written its
    config."""
    control_plane.kubectl("apply", "-k", str(overlay))
    control_plane.kubectl("rollout", "status", DAEMONSET, "-n", NAMESPACE, "--timeout=180s")
    deadline = time.monotonic() + CONFIG_TIMEOUT_S
    while not mode.config.is_file():
        if time.monotonic() > deadline:
            raise LocalToolError(f"Multus runs but wrote no {mode.config}")
        time.sleep(0.2)


def uninstall_multus(control_plane: ControlPlane, overlay: Path, mode: MultusMode = THIN) -> None:
    """Delete the DaemonSet (and its CRD, RBAC, ConfigMap), then what it left on the node."""
    control_plane.kubectl("delete", "-k", str(overlay), "--wait=true", "--timeout=120s")
    # (an error when no pod is left to wait for)
    control_plane.kubectl_run(
        "wait", "--for=delete", "pod", "-n", NAMESPACE, "-l", "app=multus", "--timeout=60s"
    )
    _remove(_left_by(mode))


def multus_leftovers() -> list[Path]:
    """What either DaemonSet left on the node and is still there."""
    left = {*_left_by(THIN), *_left_by(THICK)}
    return sorted(path for path in left if path.exists() or path.is_symlink())


def remove_multus_leftovers() -> None:
    """Remove what either DaemonSet left on the node: for a host whose Multus is gone."""
    _remove(multus_leftovers())


def _left_by(mode: MultusMode) -> list[Path]:
    """What `mode`'s DaemonSet leaves on the node, and the temporary copies its installer
    leaves when a copy fails."""
    return [
        mode.config,
        *mode.left_on_the_node,
        *CNI_BIN_DIR.glob("multus*.temp*"),
        *CNI_BIN_DIR.glob("passthru.temp*"),
    ]


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
