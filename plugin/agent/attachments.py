"""The ADDs an agent is serving, by attachment (container ID and interface), so that a DEL of
one waits for them.

A runtime that gives up on an ADD (a pod deleted as its sandbox starts: containerd kills the
plugin) sends the DEL at once, while the agent still serves the ADD. Nothing else orders the
two: under node slices they wait on different queues (the ADD's includes the slice registry),
and a DEL answered first finds nothing to free, then the ADD stores an address for a sandbox
that is gone.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping

Attachment = tuple[str, str]


class AddsInFlight:
    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._adds: Counter[Attachment] = Counter()

    @contextlib.contextmanager
    def serving(self, env: Mapping[str, str], deadline: float) -> Iterator[bool]:
        """Around serving one request of `env`: an ADD is counted in flight; a DEL first waits
        for the ADDs of its attachment. Yields False when a DEL's ADD was still in flight at
        `deadline` (time.monotonic()), and the DEL is not to be served."""
        command, attachment = env.get("CNI_COMMAND"), _attachment(env)
        if command == "DEL":
            yield self._wait_for_adds(attachment, deadline)
            return
        if command != "ADD":
            yield True
            return
        with self._changed:
            self._adds[attachment] += 1
        try:
            yield True
        finally:
            with self._changed:
                self._adds[attachment] -= 1
                if not self._adds[attachment]:
                    del self._adds[attachment]
                    self._changed.notify_all()

    def _wait_for_adds(self, attachment: Attachment, deadline: float) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: attachment not in self._adds, timeout=max(0.0, deadline - time.monotonic())
            )


def _attachment(env: Mapping[str, str]) -> Attachment:
    return env.get("CNI_CONTAINERID", ""), env.get("CNI_IFNAME", "")
