"""`pyabouts-reconciler` deletes the stored blocks that hold nothing, on both datastores, with
the plugin in-process and through the agent (whose cache still holds the deleted block): the
IPPool or etcd key goes, the lowest block of the pool stays, and the address is given again in
a block created anew. (tests/unit/test_empty_blocks.py has the rules; test_store_contract.py the
deletes' compare-and-swap on each store.)"""

import json

import pytest

from deploy.local.pod_objects import create_pod, delete_pod
from pyabouts.ipam.pool import PoolId
from pyabouts.ipam.stores.codec import block_cidr
from tests.integration.reconciler_env import (
    NAMESPACE,
    ReconcilerEnv,
    kubeconfig_that_may_not_delete_ippools,
    pod_name,
    reconcile_once,
    run_reconciler,
)

pytestmark = pytest.mark.integration

CIDR = "10.74.0.0/22"


def stored_blocks(recon: ReconcilerEnv) -> list[str]:
    """The CIDRs of this test's stored blocks, in order."""
    pool = PoolId(recon.network, 4)
    return [block_cidr(b.key) for b in recon.store.read_blocks(pool, 0, (1 << 32) - 1)]


def test_a_block_emptied_by_a_pass_is_deleted_by_the_next_and_made_again(
    recon: ReconcilerEnv,
) -> None:
    kept = pod_name("kept")
    recon.add(kept, create_pod(recon.cluster, NAMESPACE, kept), cidr=CIDR, ip="10.74.0.5")
    gone = pod_name("gone")
    recon.add(gone, create_pod(recon.cluster, NAMESPACE, gone), cidr=CIDR, ip="10.74.2.9")
    delete_pod(recon.cluster, NAMESPACE, gone, grace_seconds=0)
    assert stored_blocks(recon) == ["10.74.0.0/24", "10.74.2.0/24"]

    # Its snapshot saw the block holding the gone pod's address: freed, and kept this time.
    first = recon.reconcile()
    assert [a["ip"] for a in first["addresses"]] == ["10.74.2.9"]
    ours = [b for b in first["emptyBlocksDeleted"] if b["network"] == recon.network]
    assert ours == []
    assert stored_blocks(recon) == ["10.74.0.0/24", "10.74.2.0/24"]

    dry = recon.reconcile("--dry-run")
    assert {"network": recon.network, "block": "10.74.2.0/24"} in dry["emptyBlocksDeleted"]
    assert stored_blocks(recon) == ["10.74.0.0/24", "10.74.2.0/24"]

    second = recon.reconcile()
    ours = [b for b in second["emptyBlocksDeleted"] if b["network"] == recon.network]
    assert ours == [{"network": recon.network, "block": "10.74.2.0/24"}]
    assert "empty block(s) deleted" in second["summary"]
    # The lowest block stays, though it would hold nothing either once its pod goes.
    assert stored_blocks(recon) == ["10.74.0.0/24"]

    # The agent's cache, if any, still holds the block: its write is refused, and it creates
    # the block again.
    again = pod_name("again")
    uid = create_pod(recon.cluster, NAMESPACE, again)
    assert recon.add(again, uid, cidr=CIDR, ip="10.74.2.9") == "10.74.2.9"
    assert stored_blocks(recon) == ["10.74.0.0/24", "10.74.2.0/24"]
    assert recon.held()["10.74.2.9"].pod == f"{NAMESPACE}/{again}"


@pytest.mark.parametrize("recon", ["kubernetes"], indirect=True)
def test_a_reconciler_whose_role_may_not_delete_frees_what_it_should_and_says_why_it_keeps(
    recon: ReconcilerEnv,
) -> None:
    """A Role of an earlier release (no `delete`): the pass frees the leak and exits 0, and
    keeps the empty block with a warning, rather than failing every pass."""
    kept = pod_name("kept")
    recon.add(kept, create_pod(recon.cluster, NAMESPACE, kept), cidr=CIDR, ip="10.74.0.5")
    gone = pod_name("gone")
    recon.add(gone, create_pod(recon.cluster, NAMESPACE, gone), cidr=CIDR, ip="10.74.3.3")
    delete_pod(recon.cluster, NAMESPACE, gone, grace_seconds=0)
    old_role = kubeconfig_that_may_not_delete_ippools(recon.cluster)
    first = reconcile_once(recon.flat_file, old_role)  # exit 0, else it fails here
    assert "10.74.3.3" in [a["ip"] for a in first["addresses"]]
    done = run_reconciler(recon.flat_file, old_role)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["failed"] == [] and summary["emptyBlocksDeleted"] == []
    assert "needs `delete` on ippools" in done.stderr and "Forbidden" in done.stderr
    assert stored_blocks(recon) == ["10.74.0.0/24", "10.74.3.0/24"]
