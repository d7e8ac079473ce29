"""`pyabouts-reconciler`: give back the addresses of pods that are gone.

    pyabouts-reconciler [--config FLAT_FILE] [--kubeconfig PATH] [--dry-run]   # one pass (CronJob)
    pyabouts-reconciler --watch [--listen :8080] ...                         # the controller

One pass prints a JSON summary on stdout (what was freed and why) and exits 0, or 1 when it
could not finish. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pyabouts.controller.leaks import (
    DEFAULT_GONE_GRACE_SECONDS,
    DEFAULT_PENDING_GRACE,
    DEFAULT_STOP_GRACE_SECONDS,
    SANDBOX_MAY_REMAIN,
    Leak,
    Policy,
    found_leak_wait,
)
from pyabouts.controller.reconciler import PassSummary
from pyabouts.ipam.stores.codec import block_cidr
from pyabouts.serving.listen import listen_argument

if TYPE_CHECKING:
    from pyabouts.controller.connect import Connections

log = logging.getLogger("pyabouts.reconciler")


def _seconds(text: str) -> float:
    """argparse type of a length of time: finite, not negative (a negative grace would free a
    healthy node's evicted pods before their grace period ended)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, 0 or more")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pyabouts-reconciler", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--config",
        help="the nodes' flat file (datastore settings); default: the plugin's search order",
    )
    parser.add_argument("--kubeconfig", help="default: the flat file's, else in-cluster")
    parser.add_argument("--dry-run", action="store_true", help="report leaks, free nothing")
    parser.add_argument(
        "--keep-finished",
        action="store_true",
        help="keep the addresses of Succeeded and Failed pods (freed by default)",
    )
    parser.add_argument(
        "--pending-grace",
        type=float,
        default=DEFAULT_PENDING_GRACE,
        help="seconds a re-created Pending pod without network-status is waited for",
    )
    parser.add_argument(
        "--node-lost-grace",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="free the address of a pod the taint manager deleted this long after its grace "
        "period ended (its node is taken for lost: 60 is enough for a live kubelet to run the "
        "DEL); by default such an address is kept until the pod is gone, since a node cut off "
        "from the API may still run the pod",
    )
    parser.add_argument("--watch", action="store_true", help="run as the controller")
    parser.add_argument(
        "--gone-grace",
        type=_seconds,
        default=DEFAULT_GONE_GRACE_SECONDS,
        metavar="SECONDS",
        help="judge the addresses of a pod this long after its kubelet stopped its containers "
        "(a pod deleted gracefully, at the end of its grace period; force-deleted, its "
        "terminationGracePeriodSeconds after; finished, at once), no sooner: the kubelet tears "
        f"the sandbox down and runs the DEL meanwhile (default: {DEFAULT_GONE_GRACE_SECONDS:g})",
    )
    parser.add_argument(
        "--stop-grace",
        type=_seconds,
        default=DEFAULT_STOP_GRACE_SECONDS,
        metavar="SECONDS",
        help="how long a pod a pass finds gone, with no deletion of it seen (the one pass; the "
        "controller's full passes between watch events), may still run on its node before its "
        "kubelet stops it; --gone-grace is added (default: "
        f"{DEFAULT_STOP_GRACE_SECONDS:g}, Kubernetes' default terminationGracePeriodSeconds; "
        "the controller takes a deleted pod's own from its watch)",
    )
    parser.add_argument(
        "--resync", type=float, default=300.0, help="controller: seconds between full passes"
    )
    parser.add_argument(
        "--listen",
        type=listen_argument,
        default=":8080",
        help="controller: host:port, [ipv6]:port or :port of /metrics, /healthz and /readyz",
    )
    parser.add_argument(
        "--no-leader-election",
        action="store_true",
        help="controller: act without holding the Lease (one replica only)",
    )
    parser.add_argument("--lease-name", default="pyabouts-reconciler")
    parser.add_argument("--identity", help="controller: this replica's name in the Lease")
    parser.add_argument("--lease-duration", type=int, default=15, help="seconds (client-go's)")
    parser.add_argument("--renew-deadline", type=int, default=10, help="seconds")
    parser.add_argument("--retry-period", type=int, default=2, help="seconds")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = parser.parse_args(argv)
    if args.watch and args.dry_run:
        # The controller frees as it goes: a dry run it ignored would free what was only to
        # be reported.
        parser.error("--dry-run is for one pass; the controller (--watch) always frees")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # As a container's PID 1 a process gets no default action for SIGTERM: without a handler,
    # the pod would wait out its whole grace period and be killed. Nothing needs finishing (a
    # pass's frees are single writes, and another replica takes the Lease once it expires).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Heavy imports (kubernetes, pydantic) after argument parsing, so --help stays quick.
    from pyabouts.controller.connect import connect, read_settings  # noqa: PLC0415
    from pyabouts.ipam.errors import CniError  # noqa: PLC0415

    policy = Policy(
        free_finished=not args.keep_finished,
        pending_grace=args.pending_grace,
        node_lost_grace=args.node_lost_grace,
    )
    try:
        connections = connect(read_settings(args.config), args.kubeconfig)
    except CniError as error:
        log.error("%s", error.msg)
        sys.exit(2)
    try:
        if args.watch:
            from pyabouts.controller.controller import run_controller  # noqa: PLC0415

            run_controller(connections, policy, args)
        else:
            sys.exit(
                run_once(
                    connections,
                    policy,
                    dry_run=args.dry_run,
                    gone_grace=args.gone_grace,
                    stop_grace=args.stop_grace,
                )
            )
    finally:
        connections.close()


def _exit_on_signal(signum: int, frame: object) -> None:
    log.info("signal %d: exiting", signum)
    sys.exit(0)


def run_once(
    connections: Connections,
    policy: Policy,
    *,
    dry_run: bool,
    gone_grace: float,
    stop_grace: float = DEFAULT_STOP_GRACE_SECONDS,
) -> int:
    """One pass, as a CronJob runs it; the exit code. A pod found gone may still run on its
    node (force-deleted: see PodState.stopped_by), and a gone or finished one have its sandbox
    torn down by its kubelet, whose DEL frees the address: its leaks are judged again once
    the longest of their waits has passed (leaks.found_leak_wait), and freed only then."""
    import urllib3  # noqa: PLC0415
    from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

    from pyabouts.controller.pods import PodReader  # noqa: PLC0415
    from pyabouts.controller.reconciler import reconcile  # noqa: PLC0415
    from pyabouts.ipam.errors import CniError  # noqa: PLC0415

    def later(leak: Leak) -> bool:
        return (
            not dry_run
            and leak.reason in SANDBOX_MAY_REMAIN
            and found_leak_wait(leak, gone_grace, stop_grace) > 0
        )

    failures = (CniError, ApiException, urllib3.exceptions.HTTPError, OSError)

    def why(failure: Exception) -> str:
        if isinstance(failure, CniError):
            return failure.msg
        return f"the Kubernetes API: {str(failure).strip()}"

    reader = PodReader(connections.api_client)
    a_pass = functools.partial(
        reconcile,
        connections.store,
        lambda: reader.list_all().pods,
        policy,
        list_nodes=reader.node_names,
        list_statefulsets=reader.statefulsets,
    )
    try:
        summary = a_pass(dry_run=dry_run, defer=later)
    except failures as failure:
        log.error("reconcile failed: %s", why(failure))
        return 1
    if summary.deferred:
        # By UID too: a pod of the same name created again since is not the one that waited.
        deferred = {(leak.owner.pod, leak.owner.pod_uid) for leak in summary.deferred}
        refs = {pod for pod, _ in deferred}
        wait = max(found_leak_wait(leak, gone_grace, stop_grace) for leak in summary.deferred)
        log.info("%d pod(s) gone or finished: judged again in %g s", len(refs), wait)
        time.sleep(wait)
        try:
            # A whole pass again: it gives back the slices their addresses held. Pods found
            # gone only now are left for the next run.
            again = a_pass(
                defer=lambda leak: (
                    later(leak) and (leak.owner.pod, leak.owner.pod_uid) not in deferred
                )
            )
        except failures as failure:
            log.error("judging again failed: %s", why(failure))
            summary = dataclasses.replace(
                summary, failed=[*summary.failed, f"judging again: {why(failure)}"]
            )
        else:
            summary = summary.followed_by(again)
    print(json.dumps(summary_document(summary), indent=2))
    return 1 if summary.failed else 0


def summary_document(summary: PassSummary) -> dict[str, Any]:
    """The exit summary: counts, and every address and node slice freed (or that would be)."""
    listed = summary.leaks if summary.dry_run else summary.freed
    return {
        "dryRun": summary.dry_run,
        "allocations": summary.allocations,
        "pods": summary.pods,
        "leaks": len(summary.leaks),
        "freed": 0 if summary.dry_run else len(summary.freed),
        "seconds": round(summary.seconds, 3),
        "addresses": [
            {
                "ip": leak.ip,
                "network": leak.key.pool.network,
                "pod": leak.owner.pod,
                "podUID": leak.owner.pod_uid,
                "containerID": leak.owner.container_id,
                "ifname": leak.owner.ifname,
                "reason": leak.reason.value,
            }
            for leak in listed
        ],
        "nodeSlicesFreed": [
            {"network": s.network, "slice": s.slice, "node": s.node} for s in summary.slices_freed
        ],
        # Stored blocks that held nothing, deleted (that would be, in a dry run).
        "emptyBlocksDeleted": [
            {"network": key.pool.network, "block": block_cidr(key)}
            for key in summary.blocks_removed
        ],
        # Stored blocks left out, not in pyabouts' format: why, for each.
        "unreadable": summary.unreadable,
        # What failed (a write: a block refused, the datastore down; or the second look), why.
        "failed": summary.failed,
        "summary": summary.describe(),
    }


if __name__ == "__main__":
    main()
