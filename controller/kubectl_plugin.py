"""`kubectl pyabouts`: see and free what pyabouts holds (a kubectl plugin: `kubectl-pyabouts`
on PATH; the same program runs standalone).

    kubectl pyabouts pools                                  # usage of every pool
    kubectl pyabouts who ADDRESS                            # who holds it, and is that pod there
    kubectl pyabouts pod NAMESPACE/NAME                     # every address a pod holds
    kubectl pyabouts release ADDRESS [--network NAME] [--force] [--dry-run]

Each takes -o table (default), json or yaml; --kubeconfig (else $KUBECONFIG, else
~/.kube/config, else the flat file's, else in-cluster); -n, the namespace of pyabouts'
IPPools (kube-system); and --config FLAT_FILE for the datastore the nodes use (etcd, say).
Errors are one line on stderr with exit code 1 (refused, or nothing there) or 2 (could not
read or write).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import netaddr
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException

from pyabouts.controller.connect import Connections, connect_operator
from pyabouts.controller.pods import PodReader
from pyabouts.controller.text_tables import format_table
from pyabouts.ipam.errors import CniError
from pyabouts.ipam.pool import Block, PoolView
from pyabouts.ipam.pool_report import (
    Holding,
    PoolUsage,
    holdings_at,
    holdings_of_pod,
    pool_usage,
)
from pyabouts.ipam.ranges import RangeError, parse_address
from pyabouts.ipam.stores.kubeconfig import DEFAULT_NAMESPACE
from pyabouts.ipam.transaction import Span, run_span_transaction

EXIT_REFUSED = 1
EXIT_FAILED = 2
DEADLINE = 30.0  # seconds for a release, conflicts included


class RefusedError(Exception):
    """What the operator asked cannot or must not be done; nothing was changed."""


Document = dict[str, Any]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    common.add_argument("--kubeconfig")
    common.add_argument(
        "-n",
        "--namespace",
        default=DEFAULT_NAMESPACE,
        help="of pyabouts' IPPools (default: %(default)s)",
    )
    common.add_argument("--config", help="the nodes' flat file (datastore settings)")
    parser = argparse.ArgumentParser(prog="kubectl pyabouts", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("pools", parents=[common], help="usage of every pool")
    who = commands.add_parser("who", parents=[common], help="who holds an address")
    who.add_argument("address")
    pod = commands.add_parser("pod", parents=[common], help="every address a pod holds")
    pod.add_argument("pod", metavar="NAMESPACE/NAME")
    release = commands.add_parser("release", parents=[common], help="free an address")
    release.add_argument("address")
    release.add_argument("--network", help="its network_name, when several pools give it")
    release.add_argument("--force", action="store_true", help="even while its pod exists")
    release.add_argument("--dry-run", action="store_true", help="say what it would free")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(parse_args(argv)))


def run(args: argparse.Namespace) -> int:
    try:
        connections = connect_operator(args.config, args.kubeconfig, args.namespace)
    except CniError as error:
        return _fail(error.msg, EXIT_FAILED)
    try:
        documents, table = COMMANDS[args.command](connections, args)
    except RefusedError as refused:
        return _fail(str(refused), EXIT_REFUSED)
    except CniError as error:
        return _fail(f"the datastore: {error.msg}", EXIT_FAILED)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        return _fail(f"the Kubernetes API: {str(exc).strip()}", EXIT_FAILED)
    finally:
        connections.close()
    if args.output == "json":
        print(json.dumps(documents, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(documents, sort_keys=False), end="")
    else:
        print(table)
    return 0


def _fail(message: str, code: int) -> int:
    print(f"kubectl pyabouts: {message}", file=sys.stderr)
    return code


def _readable_blocks(connections: Connections) -> list[Block]:
    """Every stored block, for a listing: one not in pyabouts' format is left out with a
    warning on stderr, and the others are shown (release reads them all, or refuses)."""

    def warn(problem: CniError) -> None:
        print(f"kubectl pyabouts: warning: left out: {problem.msg}", file=sys.stderr)

    return connections.store.read_all_blocks(on_unreadable=warn)


# ---- pools


def show_pools(connections: Connections, args: argparse.Namespace) -> tuple[Any, str]:
    rows = pool_usage(_readable_blocks(connections), now=int(time.time()))
    documents = [_pool_document(row) for row in rows]
    headers = ["NETWORK", "FAMILY", "RANGE", "TOTAL", "USED", "RESERVED", "COOLING", "FREE"]
    headers += ["BLOCKS"]
    headers += ["SLICES"]
    table = format_table(
        headers,
        [
            [
                d["network"] or "-",
                f"IPv{d['family']}",
                ",".join(d["ranges"]) or "-",
                str(d["total"]),
                str(d["used"]),
                str(d["reserved"]),
                str(d["cooling"]),
                str(d["free"]),
                str(d["blocks"]),
                _slices_cell(d),
            ]
            for d in documents
        ],
    )
    return documents, table


def _pool_document(row: PoolUsage) -> Document:
    document: Document = {
        "network": row.pool.network,
        "family": row.pool.family,
        "ranges": sorted(row.ranges),
        "total": row.total,
        "used": row.used,
        "reserved": row.reserved,
        "cooling": row.cooling,
        "free": row.free,
        "blocks": row.blocks,
    }
    if row.slice_sizes:
        document["nodeSlices"] = {
            "size": ",".join(sorted(row.slice_sizes)),
            "held": row.slices_held,
            "total": row.slices_total,
        }
    return document


def _slices_cell(document: Document) -> str:
    slices = document.get("nodeSlices")
    return f"{slices['held']}/{slices['total']} of {slices['size']}" if slices else "-"


# ---- who, pod


def show_who(connections: Connections, args: argparse.Namespace) -> tuple[Any, str]:
    address = _address(args.address)
    found = holdings_at(_readable_blocks(connections), address)
    if not found:
        raise RefusedError(f"{address} is not allocated in any pool")
    return _holdings_output(connections, found)


def show_pod(connections: Connections, args: argparse.Namespace) -> tuple[Any, str]:
    namespace, _, name = args.pod.partition("/")
    if not (namespace and name):
        raise RefusedError(f"{args.pod!r} is not NAMESPACE/NAME")
    found = holdings_of_pod(_readable_blocks(connections), args.pod)
    if not found:
        raise RefusedError(f"pod {args.pod} holds no address")
    return _holdings_output(connections, found)


def _holdings_output(connections: Connections, found: Sequence[Holding]) -> tuple[Any, str]:
    pods = _pod_lookup(connections)
    documents = [_holding_document(h, pods(h)) for h in found]
    headers = ["ADDRESS", "NETWORK", "POD", "POD UID", "IFNAME", "CONTAINER", "NODE"]
    headers += ["ALLOCATED", "POD EXISTS", "STATE"]
    rows = [
        [
            d["address"],
            d["network"] or "-",
            d["pod"] or "-",
            d["podUID"] or "-",
            d["ifname"],
            d["containerID"][:12] or "-",
            d["node"] or "-",
            d["allocated"] or "-",
            d["podExists"],
            _state(d),
        ]
        for d in documents
    ]
    return documents, format_table(headers, rows)


def _pod_lookup(connections: Connections) -> Callable[[Holding], str]:
    """Whether each holding's pod is there: "yes", "no", "re-created" (a pod of that name with
    another UID), or "-" (no pod recorded)."""
    reader = PodReader(connections.api_client)
    cache: dict[str, Any] = {}

    def exists(holding: Holding) -> str:
        ref = holding.owner.pod
        if not ref:
            return "-"
        if ref not in cache:
            cache[ref] = reader.read(ref)
        pod = cache[ref]
        if pod is None:
            return "no"
        uid = holding.owner.pod_uid
        return "re-created" if uid and not pod.has_uid(uid) else "yes"

    return exists


def _holding_document(holding: Holding, pod_exists: str) -> Document:
    owner = holding.owner
    return {
        "address": holding.text,
        "network": holding.pool.network,
        "family": holding.pool.family,
        "pod": owner.pod,
        "podUID": owner.pod_uid,
        "ifname": owner.ifname,
        "containerID": owner.container_id,
        "node": owner.node,
        "cniNetwork": owner.cni_network,
        "allocated": _time(owner.allocated_at),
        "coolingUntil": _time(owner.cooling_until),
        "reserved": owner.reserved,
        "podExists": pod_exists,
    }


def _state(document: Document) -> str:
    if document["coolingUntil"]:
        ended = document["coolingUntil"] <= _time(int(time.time()))  # RFC 3339 sorts as text
        return f"{'rested' if ended else 'resting'} until {document['coolingUntil']}"
    return "reserved" if document["reserved"] else "held"


def _time(seconds: int) -> str:
    """Unix seconds in RFC 3339 (UTC), as kubectl shows times; "" for 0 (not recorded)."""
    if not seconds:
        return ""
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _address(text: str) -> netaddr.IPAddress:
    try:
        return parse_address(text)
    except RangeError as exc:
        raise RefusedError(str(exc)) from exc


# ---- release


def release(connections: Connections, args: argparse.Namespace) -> tuple[Any, str]:
    """Free an address with a compare-and-swap on the exact entry judged; refuse while its pod
    exists (unless --force), and when it is held in several pools and --network names none."""
    address = _address(args.address)
    found = holdings_at(connections.store.read_all_blocks(), address)
    if args.network is not None:
        found = [h for h in found if h.pool.network == args.network]
    if not found:
        where = f" in network {args.network!r}" if args.network is not None else ""
        raise RefusedError(f"{address} is not allocated{where}")
    if len(found) > 1:
        networks = ", ".join(repr(h.pool.network) for h in found)
        raise RefusedError(
            f"{address} is held in several networks ({networks}): pick one, --network"
        )
    (holding,) = found
    pod_exists = _pod_lookup(connections)(holding)
    # A resting or reserved entry holds nothing for a sandbox: no pod uses it now.
    if pod_exists == "yes" and holding.owner.in_use and not args.force:
        raise RefusedError(
            f"{address} is held by pod {holding.owner.pod} ({holding.owner.ifname}), which still "
            "exists: delete the pod, or release it anyway with --force"
        )
    document = _holding_document(holding, pod_exists)
    if not args.dry_run:
        freed = run_span_transaction(
            connections.store,
            [Span(holding.pool, holding.address, holding.address)],
            lambda view: _free_if_unchanged(view, holding),
            deadline=time.monotonic() + DEADLINE,
        )
        if not freed:
            raise RefusedError(f"{address} changed meanwhile (allocated again?): not released")
    verb = "would release" if args.dry_run else "released"
    document["released"] = not args.dry_run
    who = holding.owner.pod or f"container {holding.owner.container_id}"
    return document, f"{verb} {address} (network {holding.pool.network!r}), held by {who}"


def _free_if_unchanged(view: PoolView, holding: Holding) -> bool:
    if view.owner(holding.pool, holding.address) != holding.owner:
        return False
    view.unassign(holding.pool, holding.address)
    return True


COMMANDS: dict[str, Callable[[Connections, argparse.Namespace], tuple[Any, str]]] = {
    "pools": show_pools,
    "who": show_who,
    "pod": show_pod,
    "release": release,
}


if __name__ == "__main__":
    main()
