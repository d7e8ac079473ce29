"""End-to-end fixtures: the local apiserver with pyabouts and the NAD CRD installed, and a node
that runs pods through the real Multus thin plugin."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.controlplane import ControlPlane
from deploy.local.netns import macvlan_master
from deploy.local.pod_objects import create_namespace
from deploy.local.pod_runtime import Node, install_nad_crd, running_node

NAMESPACE = "e2e"


@pytest.fixture(scope="session")
def multus_cluster(pyabouts_cluster: ControlPlane) -> ControlPlane:
    install_nad_crd(pyabouts_cluster)
    create_namespace(pyabouts_cluster, NAMESPACE)
    return pyabouts_cluster


@pytest.fixture
def master() -> Iterator[str]:
    """The host interface macvlan attachments hang off (one end of a veth pair)."""
    with macvlan_master("e2e") as name:
        yield name


@pytest.fixture
def node(
    multus_cluster: ControlPlane, master: str, pyabouts_exe: str, tmp_path: Path
) -> Iterator[Node]:
    """A node; its pods are torn down (DEL through Multus) before `master` goes."""
    with running_node(multus_cluster, tmp_path / "node", pyabouts_exe) as running:
        yield running
