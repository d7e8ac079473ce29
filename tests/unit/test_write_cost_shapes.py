"""The write-cost benchmark's blocks (bench/write_cost.py): the pyabouts rows write what the
plugin stores, the earlier form carries the same owners, and every update is a real change."""

from bench.write_cost import FIRST_ADDRESS, change_one, earlier_form, full_block
from pyabouts.ipam.pool import BLOCK_SIZE
from pyabouts.ipam.stores.codec import block_document, block_from_document


def test_a_full_block_is_one_the_plugins_codec_stores_and_reads_back() -> None:
    block = full_block(BLOCK_SIZE - 1)
    document = block_document(block)
    assert len(document["allocations"].splitlines()) == BLOCK_SIZE  # its header, and a line each
    assert block_from_document(block.key, document, "1").entries == block.entries


def test_the_earlier_form_carries_every_owner_as_the_plugin_reads_it() -> None:
    block = full_block(5)
    document = {**block_document(block), "allocations": earlier_form(block)}
    read = block_from_document(block.key, document, "1")
    assert read.entries == block.entries
    assert [o.allocated_at for o in read.entries.values()] == [
        o.allocated_at for o in block.entries.values()
    ]


def test_every_update_changes_the_stored_document_and_keeps_its_size() -> None:
    for entries in (0, 1, 64):
        block = full_block(entries)
        before = block_document(block)
        for n in range(3):
            change_one(block, n)
            after = block_document(block)
            assert after != before and len(after["allocations"].splitlines()) == entries + 1
            before = after
    block = full_block(2)
    change_one(block, 3)  # the owner at n % entries is replaced
    assert block.entries[FIRST_ADDRESS + 1].container_id == f"{BLOCK_SIZE + 3:064x}"
