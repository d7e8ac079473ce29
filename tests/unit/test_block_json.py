"""The stored form as the stores write it (codec.block_json): exactly the JSON of
block_document, a table of owners read back as the same block, whatever its owners hold and
whichever of their lines are kept from earlier writes; and the earlier form, an object per
address, still read."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyabouts.ipam.errors import CORRUPT_BLOCK, CniError
from pyabouts.ipam.pool import BLOCK_SIZE, Block, BlockKey, Owner, PoolId
from pyabouts.ipam.slices import REGISTRY_MARK, SLICE_IFNAME
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
        read = block_from_document(KEY, json.loads(block_json(block)), "1").entries[KEY.base + 1]
        assert _all_fields(read) == _all_fields(owner)


def test_a_block_changed_in_place_or_copied_and_changed_is_written_as_it_now_is() -> None:
    # Each address's line is kept with the owner object it was made for: a block whose entries
    # changed in any way (even behind put's back) never gets the line of an owner it lost.
    owners = {KEY.base + n: Owner(f"c{n}", "net1", "ns/p", allocated_at=n) for n in range(4)}
    block = Block(KEY, dict(owners))
    block_json(block)
    copied = block.copy()
    copied.put(KEY.base + 1, Owner("c1", "net1", "ns/p", allocated_at=99))  # equal, not the same
    copied.pop(KEY.base + 2)
    block.entries[KEY.base + 3] = Owner("c9", "net2")
    for changed in (copied, block, Block(KEY, dict(owners))):
        written = json.loads(block_json(changed))
        assert written == block_document(changed)
        read = block_from_document(KEY, written, "1").entries
        assert {a: _all_fields(o) for a, o in read.items()} == {
            a: _all_fields(o) for a, o in changed.entries.items()
        }


@pytest.mark.parametrize("columns", ['a"b', "a\\b", "a\nb", "a\tb", "a\rb", "a\x7fb", "\u00e9"])
def test_a_table_line_json_would_escape_is_escaped(
    monkeypatch: pytest.MonkeyPatch, columns: str
) -> None:
    # Lines never hold these (values are percent-encoded); were one to, the JSON stays right.
    monkeypatch.setattr(codec, "owner_columns", lambda owner: columns)
    block = Block(KEY, {KEY.base + 1: Owner("c", "e"), KEY.base + 2: Owner("d", "e")})
    written = block_json(block)
    assert written == compact_json(block_document(block))
    table = json.loads(written)["allocations"]
    assert table == f"{codec.TABLE_HEADER}\n1 {columns}\n2 {columns}"


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


def test_the_kept_lines_and_owners_stay_bounded_and_right_past_their_bound() -> None:
    owners = [Owner(f"c{n}", "net1") for n in range(codec._MAX_KEPT + 10)]
    for n, owner in enumerate(owners):
        block = Block(KEY, {KEY.base + n % BLOCK_SIZE: owner})
        written = json.loads(block_json(block))
        assert written["allocations"] == "\n".join(
            [codec.TABLE_HEADER, f"{n % BLOCK_SIZE} c{n} net1 - - - - 0 0 0 -"]
        )
        assert block_from_document(KEY, written, "1").entries == block.entries
        assert len(codec._OWNER_LINES) <= codec._MAX_KEPT
        assert len(codec._LINES_BY_OWNER) <= codec._MAX_KEPT
        assert len(codec._OWNERS_READ) <= codec._MAX_KEPT
        assert len(codec._LINES_READ) <= codec._MAX_KEPT
        assert sum(map(len, codec._TABLES.values())) <= codec._MAX_KEPT


def _all_fields(owner: Owner) -> tuple[object, ...]:
    return (owner, owner.allocated_at, owner.cooldown, owner.sticky)


def test_the_table_is_a_line_per_address_under_its_header_and_escapes_what_would_break_it() -> None:
    owners = {
        KEY.base + 2: Owner("c2", "net1", "ns/web-0", "u-1", "node-a", "macvlan", 1700000000),
        KEY.base + 7: Owner("", "net1", "ns/web-1", cooldown=30, cooling_until=1700000030),
        KEY.base + 9: Owner("c 9", "-", "ns/p%1\n", sticky=True, reserved=True),
    }
    table = block_document(Block(KEY, owners))["allocations"]
    assert table.split("\n") == [
        "offset containerID ifname podRef podUID node cniNetwork allocated cooldown coolingUntil"
        " flags",
        "2 c2 net1 ns/web-0 u-1 node-a macvlan 1700000000 0 0 -",
        "7 - net1 ns/web-1 - - - 0 30 1700000030 -",
        "9 c%209 %2D ns/p%251%0A - - - 0 0 0 sticky,reserved",
    ]


def test_surrogates_as_an_environment_decodes_them_are_stored_and_read_back() -> None:
    # The agent decodes CNI_ARGS with surrogateescape: an undecodable byte is a lone surrogate.
    owner = Owner("c\udcff", "net1", "ns/p\ud800")
    block = Block(KEY, {KEY.base + 1: owner})
    assert block_from_document(KEY, json.loads(block_json(block)), "1").entries == block.entries


@pytest.mark.parametrize(
    "owner",
    [
        Owner("c", "e", allocated_at=-1),
        Owner("c", "e", cooldown=True),
        Owner("c", "e", cooling_until=1.5),  # type: ignore[arg-type]
    ],
)
def test_a_count_no_reader_would_take_is_refused_rather_than_stored(owner: Owner) -> None:
    with pytest.raises(ValueError, match="is not a count or a time"):
        block_json(Block(KEY, {KEY.base + 1: owner}))


def test_a_block_of_the_earlier_form_is_read_as_it_was_written() -> None:
    document = {
        "cidr": "2001:db8::/120",
        "capacity": 200,
        "allocations": {
            "1": {
                "containerID": "c1",
                "ifname": "net1",
                "podRef": "ns/p",
                "podUID": "u",
                "node": "n",
                "cniNetwork": "macvlan",
                "allocated": 100,
                "cooldown": 5,
                "sticky": True,
            },
            "255": {"containerID": "", "ifname": "eth0", "coolingUntil": 9, "reserved": True},
        },
    }
    block = block_from_document(KEY, document, "3")
    assert {a: _all_fields(o) for a, o in block.entries.items()} == {
        KEY.base + 1: _all_fields(Owner("c1", "net1", "ns/p", "u", "n", "macvlan", 100, 5, True)),
        KEY.base + 255: _all_fields(Owner("", "eth0", cooling_until=9, reserved=True)),
    }
    assert (block.revision, block.capacity) == ("3", 200)
    rewritten = block_from_document(KEY, json.loads(block_json(block)), "4")
    assert {a: _all_fields(o) for a, o in rewritten.entries.items()} == {
        a: _all_fields(o) for a, o in block.entries.items()
    }


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        ("offset containerID ifname", "header is not pyabouts'"),
        ("", "header is not pyabouts'"),
        (f"{codec.TABLE_HEADER}\n1 c net1 - - - - 0 0 0", "not 11 columns"),
        (f"{codec.TABLE_HEADER}\n256 c net1 - - - - 0 0 0 -", "not an offset"),
        (f"{codec.TABLE_HEADER}\n1 c net1 - - - - soon 0 0 -", "'soon' is not a whole number"),
        (f"{codec.TABLE_HEADER}\n1 c net1 - - - - \u00b2 0 0 -", "is not a whole number"),
        (f"{codec.TABLE_HEADER}\n1 c net1 - - - - 0 0 0 pinned", "unknown flags"),
        (f"{codec.TABLE_HEADER}\n1 c%FF net1 - - - - 0 0 0 -", "can't decode"),
        (f"{codec.TABLE_HEADER}\n1 c net1 - - - - 0 0 0 -\n1 d net1 - - - - 0 0 0 -", "twice"),
        (f"{codec.TABLE_HEADER}\n", "'' is not a whole number"),
    ],
)
def test_a_table_not_as_pyabouts_writes_it_is_a_corrupt_block(table: str, reason: str) -> None:
    with pytest.raises(CniError, match=reason) as caught:
        block_from_document(KEY, {"allocations": table}, "1")
    assert caught.value.code == CORRUPT_BLOCK


def test_allocations_neither_a_table_nor_an_object_is_a_corrupt_block() -> None:
    with pytest.raises(CniError, match="neither a table nor an object"):
        block_from_document(KEY, {"allocations": ["1"]}, "1")


@pytest.mark.parametrize("named", ["10.0.0.0/33", "not-a-slice", "2001:db8::/120"])
def test_a_registry_entry_that_names_no_slice_of_its_family_is_a_corrupt_block(named: str) -> None:
    """A node slice registry edited by hand: unreadable, as any block not in pyabouts' format,
    rather than an exception in every decision and reconcile pass that reads it (each full
    pass failed whole, so no leak anywhere was freed)."""
    registry = BlockKey(PoolId(f"net{REGISTRY_MARK} 10.0.0.0/24 /28", 4), 0)
    good = Block(registry, {0: Owner("10.0.0.0/28", SLICE_IFNAME, node="node-a")})
    document = block_document(good)
    assert block_from_document(registry, document, "1").entries == good.entries
    broken = block_document(Block(registry, {0: Owner(named, SLICE_IFNAME, node="node-a")}))
    with pytest.raises(CniError, match="slice") as caught:
        block_from_document(registry, broken, "1")
    assert caught.value.code == CORRUPT_BLOCK


@pytest.mark.parametrize("second", ["3 c3 net1 - - - - 0 0 0 -", "3 c4 net1 - - - - 0 0 0 -"])
def test_an_offset_given_twice_is_refused_even_as_a_line_read_before(second: str) -> None:
    first = "3 c3 net1 - - - - 0 0 0 -"
    table = "\n".join([codec.TABLE_HEADER, first])
    assert list(block_from_document(KEY, {"allocations": table}, "1").entries) == [KEY.base + 3]
    with pytest.raises(CniError) as refused:  # the line is kept from the read before
        block_from_document(KEY, {"allocations": f"{table}\n{second}"}, "2")
    assert refused.value.code == CORRUPT_BLOCK and "offset 3 is given twice" in refused.value.msg
