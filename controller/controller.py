"""The reconciler as a controller: reacts to pod deletions within seconds, with full passes as the
backstop, under a leader Lease so that several replicas are safe.

The pod watch runs in its own thread and feeds a queue. The control loop takes what the watch
says: a deleted (or finished) pod gets a targeted pass over that pod's allocations once its
kubelet has stopped it and --gone-grace has passed (leaks.PodState.stopped_by), and so does a
pod the taint manager deleted, with --node-lost-grace, once it is still there that long past the
end of its grace period (see leaks.judge); a relisting (after "410 Gone") or the resync timer
gets a full pass. A pod whose address a full pass finds leaked but no event said was gone is
freed by a full pass once --stop-grace and --gone-grace have passed since
(leaks.found_leak_wait).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from pyabouts.controller.connect import Connections
from pyabouts.controller.leaks import (
    DEFAULT_GONE_GRACE_SECONDS,
    DEFAULT_STOP_GRACE_SECONDS,
    SANDBOX_MAY_REMAIN,
    Leak,
    PodState,
    Policy,
    found_leak_wait,
)
from pyabouts.controller.metrics import ReconcilerMetrics
from pyabouts.controller.pods import PodReader
from pyabouts.controller.reconciler import reconcile
from pyabouts.controller.watching import PodEvent, PodWatch, Relisted
from pyabouts.ipam.errors import CniError
from pyabouts.serving.endpoints import Health, serve_endpoints

log = logging.getLogger(__name__)

LEASE_WATCH_SECONDS = 0.25  # how often the leader's watchdog looks at its last renewal

SETTLE_SECONDS = 0.3  # gather a burst of deletions into one targeted pass
# Every pass reads the whole store (its blocks of all pools): under steady pod churn, passes
# back to back would read it several times a second. A targeted pass starts no sooner than
# this after the targeted pass before began; the pods due meanwhile wait for it (their graces
# are 10 s and more: this adds little to when their addresses are freed).
TARGETED_PASS_EVERY_SECONDS = 5.0
# A targeted pass that failed (the API busy, say) is made again this much later: no event
# brings its pods back.
RETRY_SECONDS = 5.0


class Controller:
    def __init__(
        self,
        connections: Connections,
        policy: Policy,
        *,
        resync: float,
        gone_grace: float = DEFAULT_GONE_GRACE_SECONDS,
        stop_grace: float = DEFAULT_STOP_GRACE_SECONDS,
    ) -> None:
        self._store = connections.store
        self._reader = PodReader(connections.api_client)
        self._watch = PodWatch(connections.api_client, self._reader)
        self._policy = policy
        self._resync = resync
        self._gone_grace = gone_grace
        self._stop_grace = stop_grace
        self._last_targeted = -float("inf")  # when the last targeted pass began (monotonic)
        self._events: queue.Queue[PodEvent | Relisted] = queue.Queue()
        self.metrics = ReconcilerMetrics()
        self.health = Health(stale_after=max(60.0, 3 * resync))
        self.stop = threading.Event()
        self.leading = threading.Event()
        # Pods the taint manager deleted -> when a pass may find them lost (epoch seconds), and
        # the UID of the pod of that name that is: the pass judges only its addresses.
        self._lost_at: dict[str, tuple[float, str]] = {}
        # Pods the watch saw deleted or finished -> when a pass may judge them (epoch seconds);
        # until then every pass spares their addresses.
        self._gone_at: dict[str, float] = {}
        # The UIDs of the pods of that name seen gone: a pod of that name created again and
        # gone again (a StatefulSet's) has a grace of its own, counted from its own end, and
        # the pass judges only the addresses of these (see _not_awaited).
        self._gone_uids: dict[str, set[str]] = {}
        # Pods a full pass found leaked that no watch event had said were gone (deleted while
        # the pass read the store, in a gap of the watch, before this replica led), by name and
        # UID -> when a full pass may free them (epoch seconds): their kubelet may still run
        # them, or be tearing the sandbox down (see leaks.found_leak_wait).
        self._found_at: dict[tuple[str, str], float] = {}

    def run(self) -> None:
        """Watch and reconcile until `stop` is set."""
        threading.Thread(target=self._feed, name="pod-watch", daemon=True).start()
        # The watch starts with a listing (Relisted), which brings the first full pass.
        next_full = time.monotonic() + self._resync
        while not self.stop.is_set():
            self.health.beat()
            wait = min(5.0, next_full - time.monotonic(), self._until_due())
            try:
                event = self._events.get(timeout=max(0.1, wait))
            except queue.Empty:
                event = None
            if isinstance(event, Relisted):  # the listing is what is, events may be lost
                self._lost_at = {}
                for pod in event.listing.pods.values():
                    self._note_lost(pod)
            elif event is not None:
                self._note_lost(event.pod, deleted=event.kind == "DELETED")
                if _may_have_leaked(event):
                    self._note_gone(event.pod)
            if isinstance(event, Relisted) or time.monotonic() >= next_full:
                # A failed pass waits for the resync, whatever it left to judge again.
                wait = self._resync
                if self._pass("full", None):
                    wait = min(wait, max(SETTLE_SECONDS, self._until_found_due()))
                next_full = time.monotonic() + wait
                self.health.beat(ready=True)
                continue
            if (due := self._due()) and not self._pass("targeted", set(due), awaited=due):
                retry = time.time() + RETRY_SECONDS
                for ref, uids in due.items():  # spared by full passes meanwhile
                    self._gone_at.setdefault(ref, retry)
                    self._gone_uids.setdefault(ref, set()).update(uids)

    def _feed(self) -> None:
        try:
            for event in self._watch.events(self.stop):
                self._events.put(event)
        except Exception:  # a bug: stop, so that the process exits and is restarted
            log.exception("pod watch failed")
            self.stop.set()

    def _note_gone(self, pod: PodState) -> None:
        """Judge `pod`'s addresses once the gone grace has passed since its kubelet stopped its
        containers (PodState.stopped_by), as of the first event that said it was deleted or
        finished (later ones of the same pod change nothing)."""
        uids = self._gone_uids.setdefault(pod.ref, set())
        if pod.ref not in self._gone_at or pod.uid not in uids:
            # Never sooner than a pod of that name already awaited: the pass judges them all
            # (a force-deleted one may run for its whole grace, while the pod created again in
            # its place failed at once).
            due = pod.stopped_by(time.time()) + self._gone_grace
            self._gone_at[pod.ref] = max(due, self._gone_at.get(pod.ref, due))
            uids.add(pod.uid)

    def _note_lost(self, pod: PodState, *, deleted: bool = False) -> None:
        """Remember when a pod the taint manager deleted may be found lost, if it still is."""
        lost_at = None if deleted else pod.lost_since(self._policy)
        if lost_at is not None:
            self._lost_at[pod.ref] = (lost_at, pod.uid)
        else:
            self._lost_at.pop(pod.ref, None)

    def _until_due(self) -> float:
        """Seconds until the next targeted pass: SETTLE_SECONDS after the first pod is due, so
        that one pass takes a burst, and TARGETED_PASS_EVERY_SECONDS after the last one began
        at the soonest. (Full passes do not count: they spare the pods awaited, and a short
        --resync would else hold the targeted passes back for good.)"""
        lost = (at for at, _ in self._lost_at.values())
        first = min([*lost, *self._gone_at.values()], default=float("inf"))
        after_last = self._last_targeted + TARGETED_PASS_EVERY_SECONDS - time.monotonic()
        return max(first + SETTLE_SECONDS - time.time(), after_last)

    def _until_found_due(self) -> float:
        """Seconds until a full pass may free what the last ones left (see _found_at)."""
        first = min(self._found_at.values(), default=float("inf"))
        return first + SETTLE_SECONDS - time.time()

    def _defers(self, leak: Leak, now: float) -> bool:
        """Whether a full pass at `now` leaves `leak` for later (see _found_at)."""
        if leak.reason not in SANDBOX_MAY_REMAIN:
            return False
        key = (leak.owner.pod, leak.owner.pod_uid)
        due = self._found_at.setdefault(
            key, now + found_leak_wait(leak, self._gone_grace, self._stop_grace)
        )
        return now < due

    def _due(self) -> dict[str, set[str]]:
        """The pods to judge now (taken out of what is waiting), once the first is
        SETTLE_SECONDS due, none before; each with the UIDs of the pods of that name whose
        grace has passed (a lost pod's counts from its own deletion), whose addresses alone
        the pass judges: another pod of that name gone may still be in its grace."""
        if self._until_due() > 0:
            return {}
        now = time.time()
        due: dict[str, set[str]] = {}
        for ref in [ref for ref, (at, _) in self._lost_at.items() if at <= now]:
            _, uid = self._lost_at.pop(ref)
            due[ref] = {uid}
        for ref in [ref for ref, at in self._gone_at.items() if at <= now]:
            del self._gone_at[ref]
            due[ref] = due.get(ref, set()) | self._gone_uids.pop(ref, set())
        return due

    @staticmethod
    def _not_awaited(leak: Leak, awaited: dict[str, set[str]]) -> bool:
        """Whether a targeted pass leaves `leak` for later: an address of a pod of a name it
        judges, but of none of the pods whose grace has passed (one created again meanwhile
        and gone too before the watch's event said so: its own grace has not begun; another
        pod of a lost pod's name). An entry that recorded no UID is judged as before."""
        uids = awaited.get(leak.owner.pod)
        return (
            leak.reason in SANDBOX_MAY_REMAIN
            and uids is not None
            and leak.owner.pod_uid != ""
            and leak.owner.pod_uid not in uids
        )

    def _pass(
        self, kind: str, refs: set[str] | None, awaited: dict[str, set[str]] | None = None
    ) -> bool:
        """One pass (targeted: of the pods `refs`, sparing the pods of other UIDs than
        `awaited` names for each); whether it ran to its end."""
        if refs is not None:
            self._last_targeted = time.monotonic()
        try:
            if refs is None:
                now = time.time()
                summary = reconcile(
                    self._store,
                    lambda: self._reader.list_all().pods,
                    self._policy,
                    spared=set(self._gone_at),
                    list_nodes=self._reader.node_names,
                    list_statefulsets=self._reader.statefulsets,
                    defer=lambda leak: self._defers(leak, now),
                )
                waiting = {(leak.owner.pod, leak.owner.pod_uid) for leak in summary.deferred}
                self._found_at = {k: at for k, at in self._found_at.items() if k in waiting}
            else:
                summary = reconcile(
                    self._store,
                    lambda: self._read_pods(refs),
                    self._policy,
                    only_pods=refs,
                    list_statefulsets=self._reader.statefulsets,
                    defer=lambda leak: self._not_awaited(leak, awaited or {}),
                )
        except (CniError, ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.error("%s pass failed: %s", kind, exc)
            self.metrics.errors.inc()
            return False
        self.metrics.record_pass(kind, summary)
        if summary.failed:  # the rest freed; these are freed by a later pass
            self.metrics.errors.inc()
        return True

    def _read_pods(self, refs: set[str]) -> dict[str, PodState]:
        """The pods named `refs` that exist now (read after the store's snapshot)."""
        found = {ref: self._reader.read(ref) for ref in sorted(refs)}
        return {ref: pod for ref, pod in found.items() if pod is not None}


def _may_have_leaked(event: PodEvent | Relisted) -> bool:
    if isinstance(event, Relisted):
        return False
    pod = event.pod
    return event.kind == "DELETED" or pod.finished


def run_controller(connections: Connections, policy: Policy, args: argparse.Namespace) -> None:
    """The controller process: endpoints, then (as leader, unless disabled) the control loop."""
    controller = Controller(
        connections,
        policy,
        resync=args.resync,
        gone_grace=args.gone_grace,
        stop_grace=args.stop_grace,
    )
    serve_endpoints(args.listen, controller.metrics.registry, controller.health)
    if args.no_leader_election:
        controller.metrics.leader.set(1)
        controller.run()
        return
    identity = args.identity or f"{socket.gethostname()}-{os.getpid()}"
    api = k8s.CoordinationV1Api(connections.api_client)
    # Each Lease call within half the renew deadline: a call left hanging (a connection
    # half-open after a failover) would else keep the election from ever seeing it fail.
    lock = CheckedLeaseLock(
        args.lease_name, connections.namespace, identity, api, timeout=args.renew_deadline / 2
    )

    def lead() -> None:
        log.info("%s leads (Lease %s/%s)", identity, connections.namespace, args.lease_name)
        controller.leading.set()
        controller.metrics.leader.set(1)
        # The election's renew loop may try a last time just before its deadline, and that try
        # may take two slow calls: the watchdog stops this replica once its Lease went
        # unrenewed for the renew deadline and a retry, before another replica may take it.
        lapse = args.renew_deadline + args.retry_period
        watchdog = threading.Thread(
            target=stop_when_lease_lapses,
            args=(lock, controller.stop, lapse, _exit_at_once),
            name="lease-watchdog",
            daemon=True,
        )
        watchdog.start()
        controller.run()
        # The loop stopped (its watch failed): give the Lease up rather than renew it for nothing.
        raise RuntimeError("the control loop stopped")

    def stop_leading() -> None:
        # Leadership lost: another replica may act now, so this one stops at once; its
        # Deployment starts it again as a follower.
        log.warning("%s no longer leads: exiting", identity)
        controller.stop.set()
        controller.metrics.leader.set(0)
        sys.exit(1)

    stand_by = threading.Thread(target=_stand_by, args=(controller, lock), name="stand-by")
    stand_by.daemon = True
    stand_by.start()
    config = electionconfig.Config(  # type: ignore[no-untyped-call]
        lock,
        lease_duration=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry_period=args.retry_period,
        onstarted_leading=lead,
        onstopped_leading=stop_leading,
    )
    leaderelection.LeaderElection(config).run()  # type: ignore[no-untyped-call]


def stop_when_lease_lapses(
    lock: CheckedLeaseLock, stop: threading.Event, lapse: float, exit_now: Callable[[str], None]
) -> None:
    """Until `stop`: once the Lease has gone unrenewed for `lapse` seconds, `exit_now`."""
    while not stop.wait(LEASE_WATCH_SECONDS):
        unrenewed = time.monotonic() - lock.renewed_at
        if unrenewed > lapse:
            exit_now(
                f"the Lease {lock.namespace}/{lock.name} went unrenewed for {unrenewed:.1f} s: "
                "this replica stops before another may take it"
            )
            return


def _exit_at_once(why: str) -> None:
    """Stop acting now, a pass under way included: the Deployment starts it again."""
    log.error("%s", why)
    logging.shutdown()
    os._exit(1)


def _stand_by(controller: Controller, lock: CheckedLeaseLock) -> None:
    """A follower is alive, and ready once it has read its Lease: it stands by to take over. One
    the API refuses its Lease is not ready: it could never act."""
    while not controller.leading.is_set() and not controller.stop.is_set():
        consulted = lock.consulted.is_set()
        controller.health.beat(ready=consulted and lock.refused is None)
        controller.stop.wait(5 if consulted else 0.2)


class CheckedLeaseLock(LeaseLock):
    """The client's LeaseLock, telling whether the API refuses this replica its Lease (401 or
    403 on reading, creating or updating it). The election only logs that at INFO and tries
    again for ever, so a replica without the right (another --lease-name and no Role for it,
    say) stood by as ready and never acted."""

    def __init__(
        self, name: str, namespace: str, identity: str, api: object, *, timeout: float
    ) -> None:
        super().__init__(name, namespace, identity)  # type: ignore[no-untyped-call]
        self.consulted = threading.Event()  # the API answered about the Lease once, somehow
        # Why the API refuses it the Lease, by kind of call ("read", "write"), while it does.
        # Each try of the election reads the Lease before it writes, so a read that succeeds
        # says nothing of the right to write: a refused write stands until a write succeeds.
        self._refusals: dict[str, str] = {}
        # When a write of the Lease last succeeded (time.monotonic()): its holder's last renewal.
        self.renewed_at = float("-inf")
        # Duck-typed: it answers the calls LeaseLock makes, as `api` does.
        self.api_instance = cast(
            k8s.CoordinationV1Api, _AnswersNoted(api, self._note, timeout=timeout)
        )

    @property
    def refused(self) -> str | None:
        """Why the API refuses this replica its Lease, or None while it does not."""
        # A copy taken at once (under the GIL): the election's thread changes the dict.
        refusals = tuple(self._refusals.values())
        return refusals[0] if refusals else None

    def _note(self, call: str, failure: ApiException | None) -> None:
        """What the API's answer to one call about the Lease says: a refusal, or not."""
        kind = "read" if call.startswith("read_") else "write"
        if failure is None and kind == "write":
            self.renewed_at = time.monotonic()
        status = failure.status if failure is not None else None
        if failure is None or status not in (401, 403):
            self._refusals.pop(kind, None)
        else:
            refused = f"{status} {failure.reason}"
            if self._refusals.get(kind) != refused:
                log.error(
                    "the API refuses this replica the Lease %s/%s (%s on %s): it cannot lead, "
                    "and is not ready, until its ServiceAccount may get, create and update it "
                    "(deploy/reconciler/rbac.yaml grants the Lease named pyabouts-reconciler "
                    "alone)",
                    self.namespace,
                    self.name,
                    refused,
                    call,
                )
            self._refusals[kind] = refused
        self.consulted.set()


class _AnswersNoted:
    """The Lease API as LeaseLock calls it, each call's refusal or success told to `note`
    (LeaseLock itself swallows the exceptions), and each call given up after `timeout`
    seconds as failed: LeaseLock takes only an ApiException for a failure, and anything else
    would end the election's thread."""

    def __init__(
        self, api: object, note: Callable[[str, ApiException | None], None], *, timeout: float
    ) -> None:
        self._api = api
        self._note = note
        self._timeout = timeout

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._api, name)
        if not callable(call):
            return call

        def noted(*args: Any, **kwargs: Any) -> Any:
            try:
                answer = call(*args, _request_timeout=self._timeout, **kwargs)
            except ApiException as exc:
                self._note(name, exc)
                raise
            except (urllib3.exceptions.HTTPError, OSError) as exc:  # no answer: nothing to note
                raise ApiException(status=0, reason=f"no answer: {exc}") from exc
            self._note(name, None)
            return answer

        return noted
