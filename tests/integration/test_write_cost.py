"""The write-cost benchmark (bench/write_cost.py) on the real apiserver: each row is that many
stored updates, pyabouts' through its own store, and it leaves nothing behind."""

import pytest

from bench.kube import KubeCluster
from bench.write_cost import NAMESPACE, SHAPES, measure_all
from deploy.local.controlplane import ControlPlane
from pyabouts.ipam.stores.kube_api import KubeApi
from pyabouts.ipam.stores.kubeconfig import read_kubeconfig

pytestmark = pytest.mark.integration

WRITES = 20  # enough for the Lease row to show on the CPU clock (10 ms ticks)


def test_each_row_is_that_many_stored_updates_and_nothing_is_left(
    pyabouts_cluster: ControlPlane,
) -> None:
    cluster = KubeCluster(pyabouts_cluster, pyabouts_cluster.kubeconfig)
    before = cluster.group_requests()
    rows = measure_all(pyabouts_cluster, [0, 3], WRITES)
    requests = cluster.group_requests() - before

    assert [(r.shape, r.entries) for r in rows] == [
        ("lease", 0),
        *((shape, size) for size in (0, 3) for shape in SHAPES),
    ]
    ippool_rows = len(rows) - 1 + 1  # and the uncounted warm-up's block
    # Each IPPool row: one create, WRITES updates that were all stored (200, none refused), one
    # delete. pyabouts' own rows go through KubernetesStore.write_blocks.
    assert requests["POST 201"] == ippool_rows
    assert requests["PUT 200"] == WRITES * ippool_rows
    assert requests["DELETE 200"] == ippool_rows
    assert sum(n for key, n in requests.items() if not key.endswith(("200", "201"))) == 0

    lease = rows[0]
    assert lease.ratio_to_lease == 1.0
    for row in rows:
        assert row.writes == WRITES and row.apiserver_ms >= 0 and row.wall_ms > 0
        own_cpu = row.apiserver_ms + row.etcd_ms
        assert row.ratio_to_lease == pytest.approx(own_cpu / (lease.apiserver_ms + lease.etcd_ms))
    sizes = {(r.shape, r.entries): r.spec_bytes for r in rows[1:]}
    assert all(sizes[(shape, 3)] > sizes[(shape, 0)] for shape in SHAPES)

    api = KubeApi(read_kubeconfig(str(pyabouts_cluster.kubeconfig)), timeout=10)
    try:
        left = api.request("GET", f"/apis/pyabouts.io/v1alpha1/namespaces/{NAMESPACE}/ippools")
    finally:
        api.close()
    assert left["items"] == []
