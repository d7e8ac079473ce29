"""Watches of the IPPools kept open as the node agents keep theirs, for bench.write_cost: every
agent hears every write of the IPPools' namespace, so what each watch costs kube-apiserver per
write grows a cluster's cost of an ADD with its number of nodes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

from pyabouts.ipam.stores.kube_api import METADATA_LIST, METADATA_ONLY, ApiCredentials, KubeApi
from pyabouts.ipam.stores.kubernetes import ippools_path

WATCH_SECONDS = 600  # longer than any row: a watch the server ended would stop counting
WAIT_TIMEOUT_S = 60.0  # for every watcher to list, or to hear an event: then something is wrong
STOP_TIMEOUT_S = 30.0  # for all of them to hear the row's object deleted


class IPPoolWatchers:
    """`count` watches of the IPPools' metadata in `namespace`, as an agent keeps them (its
    client, a list of the metadata, then a watch from the list's resourceVersion with
    bookmarks), each on a thread of its own that counts the events it hears.

    Entering returns once every watcher has listed, so each one's watch hears every write made
    after it as an event (a watch opened late still gets them, from its list's resourceVersion).
    Each watcher stops at the first deletion it hears, the row's object deleted at its end: a
    blocked read cannot be stopped from another thread. Leaving raises, unless an exception is
    on its way already, when a watcher failed or still watches."""

    def __init__(self, credentials: ApiCredentials, namespace: str, count: int) -> None:
        self._credentials = credentials
        self._path = ippools_path(namespace)
        self._lock = threading.Lock()
        self._listed = 0
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
            self._wait_for(lambda: self._listed == len(self._threads), "list the IPPools")
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
        api = KubeApi(self._credentials, timeout=30)
        try:
            listed = api.request("GET", self._path, accept=METADATA_LIST)
            query: dict[str, str | int | None] = {
                "resourceVersion": str(listed["metadata"]["resourceVersion"]),
                "allowWatchBookmarks": "true",
                "timeoutSeconds": WATCH_SECONDS,
            }
            with self._lock:
                self._listed += 1
            events = api.watch(self._path, query, accept=METADATA_ONLY, idle_timeout=WATCH_SECONDS)
            self._follow(n, events)
        except Exception as exc:  # told to the waits, and on leaving
            with self._lock:
                self._failures.append(exc)
        finally:
            api.close()

    def _follow(self, n: int, events: Iterator[dict[str, Any]]) -> None:
        """Count `events` until a deletion; RuntimeError on an error event, or when the watch
        ends before a deletion."""
        for event in events:
            kind = event.get("type")
            if kind == "BOOKMARK":  # the server's, about every minute: no write
                continue
            if kind == "ERROR":  # a Status: 410 Gone, say
                raise RuntimeError(f"the watch answered an error: {event.get('object')}")
            with self._lock:
                self._heard[n] += 1
            if kind == "DELETED":
                return
        raise RuntimeError("the watch ended before the row's object was deleted")
