"""What the modules that need kubelet share: the local cluster with pyabouts installed
(deploy.local.install.cluster_with_pyabouts) is brought up, then uninstalled and taken down, by
one module at a time (it is the whole host's: kubelet's places are fixed; those modules run in
the "processes" group, never beside another cluster)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deploy.local.controlplane import ControlPlane

#: The marks of a module that uses it: the whole host's cluster, never beside the heavy bursts.
CLUSTER_MODULE_MARKS = [
    pytest.mark.integration,
    pytest.mark.xdist_group("processes"),
    pytest.mark.timeout(900),
]


def kube_json(cluster: ControlPlane, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json"))
