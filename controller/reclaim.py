"""Free leaked allocations, each only if it is still exactly the allocation that was judged.

One optimistic transaction per block, so each block's outcome is exact on every store: an
entry that changed since the snapshot (the address freed and given to another pod, or reused by
a re-created pod, which updates the containerID and UID) no longer equals the judged owner and
is kept.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from pyabouts.controller.leaks import Leak
from pyabouts.ipam import allocator
from pyabouts.ipam.errors import CniError, StoreRefusedError, StoreUnavailableError
from pyabouts.ipam.pool import BLOCK_SIZE, PoolView
from pyabouts.ipam.store import PoolStore
from pyabouts.ipam.transaction import Span, run_span_transaction

T = TypeVar("T")


OnFailed = Callable[[CniError], None]


def free_leaks(
    store: PoolStore,
    leaks: Sequence[Leak],
    *,
    deadline: float,
    on_failed: OnFailed | None = None,
) -> list[Leak]:
    """Free `leaks` that are unchanged in the store, block by block (see each_write for a
    write that fails); the ones actually freed. An address given with a release_cooldown rests
    from now, as after a DEL."""
    freed: list[Leak] = []
    now = int(time.time())

    def free_block(group: list[Leak]) -> None:
        key = group[0].key
        span = Span(key.pool, key.base, key.base + BLOCK_SIZE - 1)
        decide = functools.partial(release_unchanged, leaks=group, now=now)
        freed.extend(run_span_transaction(store, [span], decide, deadline=deadline))

    by_block = itertools.groupby(sorted(leaks, key=lambda k: k.key), key=lambda k: k.key)
    each_write([list(group) for _, group in by_block], free_block, on_failed)
    return freed


def each_write(
    items: Iterable[T], write: Callable[[T], object], on_failed: OnFailed | None
) -> None:
    """`write` each of `items` in turn. One the store refuses (StoreRefusedError: an admission
    policy, say) is told to `on_failed`, and the next are written: one bad object must not stop
    the cluster's garbage collection. A store down or busy past the deadline
    (StoreUnavailableError) is told to it too, and ends the writes: the next would wait as long.
    Without `on_failed`, either is raised."""
    for item in items:
        try:
            write(item)
        except (StoreRefusedError, StoreUnavailableError) as failure:
            if on_failed is None:
                raise
            on_failed(failure)
            if isinstance(failure, StoreUnavailableError):
                return


def release_unchanged(view: PoolView, leaks: Sequence[Leak], now: int) -> list[Leak]:
    """Free, in `view`, the `leaks` whose entry is still the owner judged; those."""
    unchanged = [leak for leak in leaks if view.owner(leak.key.pool, leak.address) == leak.owner]
    for leak in unchanged:
        if leak.owner.cooling:  # a rest that has ended (Reason.REST_ENDED)
            view.unassign(leak.key.pool, leak.address)
        else:
            allocator.release(view, leak.key.pool, leak.address, now=now)
    return unchanged
