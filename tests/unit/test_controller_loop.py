"""The controller's loop while its passes fail: a full pass waits for the resync, whatever it
has left to judge again; a targeted pass is made again RETRY_SECONDS later, since no event
brings its pods back (tests/integration/test_reconciler_controller.py runs the controller on
the apiserver)."""

import itertools
import threading
import time
import types
from typing import Any

import pytest

from pyabouts.controller.controller import Controller
from pyabouts.controller.leaks import PodState, Policy
from pyabouts.controller.pods import PodListing
from pyabouts.controller.watching import PodEvent, Relisted
from pyabouts.ipam.errors import StoreUnavailableError
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId
from tests.memory_store import MemoryStore


@pytest.fixture(autouse=True)
def _passes_close_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests time graces of a second or two: passes may follow each other closely."""
    monkeypatch.setattr("pyabouts.controller.controller.TARGETED_PASS_EVERY_SECONDS", 0.1)


class DownStore:
    """Down for its first `failures` reads (all of them by default), then empty."""

    def __init__(self, failures: int = 1 << 30) -> None:
        self.reads = 0
        self.failures = failures

    def read_all_blocks(self, *, on_unreadable: Any = None) -> list[Any]:
        self.reads += 1
        if self.reads <= self.failures:
            raise StoreUnavailableError("the datastore is down")
        return []


def test_failing_passes_wait_for_the_resync_though_a_leak_is_due_to_be_judged_again() -> None:
    store = DownStore()
    connections: Any = types.SimpleNamespace(store=store, api_client=None)
    controller = Controller(connections, Policy(), resync=300, gone_grace=1.0)
    listing = Relisted(PodListing({}, "1"))
    controller._watch = types.SimpleNamespace(events=lambda stop: iter([listing]))  # type: ignore[assignment]
    # A pass left a leak to judge again, and its grace has passed: the next full pass is due.
    controller._found_at = {("ns/gone", "uid-1"): time.time() - 1.5}
    loop = threading.Thread(target=controller.run, daemon=True)
    loop.start()
    time.sleep(1.5)
    controller.stop.set()
    loop.join(10)
    assert store.reads == 1  # the listing's pass; it spun at 10 a second


def test_a_failed_targeted_pass_is_made_again_after_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pyabouts.controller.controller.RETRY_SECONDS", 0.5)
    store = DownStore(failures=1)
    connections: Any = types.SimpleNamespace(store=store, api_client=None)
    controller = Controller(connections, Policy(), resync=300, gone_grace=0.1)
    controller._read_pods = lambda refs: {}  # type: ignore[method-assign]
    gone = PodState("ns", "gone", "uid-1", "Running", 0.0, None, False, None, stop_grace=0)
    deleted = PodEvent("DELETED", gone)
    controller._watch = types.SimpleNamespace(events=lambda stop: iter([deleted]))  # type: ignore[assignment]
    loop = threading.Thread(target=controller.run, daemon=True)
    loop.start()
    # The pass 0.4 s after the event fails; the one 0.5 s later judges the pod, and no more.
    deadline = time.monotonic() + 10
    while store.reads < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    controller.stop.set()
    loop.join(10)
    assert store.reads == 2
    assert controller._gone_at == {}


def test_a_pod_created_again_and_gone_again_has_a_gone_grace_of_its_own() -> None:
    """A StatefulSet's pod deleted, created again under its name (taking its address back, as
    ADD is idempotent by name), and deleted again before the first one's grace ended: its
    address waits the whole grace from the second deletion, while its sandbox goes."""
    grace = 1.5
    pool = PoolId("blue", 4)
    address = (10 << 24) + 5
    key = BlockKey.of(pool, address)
    store = MemoryStore()

    def hold(owner: Owner) -> None:
        block = (store.blocks.get(key) or Block(key, {}, None)).copy()
        block.put(address, owner)
        block.revision = str(time.monotonic())
        store.blocks[key] = block

    first = PodState("demo", "db-0", "uid-1", "Running", 0.0, None, False, None, stop_grace=0)
    again = PodState("demo", "db-0", "uid-2", "Running", 0.0, None, False, None, stop_grace=0)
    hold(Owner("c1", "net1", "demo/db-0", "uid-1", "node-a"))
    deleted_again: list[float] = []

    def events(stop: threading.Event) -> Any:
        yield PodEvent("DELETED", first)
        time.sleep(0.2)
        hold(Owner("c2", "net1", "demo/db-0", "uid-2", "node-b"))
        yield PodEvent("ADDED", again)
        time.sleep(0.8)
        deleted_again.append(time.time())
        yield PodEvent("DELETED", again)
        stop.wait()

    connections: Any = types.SimpleNamespace(store=store, api_client=None)
    controller = Controller(connections, Policy(), resync=300, gone_grace=grace)
    controller._watch = types.SimpleNamespace(events=events)  # type: ignore[assignment]
    controller._read_pods = lambda refs: {}  # type: ignore[method-assign]
    loop = threading.Thread(target=controller.run, daemon=True)
    loop.start()
    freed_at = None
    deadline = time.monotonic() + 10
    while freed_at is None and time.monotonic() < deadline:
        if address not in store.blocks[key].entries:
            freed_at = time.time()
        time.sleep(0.02)
    controller.stop.set()
    loop.join(10)
    assert freed_at is not None and deleted_again
    assert freed_at - deleted_again[0] >= grace - 0.05  # not the first pod's grace


def test_a_pod_created_again_and_gone_before_its_event_came_keeps_its_address() -> None:
    """The first pod's grace ends while the second pod of its name is gone too (force-deleted,
    evicted) and the watch has not said so yet: the pass that judges the first pod's addresses
    finds no pod of that name, and still leaves the second pod's address for its own grace,
    as its sandbox may still hold it."""
    grace = 1.0
    pool = PoolId("blue", 4)
    address = (10 << 24) + 5
    key = BlockKey.of(pool, address)
    store = MemoryStore()
    store.blocks[key] = Block(key, {address: Owner("c1", "net1", "demo/db-0", "uid-1")}, None)
    first = PodState("demo", "db-0", "uid-1", "Running", 0.0, None, False, None, stop_grace=0)
    again = PodState("demo", "db-0", "uid-2", "Running", 0.0, None, False, None, stop_grace=0)
    second_gone = threading.Event()

    def events(stop: threading.Event) -> Any:
        yield PodEvent("DELETED", first)
        time.sleep(0.2)
        block = store.blocks[key].copy()  # its ADD takes the address back, by name
        block.put(address, Owner("c2", "net1", "demo/db-0", "uid-2"))
        block.revision = "2"
        store.blocks[key] = block
        yield PodEvent("ADDED", again)
        second_gone.wait()
        yield PodEvent("DELETED", again)
        stop.wait()

    connections: Any = types.SimpleNamespace(store=store, api_client=None)
    controller = Controller(connections, Policy(), resync=300, gone_grace=grace)
    controller._watch = types.SimpleNamespace(events=events)  # type: ignore[assignment]
    controller._read_pods = lambda refs: {}  # type: ignore[method-assign]  # none of that name
    judged = threading.Event()
    record_pass = controller.metrics.record_pass

    def recorded(kind: str, summary: Any) -> None:
        record_pass(kind, summary)
        judged.set()

    controller.metrics.record_pass = recorded  # type: ignore[method-assign]
    loop = threading.Thread(target=controller.run, daemon=True)
    loop.start()
    try:
        assert judged.wait(grace + 5)  # the first pod's targeted pass
        assert store.blocks[key].entries[address].pod_uid == "uid-2"
        second_gone.set()  # now the watch says so: the second pod's own grace begins
        told = time.time()
        deadline = time.monotonic() + grace + 5
        while address in store.blocks[key].entries and time.monotonic() < deadline:
            time.sleep(0.02)
        assert address not in store.blocks[key].entries
        assert time.time() - told >= grace - 0.05
    finally:
        second_gone.set()
        controller.stop.set()
        loop.join(10)


def test_targeted_passes_under_steady_churn_are_spaced_so_the_store_is_not_read_back_to_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pods gone one after another, 0.2 s apart: each targeted pass reads the whole store, so
    they start TARGETED_PASS_EVERY_SECONDS apart at the soonest, each taking the pods due by
    then; every pod is still judged."""
    monkeypatch.setattr("pyabouts.controller.controller.TARGETED_PASS_EVERY_SECONDS", 1.0)
    store = MemoryStore()
    reads: list[float] = []
    read_all = store.read_all_blocks

    def timed_read(**kwargs: Any) -> Any:
        reads.append(time.monotonic())
        return read_all(**kwargs)

    store.read_all_blocks = timed_read  # type: ignore[method-assign]
    pods = [
        PodState("ns", f"p{i}", f"uid-{i}", "Succeeded", 0.0, None, False, None) for i in range(10)
    ]

    all_told = threading.Event()

    def events(stop: threading.Event) -> Any:
        for pod in pods:  # finished: due at once, after the gone grace
            yield PodEvent("MODIFIED", pod)
            time.sleep(0.2)
        all_told.set()
        stop.wait()

    connections: Any = types.SimpleNamespace(store=store, api_client=None)
    controller = Controller(connections, Policy(), resync=300, gone_grace=0.0)
    controller._watch = types.SimpleNamespace(events=events)  # type: ignore[assignment]
    controller._read_pods = lambda refs: {}  # type: ignore[method-assign]
    loop = threading.Thread(target=controller.run, daemon=True)
    loop.start()
    deadline = time.monotonic() + 10
    while (not all_told.is_set() or controller._gone_at) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    controller.stop.set()
    loop.join(10)
    assert controller._gone_at == {}  # every pod judged
    assert 2 <= len(reads) <= 4, reads  # not one pass per pod (ten over two seconds)
    assert all(b - a >= 0.95 for a, b in itertools.pairwise(reads)), reads


def force_deleted_db0(at: float) -> PodState:
    """demo/db-0 (uid-1) force-deleted at `at` while it runs, its grace 300 s."""
    return PodState(
        "demo",
        "db-0",
        "uid-1",
        "Running",
        0.0,
        at,
        False,
        None,
        stop_grace=300,
        deleted_at_once=True,
    )


def test_a_pod_created_again_that_fails_at_once_keeps_the_first_ones_grace() -> None:
    """db-0 force-deleted runs for its grace (300 s, and the kill window) while its
    replacement, refused at admission, fails at once: the pass for both comes no sooner than
    the first pod's grace ends (the second event moved it to the second pod's end, and the
    address went to another pod while the first still ran)."""
    connections: Any = types.SimpleNamespace(store=MemoryStore(), api_client=None)
    controller = Controller(connections, Policy(), resync=300, gone_grace=10)
    told = time.time()
    forced = force_deleted_db0(told)
    refused = PodState("demo", "db-0", "uid-2", "Failed", 0.0, None, False, None)
    controller._note_gone(forced)
    controller._note_gone(refused)
    assert controller._gone_at["demo/db-0"] >= told + 300 + 10
    assert controller._gone_uids["demo/db-0"] == {"uid-1", "uid-2"}
    assert controller._due() == {}


def test_a_lost_pods_pass_leaves_the_address_of_another_pod_of_its_name_in_its_grace() -> None:
    """db-0 force-deleted (its grace 300 s), then db-0 created again on a node that is lost
    (the taint manager deleted it, --node-lost-grace passed): the lost pod's pass frees the
    lost pod's address and leaves the first pod's for its own pass (it freed it at once, the
    first pod still running)."""
    pool = PoolId("blue", 4)
    first_address, lost_address = (10 << 24) + 5, (10 << 24) + 9
    key = BlockKey.of(pool, first_address)
    store = MemoryStore()
    held = {
        first_address: Owner("c1", "net1", "demo/db-0", "uid-1"),
        lost_address: Owner("c2", "net1", "demo/db-0", "uid-2"),
    }
    assert not store.write_blocks([Block(key, held)]).conflicts
    now = time.time()
    forced = force_deleted_db0(now)
    lost = PodState(
        "demo",
        "db-0",
        "uid-2",
        "Running",
        0.0,
        now - 60,
        True,
        frozenset({"10.0.0.9"}),
        node="node-b",
    )
    connections: Any = types.SimpleNamespace(store=store, api_client=None)
    controller = Controller(connections, Policy(node_lost_grace=30), resync=300, gone_grace=10)
    controller._read_pods = lambda refs: {"demo/db-0": lost}  # type: ignore[method-assign]
    controller._note_gone(forced)
    controller._note_lost(lost)
    due = controller._due()  # the lost pod's, now; the first pod's comes 300 s on
    assert set(due) == {"demo/db-0"}
    assert controller._pass("targeted", set(due), awaited=due)
    assert set(store.blocks[key].entries) == {first_address}
