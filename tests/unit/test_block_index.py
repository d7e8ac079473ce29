"""A block's owner index (what held_by answers from) against the entries themselves, through any
sequence of put, pop and copy: a copy carries the index, and changing either side never shows
in the other."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId, container_identity

KEY = BlockKey(PoolId("net", 4), 0x0A000000)
OWNERS = [
    Owner(container_id=c, ifname=i, pod=p)
    for c in ("c1", "c2")
    for i in ("net1", "net2")
    for p in ("", "ns/a", "ns/b")
]
IDENTITIES = {o.attachment for o in OWNERS} | {
    container_identity(o.container_id, o.ifname) for o in OWNERS
}

addresses = st.integers(KEY.base, KEY.base + 7)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("put"), addresses, st.sampled_from(OWNERS)),
        st.tuples(st.just("pop"), addresses, st.none()),
        st.tuples(st.just("copy"), st.just(0), st.none()),
    ),
    max_size=40,
)


def held_by_scan(block: Block, identity: tuple[str, str]) -> set[int]:
    return {
        address
        for address, owner in block.entries.items()
        if identity in (owner.attachment, container_identity(owner.container_id, owner.ifname))
    }


def assert_index_matches(block: Block) -> None:
    for identity in IDENTITIES:
        assert sorted(block.held_by(identity)) == sorted(held_by_scan(block, identity)), identity


@given(steps, st.booleans())
def test_held_by_matches_the_entries_through_puts_pops_and_copies(
    changes: list[tuple[str, int, Owner | None]], index_first: bool
) -> None:
    blocks = [Block(KEY)]
    if index_first:
        blocks[0].held_by(OWNERS[0].attachment)  # built before the changes, then kept current
    for step, address, owner in changes:
        if step == "copy":
            blocks.append(blocks[-1].copy())  # the copy changes from now on; the others stay
        elif step == "put":
            assert owner is not None
            blocks[-1].put(address, owner)
        else:
            blocks[-1].pop(address)
    snapshots = [dict(b.entries) for b in blocks]
    for block, entries in zip(blocks, snapshots, strict=True):
        assert block.entries == entries
        assert_index_matches(block)
