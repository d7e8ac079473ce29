"""Install pyabouts into a cluster the way a user does: `kubectl apply -k deploy/`."""

from __future__ import annotations

from pathlib import Path

from deploy.local.controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[2]
CRD = "crd/ippools.pyabouts.io"


def install_pyabouts(control_plane: ControlPlane) -> None:
    """Apply the CRDs and RBAC of deploy/, and wait until the IPPool CRD is served."""
    control_plane.kubectl("apply", "-k", str(REPO / "deploy"))
    control_plane.kubectl("wait", "--for=condition=Established", CRD, "--timeout=60s")
