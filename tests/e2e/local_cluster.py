"""The local cluster (deploy/local/cluster.py) with pyabouts installed by `kubectl apply -k`, for
the tests that need kubelet: brought up, then uninstalled and taken down, by one module at a
time (it is the whole host's: kubelet's places are fixed; those modules run in the "processes"
group, never beside another cluster)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy.local.cluster import down, up
from deploy.local.controlplane import ControlPlane
from deploy.local.install import install_on_cluster, local_overlay, uninstall_from_cluster

#: The marks of a module that uses it: the whole host's cluster, never beside the heavy bursts.
CLUSTER_MODULE_MARKS = [
    pytest.mark.integration,
    pytest.mark.xdist_group("processes"),
    pytest.mark.timeout(900),
]


@contextlib.contextmanager
def cluster_with_pyabouts(state_dir: Path) -> Iterator[ControlPlane]:
    """The cluster up in `state_dir` and pyabouts installed (its overlay in
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
    return local_overlay(state_dir / "install")


def kube_json(cluster: ControlPlane, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json"))
