"""A stored block that is not in pyabouts' format (a hand edit gone wrong): a CNI call on its
pool gets code 104 naming it, and the reconciler's snapshot leaves it out, names it, and goes
on with the rest, giving back no node slice meanwhile."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from pyabouts.controller.leaks import PodState, Policy
from pyabouts.controller.reconciler import reconcile
from pyabouts.ipam import allocator
from pyabouts.ipam.errors import CORRUPT_BLOCK, CniError
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId, PoolView
from pyabouts.ipam.ranges import build_range
from pyabouts.ipam.slices import SlicedRange, held_slice, parse_slice_size, take_slice
from pyabouts.ipam.store import OnUnreadable
from pyabouts.ipam.stores import etcd
from pyabouts.ipam.stores.kubernetes import block_of_ippool
from tests.memory_store import MemoryStore

GOOD_TABLE = {"cidr": "10.0.0.0/24", "network": "net", "allocations": {}}


def ippool(spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "net-10.0.0.0-24", "resourceVersion": "7"}, "spec": spec}


@pytest.mark.parametrize(
    "spec",
    [
        {"network": "net", "allocations": {}},  # no cidr
        {**GOOD_TABLE, "cidr": "10.0.0.0/33"},
        {**GOOD_TABLE, "allocations": 7},
        {**GOOD_TABLE, "allocations": "offset containerID\n7 sandbox-7"},  # not our header
        {**GOOD_TABLE, "capacity": "many"},
        {**GOOD_TABLE, "cidr": "10.0.1.0/24"},  # its name says 10.0.0.0/24
        {**GOOD_TABLE, "network": "other"},
    ],
    ids=[
        "no-cidr",
        "bad-cidr",
        "allocations-a-number",
        "another-table",
        "capacity-a-word",
        "cidr-moved",
        "network-renamed",
    ],
)
def test_an_ippool_not_in_pyabouts_format_is_code_104_naming_it(spec: dict[str, Any]) -> None:
    with pytest.raises(CniError) as raised:
        block_of_ippool(ippool(spec))
    assert raised.value.code == CORRUPT_BLOCK
    assert raised.value.msg.startswith("IPPool net-10.0.0.0-24")
    assert block_of_ippool(ippool(GOOD_TABLE)).revision == "7"  # the same, well formed


def etcd_value(key: str, value: bytes, revision: int = 3) -> tuple[bytes, Any]:
    return value, SimpleNamespace(key=key.encode(), mod_revision=revision)


def test_an_etcd_read_leaves_out_the_keys_it_cannot_read_when_told_where_to_report_them() -> None:
    good = BlockKey(PoolId("net", 4), 0x0A000000)
    document = {"allocations": {}, "range": "10.0.0.0/24"}
    found = [
        etcd_value(etcd.block_key(good), json.dumps(document).encode()),
        etcd_value(etcd.block_key(BlockKey(PoolId("net", 4), 0x0A000100)), b"{not json"),
        etcd_value(etcd.block_key(BlockKey(PoolId("net", 4), 0x0A000200)), b"[1, 2]"),
        etcd_value("/pyabouts/blocks/not-a-key", b"{}"),
        etcd_value(etcd.block_key(BlockKey(PoolId("net", 4), 0x0A000300)), b'{"capacity": 1e999}'),
        etcd_value("/pyabouts/v1/pools/4/net/ffffffffff00", b"{not json"),  # past IPv4
        # Other spellings of the good block's key: read as it, each would stand beside it.
        *(
            etcd_value(key, json.dumps(document).encode())
            for key in (
                "/pyabouts/v1/pools/4/net/0A000000",
                "/pyabouts/v1/pools/4/net/000000000a000000",
                "/pyabouts/v1/pools/5/net/0a000000",
                "/pyabouts/v1/pools/4/%6Eet/0a000000",
            )
        ),
    ]
    with pytest.raises(CniError) as raised:
        etcd._decode(found)
    assert raised.value.code == CORRUPT_BLOCK and "etcd key" in raised.value.msg
    told: list[CniError] = []
    blocks = etcd._decode(found, told.append)
    assert [b.key for b in blocks] == [good]
    assert len(told) == 9 and all(e.code == CORRUPT_BLOCK for e in told)
    assert all(e.msg.startswith("etcd key /pyabouts/") for e in told)


class WithUnreadable(MemoryStore):
    """Holds, beside its blocks, one stored block nobody can read."""

    problem = CniError(CORRUPT_BLOCK, "IPPool net-broken: stored block 10.1.0.0/24 is malformed")

    def read_all_blocks(self, *, on_unreadable: OnUnreadable | None = None) -> list[Block]:
        if on_unreadable is None:
            raise self.problem
        on_unreadable(self.problem)
        return super().read_all_blocks()


def test_a_pass_frees_what_leaked_elsewhere_names_the_unreadable_and_gives_back_no_slice() -> None:
    rng = build_range(
        "10.0.0.0/24", range_start=None, range_end=None, exclude=[], pool=PoolId("net", 4)
    )
    cut = SlicedRange(rng, parse_slice_size("/26", rng))
    view = PoolView([])
    gone = Owner(container_id="c1", ifname="net1", pod="default/gone", node="gone-node")
    [address] = allocator.assign_addresses(
        view, [cut.within(take_slice(view, cut, "gone-node"))], gone, []
    )
    store = WithUnreadable()
    assert not store.write_blocks(view.changed_blocks()).conflicts

    def no_pods() -> dict[str, PodState]:
        return {}

    summary = reconcile(store, no_pods, Policy(), list_nodes=lambda: {"other-node"})

    assert [leak.address for leak in summary.freed] == [address]
    assert summary.unreadable == [WithUnreadable.problem.msg]
    assert "1 unreadable block(s) left out" in summary.describe()
    after = PoolView(store.read_all_blocks(on_unreadable=lambda _: None))
    assert held_slice(after, cut, "gone-node") is not None  # its block may be the unreadable one
