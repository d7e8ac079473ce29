"""The write-cost benchmark's blocks (bench/write_cost.py): the pyabouts rows write what the
plugin stores, the other shapes carry the same owners, and every update is a real change."""

from bench.write_cost import FIRST_ADDRESS, change_one, full_block, reshaped
from pyabouts.ipam.pool import BLOCK_SIZE
from pyabouts.ipam.stores.codec import block_document, block_from_document


def test_a_full_block_is_one_the_plugins_codec_stores_and_reads_back() -> None:
    block = full_block(BLOCK_SIZE - 1)
    document = block_document(block)
    assert len(document["allocations"]) == BLOCK_SIZE - 1
    assert block_from_document(block.key, document, "1").entries == block.entries


def test_the_other_shapes_carry_every_owners_values() -> None:
    allocations = block_document(full_block(5))["allocations"]
    per_address = reshaped(allocations, "string per address")
    table = reshaped(allocations, "one string")
    assert per_address.keys() == allocations.keys()
    assert list(table) == ["table"] and len(table["table"].splitlines()) == 5
    for offset, entry in allocations.items():
        values = [str(v) for v in entry.values()]
        assert per_address[offset].split(" ") == values
        assert f"{offset} {per_address[offset]}" in table["table"].splitlines()


def test_every_update_changes_the_stored_document_and_keeps_its_size() -> None:
    for entries in (0, 1, 64):
        block = full_block(entries)
        before = block_document(block)
        for n in range(3):
            change_one(block, n)
            after = block_document(block)
            assert after != before and len(after["allocations"]) == entries
            before = after
    block = full_block(2)
    change_one(block, 3)  # the owner at n % entries is replaced
    assert block.entries[FIRST_ADDRESS + 1].container_id == f"{BLOCK_SIZE + 3:064x}"
