"""Watches of the IPPools kept open as the node agents keep theirs, for bench.write_cost: every
agent hears every write of the IPPools' namespace, so what each watch costs kube-apiserver per
write grows a cluster's cost of an ADD with its number of nodes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from pyabouts.ipam.stores.kube_api import METADATA_LIST, METADATA_ONLY, ApiCredentials, KubeApi
from pyabouts.ipam.stores.kubernetes import ippools_path

WATCH_SECONDS = 600  # longer than any row: a watch the server ended would stop counting
HEARD_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
# for all of them to hear the row's object deleted


class IPPoolWatchers:
    """`count` watches of the IPPools' metadata in `namespace`, as an agent keeps them (its
    client, a list of the metadata, then a watch from the list's resourceVersion with
    bookmarks), each on a thread of its own that counts what it learns: each object listed,
    and each event. Each stops at the first deletion it hears: the row's object deleted at its
    end (a blocked read cannot be stopped from another thread)."""

    def __init__(self, credentials: ApiCredentials, namespace: str, count: int) -> None:
        self._credentials = credentials
        self._path = ippools_path(namespace)
        self._lock = threading.Lock()
        self._heard = [0] * count
        self._failures: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._watch, args=(n,), name=f"watcher-{n}", daemon=True)
            for n in range(count)
        ]

    def __enter__(self) -> IPPoolWatchers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for thread in self._threads:  # daemons: one that never heard the deletion stays
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def heard(self) -> list[int]:
        """How many objects listed and events (creates, updates, deletions) each watcher has
        heard so far."""
        with self._lock:
            return list(self._heard)

    def listening(self) -> int:
        """How many of them still watch."""
        return sum(thread.is_alive() for thread in self._threads)

    def wait_until_heard(self, events: int, timeout: float = HEARD_TIMEOUT_S) -> None:
        """Return once every watcher has heard `events` events; RuntimeError when one failed
        or `timeout` passed first (a watch not yet open would be measured as no cost)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._failures:
                    raise RuntimeError(f"a watch failed: {self._failures[0]!r}")
                if min(self._heard, default=events) >= events:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"not every watch heard {events} events in {timeout:g} s: {self.heard()}"
                )
            time.sleep(0.01)

    def _watch(self, n: int) -> None:
        api = KubeApi(self._credentials, timeout=30)
        try:
            listed = api.request("GET", self._path, accept=METADATA_LIST)
            with self._lock:
                self._heard[n] += len(listed.get("items") or [])
            query: dict[str, str | int | None] = {
                "resourceVersion": str(listed["metadata"]["resourceVersion"]),
                "allowWatchBookmarks": "true",
                "timeoutSeconds": WATCH_SECONDS,
            }
            events = api.watch(self._path, query, accept=METADATA_ONLY, idle_timeout=WATCH_SECONDS)
            self._follow(n, events)
        except Exception as exc:  # told to wait_until_heard's caller
            with self._lock:
                self._failures.append(exc)
        finally:
            api.close()

    def _follow(self, n: int, events: Iterator[dict[str, Any]]) -> None:
        """Count `events` until a deletion; RuntimeError when the watch ends before one."""
        for event in events:
            kind = event.get("type")
            if kind == "BOOKMARK":  # the server's, about every minute: no write
                continue
            with self._lock:
                self._heard[n] += 1
            if kind == "DELETED":
                return
        raise RuntimeError("the watch ended before the row's object was deleted")
