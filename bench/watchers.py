"""Watches of the IPPools kept open as the node agents keep theirs, for bench.write_cost: every
agent hears every write of the IPPools' namespace, so what each watch costs kube-apiserver per
write grows a cluster's cost of an ADD with its number of nodes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from types import TracebackType

from pyabouts.ipam.stores.kube_api import ApiCredentials, KubeApi
from pyabouts.ipam.stores.kubernetes import KubernetesStore

WAIT_TIMEOUT_S = 60.0  # for every watcher to list, or to hear an event: then something is wrong
STOP_TIMEOUT_S = 30.0  # for all of them to hear the row's object deleted


class IPPoolWatchers:
    """`count` watches of the IPPools' metadata in `namespace`, each the agent's own
    (KubernetesStore.follow_changes: a list of the metadata, then a watch from the list's
    resourceVersion), each on a thread of its own that counts the changes it hears.

    Entering returns once every watcher has listed, so each one's watch hears every write made
    after it as an event (a watch opened late still gets them, from its list's resourceVersion).
    Each watcher stops at the first deletion it hears, the row's object deleted at its end: a
    blocked read cannot be stopped from another thread. Leaving raises, unless an exception is
    on its way already, when a watcher failed or still watches."""

    def __init__(self, credentials: ApiCredentials, namespace: str, count: int) -> None:
        self._credentials = credentials
        self._namespace = namespace
        self._lock = threading.Lock()
        self._lists = 0
        self._heard = [0] * count
        self._failures: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._watch, args=(n,), name=f"watcher-{n}", daemon=True)
            for n in range(count)
        ]

    def __enter__(self) -> IPPoolWatchers:
        for thread in self._threads:
            thread.start()
        try:
            self._wait_for(lambda: self._lists == len(self._threads), "list the IPPools")
        except BaseException:
            self._stop_waiting()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop_waiting()
        if kind is not None:
            return  # that exception says more than what it left the watchers doing
        with self._lock:
            if self._failures:
                raise RuntimeError(f"a watch failed: {self._failures[0]!r}")
        if self.open_watches():
            raise RuntimeError(f"{self.open_watches()} watches never heard the row's deletion")

    def events_heard(self) -> list[int]:
        """How many events (creates, updates, deletions) each watcher has heard so far."""
        with self._lock:
            return list(self._heard)

    def open_watches(self) -> int:
        """How many watchers still watch."""
        return sum(thread.is_alive() for thread in self._threads)

    def wait_until_heard(self, events: int) -> None:
        """Return once every watcher has heard `events` events: its watch is open. RuntimeError
        when one failed or WAIT_TIMEOUT_S passed first (a watch not open yet would be measured
        as costing nothing)."""
        self._wait_for(lambda: min(self._heard, default=events) >= events, f"hear {events} events")

    def _wait_for(self, done: Callable[[], bool], what: str) -> None:
        """Wait until `done()` (called under the lock) is true."""
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while True:
            with self._lock:
                if self._failures:
                    raise RuntimeError(f"a watch failed: {self._failures[0]!r}")
                if done():
                    return
            if time.monotonic() > deadline:
                heard = self.events_heard()
                raise RuntimeError(
                    f"not every watcher could {what} in {WAIT_TIMEOUT_S:g} s: {heard}"
                )
            time.sleep(0.01)

    def _stop_waiting(self) -> None:
        """Join the watchers, STOP_TIMEOUT_S for all: daemons, so one that never hears a
        deletion (the row failed before it wrote one) is left behind, not waited for."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _watch(self, n: int) -> None:
        """Follow the IPPools as the agent does (KubernetesStore.follow_changes), counting what
        it reports, until the first deletion."""
        api = KubeApi(self._credentials, timeout=30)
        stop = threading.Event()
        try:
            sink = _Counting(self._listed, partial(self._heard_one, n), stop)
            KubernetesStore(api, self._namespace).follow_changes(sink, stop)
        except Exception as exc:  # told to the waits, and on leaving
            with self._lock:
                self._failures.append(exc)
        finally:
            api.close()

    def _listed(self) -> None:
        with self._lock:
            self._lists += 1

    def _heard_one(self, n: int) -> None:
        with self._lock:
            self._heard[n] += 1


class _Counting:
    """A ChangeSink (ipam.store) that tells a watcher what its feed reports, and stops the
    feed at the first deletion."""

    def __init__(
        self, listed: Callable[[], None], heard: Callable[[], None], stop: threading.Event
    ) -> None:
        self._listed, self._heard, self._stop = listed, heard, stop

    def feed_listed(self, revisions: Mapping[tuple[str, str], str]) -> None:
        self._listed()

    def feed_changed(self, pool_tag: str, block_tag: str, revision: str, *, deleted: bool) -> None:
        self._heard()
        if deleted:
            self._stop.set()  # follow_changes returns after this event

    def feed_lost(self) -> None:  # the agent's follower calls it; follow_changes does not
        pass
