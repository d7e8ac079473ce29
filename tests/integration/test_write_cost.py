"""The write-cost benchmark (bench/write_cost.py) on the real apiserver: each row is that many
stored updates (every one answered with a new resourceVersion, else the run stops), pyabouts'
through its own store, and it leaves nothing behind."""

import pytest

from bench.kube import KubeCluster
from bench.write_cost import (
    EARLIER_GROUP,
    EARLIER_PLURAL,
    NAMESPACE,
    SHAPES,
    WATCHED_ENTRIES,
    measure_all,
)
from deploy.local.controlplane import ControlPlane
from pyabouts.ipam.stores.kube_api import KubeApi
from pyabouts.ipam.stores.kubeconfig import read_kubeconfig
from pyabouts.ipam.stores.kubernetes import GROUP, ippools_path

pytestmark = pytest.mark.integration

WRITES = 20  # enough for the Lease row to show on the CPU clock (10 ms ticks)
ROUNDS = 2
WATCHERS = 2


def test_each_row_is_that_many_stored_updates_per_round_and_nothing_is_left(
    pyabouts_cluster: ControlPlane,
) -> None:
    cluster = KubeCluster(pyabouts_cluster, pyabouts_cluster.kubeconfig)
    groups = (GROUP, EARLIER_GROUP)  # pyabouts' IPPools, and those of its earlier CRD
    before = cluster.group_requests(*groups)
    rows = measure_all(pyabouts_cluster, [0, 3], WRITES, ROUNDS, watchers=[WATCHERS])
    requests = cluster.group_requests(*groups) - before

    assert [(r.shape, r.entries, r.rounds, r.watchers) for r in rows] == [
        ("lease", 0, ROUNDS, 0),
        *((shape, size, ROUNDS, 0) for size in (0, 3) for shape in SHAPES),
        (SHAPES[0], WATCHED_ENTRIES, ROUNDS, WATCHERS),  # pyabouts' block, watched
    ]
    # The watched row's watchers, as many per round, each listing before it watches.
    assert requests["LIST 200"] == WATCHERS * ROUNDS
    # Per round, each IPPool row is one create, WRITES updates, one delete; and once more for
    # the uncounted warm-up's block. pyabouts' own rows go through KubernetesStore.write_blocks.
    objects = (len(rows) - 1) * ROUNDS + 1  # all rows but the Lease's, and the warm-up
    assert requests["POST 201"] == objects
    assert requests["PUT 200"] == WRITES * objects
    assert requests["DELETE 200"] == objects
    assert sum(n for key, n in requests.items() if not key.endswith(("200", "201"))) == 0

    for row in rows:
        assert row.wall_ms > 0 and row.cpu_ms_min <= row.apiserver_ms + row.etcd_ms
        assert row.apiserver_ms + row.etcd_ms <= row.cpu_ms_max
        # Only pyabouts' rows time the agent's encoding of the block.
        assert (row.encode_ms is not None) == (row.shape == SHAPES[0])
    sizes = {(r.shape, r.entries): r.spec_bytes for r in rows[1:]}
    assert all(sizes[(shape, 3)] > sizes[(shape, 0)] for shape in SHAPES)
    assert rows[0].ratio_to_lease == 1.0 and all(r.ratio_to_lease for r in rows)

    api = KubeApi(read_kubeconfig(str(pyabouts_cluster.kubeconfig)), timeout=10)
    try:
        left = api.request("GET", ippools_path(NAMESPACE))
    finally:
        api.close()
    assert left["items"] == []
    earlier_crd = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{EARLIER_PLURAL}"
    assert pyabouts_cluster.request("GET", f"{earlier_crd}.{EARLIER_GROUP}")[0] == 404
