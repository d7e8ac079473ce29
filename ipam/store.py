"""The store interface: read blocks, write them back only if nobody changed them.

Adapters (ipam/stores/) implement it for etcd and for Kubernetes custom resources. The
interface is deliberately small; everything that decides lives in the allocator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pyabouts.ipam.pool import Block, BlockKey, PoolId


@dataclass(frozen=True, slots=True)
class WriteOutcome:
    """What a write did: the blocks somebody else changed first (not written), and the new
    revisions of the blocks written, so a caller that keeps blocks can keep them current."""

    conflicts: list[BlockKey] = field(default_factory=list)
    revisions: dict[BlockKey, str] = field(default_factory=dict)


class PoolStore(Protocol):
    def read_blocks(self, pool: PoolId, first: int, last: int) -> list[Block]:
        """The stored blocks of `pool` that hold addresses in [first, last], with revisions.

        Blocks never stored are not returned. Raises StoreUnavailableError or StoreRefusedError.
        """
        ...

    def read_all_blocks(self) -> list[Block]:
        """Every stored block of every pool, with revisions: the reconciler's snapshot.

        One consistent read where the store has one (etcd: a single range read); Kubernetes
        lists in pages, each block with its own resourceVersion.
        """
        ...

    def write_blocks(self, blocks: Sequence[Block]) -> WriteOutcome:
        """Store each block if its stored revision is still `block.revision` (None: absent).

        Blocks changed by somebody else meanwhile are not written: they are the outcome's
        conflicts. A store that can write several blocks atomically (etcd) writes
        all or none; one that cannot (Kubernetes) may write some, which the allocator's
        idempotent decisions make safe to retry.
        """
        ...

    def close(self) -> None: ...
