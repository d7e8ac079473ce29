"""An etcd store larger than grpc's default 4 MiB answer is still read whole: the reconciler's
pass reads every block at once, and a pool of many full blocks is read whole by the agent."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from pyabouts.ipam.pool import BLOCK_SIZE, Block, BlockKey, Owner, PoolId
from pyabouts.ipam.stores.etcd import EtcdStore, pool_prefix
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
