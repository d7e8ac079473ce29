"""An etcd store larger than grpc's default 4 MiB answer is still read whole: the reconciler's
pass reads every block at once, and a pool of many full blocks is read whole by the agent."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from pyabouts.ipam.pool import BLOCK_SIZE, Block, BlockKey, Owner, PoolId
from pyabouts.ipam.stores.etcd import TXN_BLOCKS, EtcdStore, pool_prefix
from tests.integration.etcd_fixtures import EtcdServer, _etcdctl
from tests.integration.stored_state import etcd_store

pytestmark = pytest.mark.integration

BLOCKS = 90  # of 256 owners as kubelet names them: over 5 MiB in all


@pytest.fixture
def store(etcd_server: EtcdServer) -> Iterator[EtcdStore]:
    store = etcd_store(etcd_server)
    yield store
    store.close()


def full_block(pool: PoolId, index: int) -> Block:
    key = BlockKey.of(pool, (10 << 24) + index * BLOCK_SIZE)
    owners = {
        key.base + offset: Owner(
            container_id=uuid.uuid4().hex + uuid.uuid4().hex,  # 64 hex digits, as containerd's
            ifname="net1",
            pod=f"tenant-{index:03d}-namespace/deployment-name-{uuid.uuid4().hex[:10]}-{offset:05d}",
            pod_uid=str(uuid.uuid4()),
            node=f"worker-node-{index:03d}.region.example.internal",
            cni_network="macvlan-conf",
            allocated_at=1_700_000_000 + offset,
        )
        for offset in range(BLOCK_SIZE)
    }
    return Block(key, owners)


def test_a_store_larger_than_four_mib_is_read_whole(
    store: EtcdStore, etcd_server: EtcdServer
) -> None:
    pool = PoolId(f"large-{uuid.uuid4().hex[:8]}", 4)
    written = [full_block(pool, i) for i in range(BLOCKS)]
    try:
        for block in written:
            assert store.write_blocks([block]).conflicts == []
        everything = [b for b in store.read_all_blocks() if b.key.pool == pool]
        span = store.read_blocks(pool, written[0].key.base, written[-1].key.base)
        for read in (everything, span):
            assert sorted(b.key.base for b in read) == [b.key.base for b in written]
            assert sum(len(b.entries) for b in read) == BLOCKS * BLOCK_SIZE
    finally:
        _etcdctl(etcd_server, "del", "--prefix", pool_prefix(pool))


def test_a_write_of_more_blocks_than_one_transaction_takes_goes_in_parts(
    store: EtcdStore, etcd_server: EtcdServer
) -> None:
    """etcd refuses a transaction of over 128 operations of a kind (a migration's, a reconcile
    pass's over a large pool): such a write goes in parts of TXN_BLOCKS, in order, until one
    conflicts, as the Kubernetes store stops at its first conflict."""
    pool = PoolId(f"parts-{uuid.uuid4().hex[:8]}", 4)
    keys = [BlockKey.of(pool, (11 << 24) + i * BLOCK_SIZE) for i in range(150)]
    try:
        first = store.write_blocks(
            [Block(k, {k.base + 1: Owner(f"a{k.base}", "net1")}) for k in keys]
        )
        assert first.conflicts == [] and set(first.revisions) == set(keys)
        assert len(store.read_blocks(pool, keys[0].base, keys[-1].base)) == len(keys)

        def second_owner(key: BlockKey) -> Block:
            entries = {key.base + 1: Owner(f"a{key.base}", "net1"), key.base + 2: Owner("b", "x")}
            return Block(key, entries, first.revisions[key])

        [taken] = [keys[70]]  # somebody else writes one block of the third part first
        assert store.write_blocks([second_owner(taken)]).conflicts == []
        second = store.write_blocks([second_owner(k) for k in keys])
        assert second.conflicts == [taken]
        assert set(second.revisions) == set(keys[: 2 * TXN_BLOCKS])  # the parts before it
        stored = {
            b.key: len(b.entries) for b in store.read_blocks(pool, keys[0].base, keys[-1].base)
        }
        # The first two parts, and the block the other writer stored; nothing of the rest.
        assert [stored[k] for k in keys] == [2] * 64 + [1] * 6 + [2] + [1] * 79
    finally:
        _etcdctl(etcd_server, "del", "--prefix", pool_prefix(pool))
