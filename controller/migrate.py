"""`pyabouts-migrate`: bring whereabouts' allocations into pyabouts' pools, so that a cluster
switches its NADs from whereabouts to pyabouts without re-addressing a pod.

    pyabouts-migrate [--config FLAT_FILE] [--kubeconfig PATH] [-n NAMESPACE] [--dry-run]
                     [-o table|json]

Reads every whereabouts IPPool and NodeSlicePool (whereabouts.cni.cncf.io/v1alpha1) and stores
each allocation, with its pod, interface and container ID, and each node's slice, in the
datastore the flat file names (pyabouts' IPPools by default): decided on one read, written
with compare-and-swap (etcd: transactions of up to 32 blocks, in order; IPPools: one object
at a time), so a run cut short may leave part written, which running it again completes.
Running it again changes nothing else. When pyabouts already gives one of the addresses to
somebody else, it names each such address and writes nothing more (nothing at all, unless a
write of its own lost a race with a node first).

Exit codes: 0 done (or nothing to do), 1 refused (conflicts), 2 could not read or write.
The switch-over runbook is docs/migration.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence

import urllib3
from kubernetes.client.exceptions import ApiException

from pyabouts.controller.connect import connect_operator
from pyabouts.controller.pods import PodReader
from pyabouts.controller.text_tables import format_table
from pyabouts.controller.whereabouts_pools import (
    Read,
    WhereaboutsPoolError,
    holdings_of,
    read_whereabouts,
)
from pyabouts.ipam.errors import CniError
from pyabouts.ipam.migration import (
    Conflict,
    Holding,
    MigrationConflictError,
    Result,
    bring_over,
)
from pyabouts.ipam.pool import Block, Owner, PoolId, PoolView
from pyabouts.ipam.slices import SLICE_IFNAME, is_registry
from pyabouts.ipam.store import PoolStore
from pyabouts.ipam.stores.kubeconfig import DEFAULT_NAMESPACE
from pyabouts.ipam.transaction import Span, describe_blocks, run_span_transaction

log = logging.getLogger("pyabouts.migrate")

DEADLINE = 120.0  # seconds for the transaction, conflicts with running nodes included
EXIT_REFUSED = 1
EXIT_FAILED = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pyabouts-migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config",
        help="the nodes' flat file (datastore settings); default: the plugin's search order",
    )
    parser.add_argument(
        "--kubeconfig",
        help="default: $KUBECONFIG, else ~/.kube/config, else the flat file's, else in-cluster",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        default=DEFAULT_NAMESPACE,
        help="of pyabouts' IPPools (default: %(default)s, where deploy/ puts them)",
    )
    parser.add_argument("--dry-run", action="store_true", help="report what it would do")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level="WARNING", stream=sys.stderr, format="%(levelname)s: %(message)s")
    sys.exit(run(args))


def run(args: argparse.Namespace) -> int:
    """One migration; the exit code. Errors are one line on stderr."""
    try:
        connections = connect_operator(args.config, args.kubeconfig, args.namespace)
    except CniError as error:
        return _fail(error.msg)
    try:
        pools, slice_pools = read_whereabouts(connections.api_client)
        # Listed after the pools were read: a pod missing here is gone (see bring_over), and so
        # is a finished one, whose address pyabouts' reconciler frees (a whereabouts frozen at
        # step 2 kept it).
        pods = PodReader(connections.api_client).list_all().pods
        live_pods = {ref: pod.node for ref, pod in pods.items() if not pod.finished}
        read = holdings_of(pools, slice_pools, {ref: pod.node for ref, pod in pods.items()})
        results = store_holdings(
            connections.store, read.holdings, dry_run=args.dry_run, live_pods=live_pods
        )
    except WhereaboutsPoolError as error:
        return _fail(
            "cannot read whereabouts' pools, nothing changed:\n  " + "\n  ".join(error.problems)
        )
    except MigrationConflictError as error:
        _print_conflicts(error, args.output)
        return EXIT_REFUSED
    except CniError as error:
        return _fail(f"the datastore: {error.msg}")
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        return _fail(f"the Kubernetes API: {str(exc).strip()}")
    finally:
        connections.close()
    _print_results(read, results, dry_run=args.dry_run, output=args.output)
    return 0


def store_holdings(
    store: PoolStore,
    holdings: Sequence[Holding],
    *,
    dry_run: bool,
    live_pods: Mapping[str, str] | None = None,
) -> list[tuple[Holding, Result]]:
    """Bring `holdings` over in one transaction (a dry run only reads). `live_pods`: the node
    of each pod ("namespace/name") not finished (see bring_over).

    Raises MigrationConflictError, `after_a_write` when a write of this run came before (one
    that lost a race with a node part way may have stored part); a CniError of the store says
    so too."""
    bounds: dict[PoolId, tuple[int, int]] = {}
    for h in holdings:
        first, last = bounds.get(h.pool, (h.address, h.address))
        bounds[h.pool] = (min(first, h.address), max(last, h.address))
    # Slice registries first: the write follows the spans' order, and on IPPools, block by
    # block, a node's slice must be stored before addresses in it (transaction._in_span_order).
    ordered = sorted(bounds.items(), key=lambda item: (not is_registry(item[0]), item[0]))
    spans = [Span(pool, first, last) for pool, (first, last) in ordered]
    ranges = list({h.range: None for h in holdings})
    writes = 0

    def decide(view: PoolView) -> list[tuple[Holding, Result]]:
        try:
            return bring_over(view, holdings, dry_run=dry_run, live_pods=live_pods)
        except MigrationConflictError as error:
            error.after_a_write = writes > 0
            raise

    def before_write(changed: list[Block]) -> None:
        nonlocal writes
        writes += 1
        describe_blocks(changed, ranges)

    try:
        return run_span_transaction(
            store, spans, decide, deadline=time.monotonic() + DEADLINE, before_write=before_write
        )
    except CniError as error:
        if not writes:
            raise
        partly = f"{error.msg} (after a write of this run: part may be written; run it again)"
        raise CniError(error.code, partly, error.details) from error


def _fail(message: str) -> int:
    print(f"pyabouts-migrate: {message}", file=sys.stderr)
    return EXIT_FAILED


def holding_document(holding: Holding) -> dict[str, str]:
    owner = holding.owner
    return {
        "kind": "slice" if holding.sliced is not None else "address",
        "network": _network(holding),
        "address": holding.text,
        "pod": owner.pod,
        "ifname": owner.ifname,
        "containerID": "" if holding.sliced is not None else owner.container_id,
        "node": owner.node,
        "from": holding.source,
    }


def _network(holding: Holding) -> str:
    if holding.sliced is not None:
        return holding.sliced.range.pool.network
    return holding.pool.network


def _print_results(
    read: Read, results: Sequence[tuple[Holding, Result]], *, dry_run: bool, output: str
) -> None:
    counts = Counter(result for _, result in results)
    added, present, gone, elsewhere = (
        counts[r] for r in (Result.ADDED, Result.PRESENT, Result.POD_GONE, Result.POD_ELSEWHERE)
    )
    if output == "json":
        document = {
            "dryRun": dry_run,
            "objectsRead": read.objects,
            "added": added,
            "present": present,
            "podGone": gone,
            "podElsewhere": elsewhere,
            "holdings": [
                {"result": result.value, **holding_document(holding)} for holding, result in results
            ],
            "notes": read.notes,
        }
        print(json.dumps(document, indent=2))
        return
    verb = "to add" if dry_run else "added"
    rows = [
        [
            verb if result is Result.ADDED else result.value,
            *_row(holding_document(holding)),
        ]
        for holding, result in results
    ]
    headers = ["RESULT", "KIND", "NETWORK", "ADDRESS", "POD", "IFNAME", "CONTAINER", "NODE", "FROM"]
    if rows:
        print(format_table(headers, rows))
    summary = (
        f"{read.objects} whereabouts object(s) read: {added} {verb}, {present} already present, "
        f"{gone} left out (pod gone)"
        + (f", {elsewhere} left out (pod on another node)" if elsewhere else "")
    )
    print(summary + (" (dry run: nothing written)" if dry_run else ""))
    for note in read.notes:
        print(f"note: {note}")


def _row(document: dict[str, str]) -> list[str]:
    keys = ("kind", "network", "address", "pod", "ifname", "containerID", "node", "from")
    cells = [document[k] or "-" for k in keys]
    cells[5] = cells[5][:12]  # a container ID reads like `crictl ps` shows it
    return cells


def _print_conflicts(error: MigrationConflictError, output: str) -> None:
    conflicts = error.conflicts
    lines = [_describe_conflict(c) for c in conflicts]
    if output == "json":
        document = {
            "refused": True,
            "partlyWritten": error.after_a_write,
            "conflicts": [
                {
                    **holding_document(c.holding),
                    "heldBy": {
                        "pod": c.holder.pod,
                        "ifname": c.holder.ifname,
                        "containerID": c.holder.container_id,
                        "node": c.holder.node,
                        "in": c.held_in,
                    },
                }
                for c in conflicts
            ],
        }
        print(json.dumps(document, indent=2))
    changed = (
        "part may be written (a write of this run lost a race with a node first; what it "
        "stored is whereabouts' own holdings)"
        if error.after_a_write
        else "nothing changed"
    )
    print(
        f"pyabouts-migrate: refused, {changed}: {len(conflicts)} address(es) held by "
        "somebody else:\n  " + "\n  ".join(lines),
        file=sys.stderr,
    )


def _describe_conflict(conflict: Conflict) -> str:
    holding, holder = conflict.holding, conflict.holder
    what = "slice" if holding.sliced is not None else "address"
    return (
        f"{what} {holding.text} (network_name {_network(holding)!r}): {holding.source} gives it "
        f"to {_who(holding.owner)}, but {conflict.held_in} gives it to {_who(holder)}"
    )


def _who(owner: Owner) -> str:
    if owner.ifname == SLICE_IFNAME:
        return f"node {owner.node}"
    pod = owner.pod or f"container {owner.container_id}"
    return f"{pod} {owner.ifname} (container {owner.container_id[:12]})"


if __name__ == "__main__":
    main()
