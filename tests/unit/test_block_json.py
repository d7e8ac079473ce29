"""The stored form as the stores write it (codec.block_json): exactly the JSON of
block_document, read back as the same block, whatever its owners and whichever of their
encodings are kept from earlier writes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyabouts.ipam.pool import BLOCK_SIZE, Block, BlockKey, Owner, PoolId
from pyabouts.ipam.stores import codec
from pyabouts.ipam.stores.codec import (
    block_document,
    block_from_document,
    block_json,
    compact_json,
    json_with_member,
)

KEY = BlockKey(PoolId('net \u00e9"1', 6), 0x20010DB8 << 96)
text = st.text(max_size=12)
times = st.integers(0, 1 << 40)
owners = st.builds(
    Owner,
    container_id=text,
    ifname=text,
    pod=text,
    pod_uid=text,
    node=text,
    cni_network=text,
    allocated_at=times,
    cooldown=times,
    sticky=st.booleans(),
    cooling_until=times,
    reserved=st.booleans(),
)
blocks = st.builds(
    lambda entries, capacity, range_size: Block(
        KEY,
        {KEY.base + offset: owner for offset, owner in entries.items()},
        range_text="2001:db8::/64",
        capacity=capacity,
        range_size=range_size,
    ),
    st.dictionaries(st.integers(0, BLOCK_SIZE - 1), owners, max_size=8),
    st.integers(0, BLOCK_SIZE),
    st.integers(0, 1 << 70),
)


@given(blocks)
def test_it_is_the_compact_json_of_the_document_and_reads_back_as_the_block(block: Block) -> None:
    written = block_json(block)
    assert written == compact_json(block_document(block))
    read = block_from_document(block.key, json.loads(written), "7")
    assert read.entries == block.entries
    assert {a: _all_fields(o) for a, o in read.entries.items()} == {
        a: _all_fields(o) for a, o in block.entries.items()
    }


def test_owners_equal_but_for_their_time_cooldown_or_stickiness_are_each_written_as_they_are() -> (
    None
):
    # Owner equality leaves these out (an ADD that finds its own entry keeps it), so an encoding
    # kept for one must never stand for the other.
    first = Owner("c", "net1", "ns/p", allocated_at=100, cooldown=5)
    variants = [first, Owner("c", "net1", "ns/p", allocated_at=200, cooldown=5)]
    variants += [Owner("c", "net1", "ns/p", allocated_at=100, cooldown=9, sticky=True)]
    assert len(set(variants)) == 1
    for owner in [*variants, first]:
        block = Block(KEY, {KEY.base + 1: owner})
        stored = json.loads(block_json(block))["allocations"]["1"]
        assert (stored["allocated"], stored["cooldown"], stored.get("sticky", False)) == (
            owner.allocated_at,
            owner.cooldown,
            owner.sticky,
        )


def test_an_address_outside_the_block_is_refused() -> None:
    block = Block(KEY, {KEY.base + BLOCK_SIZE: Owner("c", "e")})
    with pytest.raises(ValueError, match="is not in block"):
        block_json(block)
    with pytest.raises(ValueError, match="is not in block"):
        block_document(block)


@given(st.dictionaries(text, text, max_size=3), text)
def test_a_member_given_as_json_text_joins_the_document(document: dict[str, str], key: str) -> None:
    if key in document:  # never two members of one name: JSON readers differ on which wins
        with pytest.raises(ValueError, match="already"):
            json_with_member(document, key, "1")
        return
    joined = json.loads(json_with_member(document, key, '{"a":[1]}'))
    assert joined == {**document, key: {"a": [1]}}


def test_the_kept_encodings_stay_bounded_and_right_past_their_bound() -> None:
    owners = [Owner(f"c{n}", "net1") for n in range(codec._MAX_ENCODED_OWNERS + 10)]
    for n, owner in enumerate(owners):
        block = Block(KEY, {KEY.base + n % BLOCK_SIZE: owner})
        assert json.loads(block_json(block))["allocations"] == {
            str(n % BLOCK_SIZE): {"containerID": f"c{n}", "ifname": "net1"}
        }
        assert len(codec._ENCODED_OWNERS) <= codec._MAX_ENCODED_OWNERS


def _all_fields(owner: Owner) -> tuple[object, ...]:
    return (owner, owner.allocated_at, owner.cooldown, owner.sticky)
