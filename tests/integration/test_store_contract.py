"""The store contract, one suite for every store: the fake, real etcd (with and without TLS and
auth), and IPPool custom resources on a real kube-apiserver."""

import threading
import time
import uuid
from collections.abc import Iterator

import netaddr
import pytest

from pyabouts.ipam import operations
from pyabouts.ipam.coalescing import CoalescingTransactions
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId
from pyabouts.ipam.ranges import build_range
from pyabouts.ipam.store import BlockRemoval, PoolStore, later_revision
from pyabouts.ipam.stores.cached import CachedStore
from pyabouts.ipam.stores.etcd import EtcdStore
from pyabouts.ipam.stores.kubernetes import KubernetesStore
from pyabouts.ipam.transaction import DirectTransactions, Transactions
from tests.integration.stored_state import etcd_store, kubernetes_store
from tests.memory_store import MemoryStore

pytestmark = pytest.mark.integration


@pytest.fixture(params=["memory", "etcd", "etcd-tls-auth", "kubernetes"])
def store(request: pytest.FixtureRequest) -> Iterator[PoolStore]:
    real: EtcdStore | KubernetesStore
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "kubernetes":
        real = kubernetes_store(str(request.getfixturevalue("pyabouts_cluster").kubeconfig))
    else:
        fixture = "etcd_server" if request.param == "etcd" else "etcd_tls_auth_server"
        real = etcd_store(request.getfixturevalue(fixture))
    yield real
    real.close()


@pytest.fixture
def pool() -> PoolId:
    return PoolId(f"contract-{uuid.uuid4().hex[:8]}", 4)


def ip(text: str) -> int:
    return int(netaddr.IPAddress(text))


def block(pool: PoolId, base: str, *addresses: str, revision: str | None = None) -> Block:
    key = BlockKey.of(pool, ip(base))
    owners = {ip(a): Owner(f"c-{a}", "net1", f"ns/{a}") for a in addresses}
    return Block(key, owners, revision)


def test_a_pool_never_written_reads_empty(store: PoolStore, pool: PoolId) -> None:
    assert store.read_blocks(pool, ip("10.0.0.0"), ip("10.0.255.255")) == []


def test_a_created_block_reads_back_with_its_entries_and_a_revision(
    store: PoolStore, pool: PoolId
) -> None:
    written = block(pool, "10.0.1.0", "10.0.1.1", "10.0.1.255")
    written.entries[ip("10.0.1.7")] = Owner("bare", "eth0")  # no pod: podRef is optional
    written.range_text, written.capacity = "10.0.0.0/22", 256
    outcome = store.write_blocks([written])
    assert outcome.conflicts == []
    [read] = store.read_blocks(pool, ip("10.0.1.0"), ip("10.0.1.255"))
    assert outcome.revisions == {written.key: read.revision}
    assert read.key == written.key
    assert read.entries == written.entries
    assert (read.range_text, read.capacity) == ("10.0.0.0/22", 256)
    assert read.revision is not None


def test_creating_an_existing_block_conflicts_and_changes_nothing(
    store: PoolStore, pool: PoolId
) -> None:
    assert store.write_blocks([block(pool, "10.0.0.0", "10.0.0.1")]).conflicts == []
    loser = block(pool, "10.0.0.0", "10.0.0.2")
    assert store.write_blocks([loser]).conflicts == [loser.key]
    [read] = store.read_blocks(pool, ip("10.0.0.0"), ip("10.0.0.255"))
    assert set(read.entries) == {ip("10.0.0.1")}


def test_an_update_sticks_only_on_the_revision_it_read(store: PoolStore, pool: PoolId) -> None:
    store.write_blocks([block(pool, "10.0.0.0", "10.0.0.1")])
    [seen] = store.read_blocks(pool, ip("10.0.0.0"), ip("10.0.0.0"))
    first = block(pool, "10.0.0.0", "10.0.0.1", "10.0.0.2", revision=seen.revision)
    second = block(pool, "10.0.0.0", "10.0.0.1", "10.0.0.3", revision=seen.revision)
    assert store.write_blocks([first]).conflicts == []
    assert store.write_blocks([second]).conflicts == [second.key]
    [read] = store.read_blocks(pool, ip("10.0.0.0"), ip("10.0.0.0"))
    assert set(read.entries) == {ip("10.0.0.1"), ip("10.0.0.2")}
    assert read.revision != seen.revision


def test_a_write_of_several_blocks_reports_the_stale_one(store: PoolStore, pool: PoolId) -> None:
    store.write_blocks([block(pool, "10.0.0.0", "10.0.0.1")])
    stale = block(pool, "10.0.0.0", "10.0.0.9")  # revision None, but the block exists
    fresh = block(pool, "10.0.1.0", "10.0.1.1")
    assert store.write_blocks([fresh, stale]).conflicts == [stale.key]  # only the stale one
    [read] = store.read_blocks(pool, ip("10.0.0.0"), ip("10.0.0.255"))
    assert set(read.entries) == {ip("10.0.0.1")}


def test_a_failed_write_names_the_block_changed_since_its_read_not_the_current_one(
    store: PoolStore, pool: PoolId
) -> None:
    # A cache reads again what a failed write names: a current block named too costs a read.
    store.write_blocks([block(pool, "10.0.0.0", "10.0.0.1"), block(pool, "10.0.1.0", "10.0.1.1")])
    low, high = store.read_blocks(pool, ip("10.0.0.0"), ip("10.0.1.255"))
    changed = block(pool, "10.0.0.0", "10.0.0.2", revision=low.revision)
    assert store.write_blocks([changed]).conflicts == []  # since `low` was read
    stale = block(pool, "10.0.0.0", "10.0.0.3", revision=low.revision)
    current = block(pool, "10.0.1.0", "10.0.1.3", revision=high.revision)
    assert store.write_blocks([current, stale]).conflicts == [stale.key]


def test_no_block_after_a_stale_one_is_written(store: PoolStore, pool: PoolId) -> None:
    # Node slices rely on it: an address in a slice is never stored when the slice's registry
    # entry, written first, lost its race.
    store.write_blocks([block(pool, "10.0.0.0", "10.0.0.1")])
    stale = block(pool, "10.0.0.0", "10.0.0.9")  # revision None, but the block exists
    after = block(pool, "10.0.1.0", "10.0.1.1")
    assert store.write_blocks([stale, after]).conflicts == [stale.key]
    assert store.read_blocks(pool, ip("10.0.1.0"), ip("10.0.1.255")) == []


def test_a_block_is_deleted_only_on_the_revision_it_was_read(
    store: PoolStore, pool: PoolId
) -> None:
    assert isinstance(store, BlockRemoval)
    store.write_blocks([block(pool, "10.0.0.0")])
    [seen] = store.read_blocks(pool, ip("10.0.0.0"), ip("10.0.0.0"))
    assert store.write_blocks([block(pool, "10.0.0.0", "10.0.0.1", revision=seen.revision)])
    assert store.remove_block(seen) is False  # written since: kept
    [now] = store.read_blocks(pool, ip("10.0.0.0"), ip("10.0.0.0"))
    assert set(now.entries) == {ip("10.0.0.1")}
    assert store.remove_block(now) is True
    assert store.read_blocks(pool, ip("10.0.0.0"), ip("10.0.0.255")) == []
    assert store.remove_block(now) is False  # gone already
    assert store.remove_block(block(pool, "10.0.1.0")) is False  # never stored


def test_a_write_on_a_deleted_blocks_revision_conflicts_and_a_create_stores_it_again(
    store: PoolStore, pool: PoolId
) -> None:
    store.write_blocks([block(pool, "10.0.0.0")])
    [seen] = store.read_blocks(pool, ip("10.0.0.0"), ip("10.0.0.0"))
    assert isinstance(store, BlockRemoval) and store.remove_block(seen)
    stale = block(pool, "10.0.0.0", "10.0.0.1", revision=seen.revision)
    assert store.write_blocks([stale]).conflicts == [stale.key]
    made = store.write_blocks([block(pool, "10.0.0.0", "10.0.0.2")])
    assert made.conflicts == []
    [read] = store.read_blocks(pool, ip("10.0.0.0"), ip("10.0.0.0"))
    assert set(read.entries) == {ip("10.0.0.2")}
    # A later revision than the deleted one's: a cache takes it over what it knew.
    assert later_revision(read.revision, seen.revision)


def test_reads_return_exactly_the_blocks_overlapping_the_span(
    store: PoolStore, pool: PoolId
) -> None:
    for base in ("10.0.0.0", "10.0.1.0", "10.0.2.0", "10.1.0.0"):
        fifth = base.rsplit(".", 1)[0] + ".5"
        assert store.write_blocks([block(pool, base, fifth)]).conflicts == []

    def bases(first: str, last: str) -> list[str]:
        found = store.read_blocks(pool, ip(first), ip(last))
        return sorted(str(netaddr.IPAddress(b.key.base)) for b in found)

    assert bases("10.0.1.5", "10.0.1.9") == ["10.0.1.0"]
    assert bases("10.0.0.255", "10.0.2.0") == ["10.0.0.0", "10.0.1.0", "10.0.2.0"]
    assert bases("10.0.3.0", "10.0.255.255") == []
    assert bases("0.0.0.0", "255.255.255.255") == ["10.0.0.0", "10.0.1.0", "10.0.2.0", "10.1.0.0"]


def test_reading_everything_returns_every_pool_with_its_identity_and_revisions(
    store: PoolStore, pool: PoolId
) -> None:
    # The unnamed network is shared by the whole store: a block of its own, at random.
    base = f"172.{uuid.uuid4().int % 16 + 16}.{uuid.uuid4().int % 256}.0"
    others = [PoolId("", 4), PoolId(pool.network + "-other", 4), PoolId(pool.network, 6)]
    for p in [pool, *others]:
        written = block(p, base)
        written.entries[ip(base) + 4] = Owner("c", "net1", "ns/p", "uid-4", "node-a", "net")
        assert store.write_blocks([written]).conflicts == []
    found = {b.key: b for b in store.read_all_blocks()}
    for p in [pool, *others]:
        key = BlockKey.of(p, ip(base))
        [wanted] = store.read_blocks(p, key.base, key.base)
        assert found[key].entries == wanted.entries
        assert found[key].revision == wanted.revision


def test_pools_differing_in_network_or_family_are_independent(
    store: PoolStore, pool: PoolId
) -> None:
    others = [PoolId(pool.network + "-other", 4), PoolId(pool.network, 6)]
    assert store.write_blocks([block(pool, "10.0.0.0", "10.0.0.1")]).conflicts == []
    for other in others:
        assert store.read_blocks(other, 0, 2**128 - 1) == []
        assert store.write_blocks([block(other, "10.0.0.0", "10.0.0.2")]).conflicts == []
    [mine] = store.read_blocks(pool, 0, 2**32 - 1)
    assert set(mine.entries) == {ip("10.0.0.1")}


def test_ipv6_blocks_at_the_top_of_the_space_round_trip(store: PoolStore) -> None:
    pool = PoolId(f"contract-{uuid.uuid4().hex[:8]}", 6)
    top = block(pool, "2001:db8::ffff:ffff:ffff:ff00", "2001:db8::ffff:ffff:ffff:fffe")
    low = block(pool, "2001:db8::", "2001:db8::1")
    assert store.write_blocks([top, low]).conflicts == []
    upper_half = store.read_blocks(
        pool, ip("2001:db8::8000:0:0:0"), ip("2001:db8::ffff:ffff:ffff:ffff")
    )
    assert [b.entries for b in upper_half] == [top.entries]


@pytest.mark.parametrize("coalescing", [False, True], ids=["direct", "coalescing"])
def test_concurrent_allocations_through_the_store_never_collide(
    store: PoolStore, pool: PoolId, coalescing: bool
) -> None:
    """40 threads at once: alone, each in its own transaction; through the node agent's
    CoalescingTransactions on a CachedStore, in shared writes (fewer writes than allocations)."""
    rng = build_range("10.0.0.0/26", range_start=None, range_end=None, exclude=[], pool=pool)
    batches: list[int] = []
    transactions: Transactions = (
        CoalescingTransactions(CachedStore(store), on_batch=batches.append)
        if coalescing
        else DirectTransactions(store)
    )
    got: list[int] = []
    errors: list[BaseException] = []

    def allocate(n: int) -> None:
        try:
            owner = Owner(f"c{n}", "net1", f"ns/p{n}")
            got.extend(
                operations.allocate(transactions, [rng], owner, [], deadline=time.monotonic() + 60)
            )
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=allocate, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(got) == len(set(got)) == 40
    assert sorted(got) == [ip("10.0.0.1") + i for i in range(40)]
    stored = {a for b in store.read_blocks(pool, rng.first, rng.last) for a in b.entries}
    assert stored == set(got)
    if coalescing:
        assert sum(batches) == 40
    if coalescing and not isinstance(store, MemoryStore):  # an in-memory write never waits
        assert len(batches) < 40, batches
