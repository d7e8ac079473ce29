"""Whether the agent's datastore answers it: what its /readyz says, beside its socket.

An agent that cannot reach its IPPools or etcd (credentials, RBAC, the CRD, the endpoints) must
not be Ready: a DaemonSet's rolling update waits for each node's new agent to be, and would else
carry a release that cannot allocate to every node. What counts is what the datastore did last:
the IPPool watch's list or its break, and each read and write of a request. While it is not
known to answer, a readiness check asks it again (`probe`, one at a time and at most every
PROBE_SECONDS, on a thread of its own, so that the check itself answers at once).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from pyabouts.ipam.errors import StoreBusyError, StoreRefusedError, StoreUnavailableError

log = logging.getLogger(__name__)

PROBE_SECONDS = 2.0


def unreached(error: BaseException) -> bool:
    """True when `error` says the datastore did not answer the agent, or refused it (its
    credentials, its rights, the CRD): out of reach, or not the agent's to use. A busy store, a
    conflict, a block it holds or a request refused for what it carried answered all the
    same: one NAD's request does not make the node's agent unready."""
    if isinstance(error, StoreBusyError):
        return False
    if isinstance(error, StoreRefusedError):
        return not error.content
    return isinstance(error, (StoreUnavailableError, OSError))


class DatastoreHealth:
    """`probe`: a read of the agent's own datastore that raises when it does not answer; None
    where requests name their datastore (a trusting agent), whose state is known only from the
    requests it served, and unknown counts as ready."""

    def __init__(self, probe: Callable[[], object] | None) -> None:
        self._probe = probe
        self._answers: bool | None = None  # None: not known yet
        self._refused_until_probed = False  # see failed(until_probed=True)
        self._lock = threading.Lock()
        self._probing = False
        self._probed_at = -PROBE_SECONDS

    def answered(self) -> None:
        if self._answers is not True:  # logged once a change, not per call
            log.info("the datastore answers")
            self._answers = True

    def failed(self, error: BaseException, *, until_probed: bool = False) -> None:
        """Note `error`, raised by a call to the datastore, if it says the store is unreached;
        with `until_probed`, a refusal (credentials, rights) holds until a probe, which asks
        everything the agent needs, succeeds, whatever other calls answer meanwhile."""
        if unreached(error):
            if self._answers is not False:
                log.warning("the datastore does not answer: %s", getattr(error, "msg", error))
            self._answers = False
            if until_probed and isinstance(error, StoreRefusedError) and self._probe is not None:
                self._refused_until_probed = True

    def ready(self) -> bool:
        answers = self._answers
        if answers is True and not self._refused_until_probed:
            return True
        if self._probe is None:
            return answers is None
        self.probe_soon()
        return False

    def probe_soon(self) -> None:
        """Ask the datastore on a thread of its own, unless a probe is running or ran lately."""
        if self._probe is None:
            return
        with self._lock:
            now = time.monotonic()
            if self._probing or now - self._probed_at < PROBE_SECONDS:
                return
            self._probing, self._probed_at = True, now
        threading.Thread(target=self._run_probe, name="datastore-probe", daemon=True).start()

    def _run_probe(self) -> None:
        assert self._probe is not None
        try:
            self._probe()
        except Exception as exc:  # what it says is the probe's outcome
            self.failed(exc)
            if not unreached(exc):
                log.warning("probing the datastore failed: %s", getattr(exc, "msg", exc))
        else:
            self._refused_until_probed = False
            self.answered()
        finally:
            with self._lock:
                self._probing = False
