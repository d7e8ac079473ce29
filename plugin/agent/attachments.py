"""The ADDs an agent is serving, by attachment (container ID and interface), so that a DEL of
one waits for them.

A runtime that gives up on an ADD (a pod deleted as its sandbox starts: containerd kills the
plugin) sends the DEL at once, while the agent still serves the ADD. Nothing else orders the
two: under node slices they wait on different queues (the ADD's includes the slice registry),
and a DEL answered first finds nothing to free, then the ADD stores an address for a sandbox
that is gone. A DEL waits only for the ADDs served when it came: one that comes after it
(the runtime's next try) is the runtime's to order, and must keep what it stores.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator, Mapping

Attachment = tuple[str, str]


class AddsInFlight:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._tickets = itertools.count()
        self._adds: dict[Attachment, set[int]] = {}
        self._dels_waiting = 0

    @property
    def dels_waiting(self) -> int:
        """DELs waiting now for ADDs in flight."""
        with self._changed:
            return self._dels_waiting

    @contextlib.contextmanager
    def serving(self, env: Mapping[str, str], deadline: float) -> Iterator[bool]:
        """Around serving one request of `env`: an ADD is counted in flight; a DEL first waits
        for the ADDs of its attachment in flight when it came. Yields False when one of those
        was still in flight at `deadline` (time.monotonic()): the DEL is not to be served."""
        command, attachment = env.get("CNI_COMMAND"), _attachment(env)
        if command == "DEL":
            yield self._wait_for_adds(attachment, deadline)
            return
        if command != "ADD":
            yield True
            return
        with self._changed:
            ticket = next(self._tickets)
            self._adds.setdefault(attachment, set()).add(ticket)
        try:
            yield True
        finally:
            with self._changed:
                tickets = self._adds[attachment]
                tickets.discard(ticket)
                if not tickets:
                    del self._adds[attachment]
                self._changed.notify_all()

    def _wait_for_adds(self, attachment: Attachment, deadline: float) -> bool:
        with self._changed:
            before = set(self._adds.get(attachment, ()))
            if not before:
                return True
            self._dels_waiting += 1
            try:
                return self._changed.wait_for(
                    lambda: before.isdisjoint(self._adds.get(attachment, ())),
                    timeout=max(0.0, deadline - time.monotonic()),
                )
            finally:
                self._dels_waiting -= 1


def _attachment(env: Mapping[str, str]) -> Attachment:
    return env.get("CNI_CONTAINERID", ""), env.get("CNI_IFNAME", "")
