"""whereabouts v0.9.4 as `deploy/local/build_binaries.sh whereabouts` builds it: where its
binaries are, and installing its CRDs and RBAC on a control plane, as its own manifests do
(the benchmark races it; the migration tests migrate what it allocated)."""

from __future__ import annotations

from pathlib import Path

from deploy.local.controlplane import ControlPlane, cache_dir

VERSION = "v0.9.4"
BINARY = cache_dir() / "bin" / f"whereabouts-{VERSION}"
NODE_SLICE_CONTROLLER = cache_dir() / "bin" / f"whereabouts-node-slice-controller-{VERSION}"
GROUP = "whereabouts.cni.cncf.io"
NAMESPACE = "kube-system"  # of its ServiceAccount, and where its pools live
SERVICE_ACCOUNT = "whereabouts"
CRDS = ("ippools", "overlappingrangeipreservations", "nodeslicepools")


def install_whereabouts(control_plane: ControlPlane, binary: Path = BINARY) -> Path:
    """Apply the CRDs and RBAC that build_binaries.sh extracted beside `binary`; the kubeconfig
    of its ServiceAccount, as a node would have."""
    manifests = binary.with_name(f"{binary.name}-install.yaml")
    if not manifests.is_file():
        raise RuntimeError(
            f"{manifests} is missing: bash deploy/local/build_binaries.sh whereabouts"
        )
    control_plane.kubectl("apply", "-f", str(manifests))
    for crd in CRDS:
        control_plane.kubectl(
            "wait", "--for=condition=Established", f"crd/{crd}.{GROUP}", "--timeout=60s"
        )
    return control_plane.service_account_kubeconfig(NAMESPACE, SERVICE_ACCOUNT)
