"""What one write costs the control plane: kube-apiserver's and etcd's CPU per update of an
IPPool block, by how many addresses the block holds, against the cheapest update there is (a
Lease's holder) measured in the same run.

    bash bench/run.sh writes [--writes 400] [--rounds 3] [--entries 0,64,128,255]
                             [--watchers 50,200] [--out DIR]

Every ADD or DEL the agent serves ends in such an update (one per batch of them), so this is
the floor under the plugin's cost per call that no work in the agent can lower. The pyabouts
rows are pyabouts' own KubernetesStore writing a block of N owners like the plugin's (a 64-hex
container ID, pod, pod UID, node, network, time); one owner changes per write, so every write
is stored (the owners as a table, one string). One more row per N writes the same owners as
pyabouts stored them before, an object per address, to an IPPool CRD of another group that
declares them as pyabouts' CRD did then (an atomic map), to show what the table saves. With
--watchers, one more row per count writes a block of WATCHED_ENTRIES owners while that many
watches of the IPPools' metadata are open, as every node's agent keeps one (bench.watchers):
what the agents' watch costs kube-apiserver per write grows with the nodes. It reports; it
asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
import timeit
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

import yaml

from bench.kube import running_cluster
from bench.machine import code_commit, describe_machine, load_average
from bench.report import format_machine
from bench.watchers import IPPoolWatchers
from deploy.local.controlplane import KUBE_VERSION, ControlPlane
from pyabouts.ipam.pool import BLOCK_SIZE, Block, BlockKey, Owner, PoolId
from pyabouts.ipam.stores.codec import block_document, block_json, compact_json
from pyabouts.ipam.stores.kube_api import METADATA_ONLY, ApiCredentials, ApiStatusError, KubeApi
from pyabouts.ipam.stores.kubeconfig import read_kubeconfig
from pyabouts.ipam.stores.kubernetes import (
    VERSION,
    KubernetesStore,
    ippool_envelope,
    ippools_path,
    object_name,
)

FIRST_ADDRESS = 10 << 24  # 10.0.0.0
NAMESPACE = "pyabouts-write-cost"
NAME = "write-cost"
SHAPES = ("pyabouts", "object per address")
EARLIER_GROUP = "earlier.pyabouts.io"
# Its own names, so that neither `kubectl get ippools` nor `pypool` finds two kinds meanwhile.
EARLIER_KIND, EARLIER_PLURAL = "EarlierIPPool", "earlierippools"
CRD_FILE = Path(__file__).resolve().parent.parent / "crds" / "ippools.pyabouts.io.yaml"
# The stored form is pyabouts' own; the other, its earlier one, is only measured.
OWN_SHAPE = SHAPES[0]
WATCHED_ENTRIES = 128  # the block of the rows with watchers: half full
SETTLE_S = 0.5  # after a create, for its own work (watch cache, etcd) to end outside the count


@dataclass(frozen=True)
class WriteFigures:
    """One kind of update, `writes` times on one object in each of `rounds` rounds; per write,
    the median over the rounds, and the spread of apiserver + etcd CPU."""

    shape: str  # "lease", or how the block's owners are written (SHAPES)
    entries: int  # addresses held in the block
    spec_bytes: int  # the stored spec's JSON
    writes: int
    rounds: int
    apiserver_ms: float  # CPU per write
    etcd_ms: float
    wall_ms: float
    cpu_ms_min: float  # apiserver + etcd, the cheapest and the dearest round
    cpu_ms_max: float
    ratio_to_lease: float | None = None  # (apiserver + etcd) CPU over the Lease's
    # pyabouts' rows: the agent's encoding of the block for one write, as the stores do it (each
    # owner's line kept from the write before).
    encode_ms: float | None = None
    watchers: int = 0  # watches of the IPPools' metadata open meanwhile (an agent's each)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=400, help="updates per row and round")
    parser.add_argument("--rounds", type=int, default=3, help="each row this often, interleaved")
    parser.add_argument("--entries", default="0,64,128,255", help="addresses held, per row")
    parser.add_argument(
        "--watchers",
        default="",
        help=f"a row per count: a block of {WATCHED_ENTRIES} written while that many agents' "
        "watches of the IPPools are open (comma-separated; default: none)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    try:
        sizes = [int(n) for n in args.entries.split(",")]
        watchers = [int(n) for n in args.watchers.split(",")] if args.watchers else []
    except ValueError:
        parser.error("--entries and --watchers: comma-separated whole numbers")
    if any(n < 1 for n in watchers):
        parser.error("--watchers: at least 1 each")
    if not all(0 <= n <= BLOCK_SIZE for n in sizes):
        parser.error(f"--entries: a block holds 0 to {BLOCK_SIZE} addresses")
    if args.writes < 1 or args.rounds < 1:
        parser.error("--writes and --rounds: at least 1")
    machine = describe_machine(kube_apiserver=KUBE_VERSION)
    print(format_machine(machine), flush=True)
    started_at = datetime.now(UTC)
    with (
        tempfile.TemporaryDirectory(prefix="pyabouts-bench-writes-") as tmp,
        running_cluster(Path(tmp)) as cluster,
    ):
        figures = measure_all(
            cluster.control_plane, sizes, args.writes, args.rounds, watchers=watchers
        )
    print(format_figures(figures))
    document = {
        "benchmark": "write-cost",
        "started_at": started_at.isoformat(),
        "commit": code_commit(),
        "machine": asdict(machine),
        "load_average_end": load_average(),
        "settings": {
            "writes": args.writes,
            "rounds": args.rounds,
            "entries": sizes,
            "watchers": watchers,
        },
        "rows": [asdict(f) for f in figures],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"write-cost-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results: {path}")
    return 0


def measure_all(
    control_plane: ControlPlane,
    sizes: Sequence[int],
    writes: int,
    rounds: int = 1,
    namespace: str = NAMESPACE,
    *,
    watchers: Sequence[int] = (),
) -> list[WriteFigures]:
    """The Lease, then each shape at each size, then pyabouts' block watched by each count of
    `watchers`, round after round, in `namespace` (created if need be), each object deleted
    once measured; ratios against the Lease."""
    credentials = read_kubeconfig(str(control_plane.kubeconfig))
    api = KubeApi(credentials, timeout=30)
    with contextlib.closing(api), installed_earlier_crd(control_plane):
        _ensure_namespace(api, namespace)
        store = KubernetesStore(api, namespace)
        processes = control_plane.processes()
        apiserver, etcd = processes["kube-apiserver"], processes["etcd"]

        def cpu() -> tuple[float, float]:
            return apiserver.cpu_seconds(), etcd.cpu_seconds()

        def writers() -> list[Writer]:
            made: list[Writer] = [LeaseWriter(api, namespace)]
            for size in sizes:
                made.append(OwnBlockWriter(api, store, namespace, size))
                made.append(EarlierFormWriter(api, namespace, size))
            return made

        # A fresh apiserver is still settling (its caches, the first requests of a kind): the
        # rows measured first would cost too much, so updates of both kinds first, uncounted.
        for warm_up in (
            LeaseWriter(api, namespace, "warm-up"),
            OwnBlockWriter(api, store, namespace, 0),
        ):
            measure(cpu, warm_up, writes)

        def watched(count: int) -> RoundFigures:
            writer = OwnBlockWriter(api, store, namespace, WATCHED_ENTRIES)
            return measure_watched(
                cpu, writer, writes, credentials=credentials, namespace=namespace, count=count
            )

        measured = []
        for n in range(rounds):
            row = [measure(cpu, w, writes) for w in writers()]
            measured.append(row + [watched(count) for count in watchers])
            print(f"  round {n + 1} of {rounds} measured", flush=True)
    rows = [summarise(list(per_round)) for per_round in zip(*measured, strict=True)]
    floor = rows[0].apiserver_ms + rows[0].etcd_ms
    if floor:  # else too few writes to register on the CPU clock (ticks of 10 ms)
        rows = [replace(r, ratio_to_lease=(r.apiserver_ms + r.etcd_ms) / floor) for r in rows]
    return rows


@dataclass(frozen=True)
class RoundFigures:
    shape: str
    entries: int
    spec_bytes: int
    writes: int
    apiserver_ms: float
    etcd_ms: float
    wall_ms: float
    encode_ms: float | None
    watchers: int = 0  # watches of the IPPools' metadata open meanwhile


def measure(
    cpu: Callable[[], tuple[float, float]],
    writer: Writer,
    writes: int,
    settle: Callable[[], None] = lambda: time.sleep(SETTLE_S),
) -> RoundFigures:
    writer.create()
    try:
        settle()  # the create's own work (watch cache, etcd) ends outside the count
        (api0, etcd0), started = cpu(), time.perf_counter()
        for n in range(writes):
            writer.update(n)
        wall = time.perf_counter() - started
        api1, etcd1 = cpu()
    finally:
        writer.delete()
    return RoundFigures(
        shape=writer.shape,
        entries=writer.entries,
        spec_bytes=writer.spec_bytes(),
        writes=writes,
        apiserver_ms=(api1 - api0) * 1000 / writes,
        etcd_ms=(etcd1 - etcd0) * 1000 / writes,
        wall_ms=wall * 1000 / writes,
        encode_ms=writer.encoding_ms(),
    )


def measure_watched(
    cpu: Callable[[], tuple[float, float]],
    writer: Writer,
    writes: int,
    *,
    credentials: ApiCredentials,
    namespace: str,
    count: int,
) -> RoundFigures:
    """`writer`'s row with `count` watches of the IPPools open, each of which has heard its
    object created before the count starts, and heard every write of the row by its end."""
    with IPPoolWatchers(credentials, namespace, count) as watching:

        def settle() -> None:
            watching.wait_until_heard(1)
            time.sleep(SETTLE_S)

        figures = measure(cpu, writer, writes, settle)
    heard = min(watching.events_heard())
    if heard < writes + 2:  # the create, the updates, the deletion
        raise RuntimeError(f"a watch heard {heard} of the row's {writes + 2} writes")
    return replace(figures, watchers=count)


def summarise(rounds: list[RoundFigures]) -> WriteFigures:
    first = rounds[0]
    cpu = [r.apiserver_ms + r.etcd_ms for r in rounds]
    encodes = [r.encode_ms for r in rounds if r.encode_ms is not None]
    return WriteFigures(
        shape=first.shape,
        entries=first.entries,
        spec_bytes=first.spec_bytes,
        writes=first.writes,
        rounds=len(rounds),
        apiserver_ms=statistics.median(r.apiserver_ms for r in rounds),
        etcd_ms=statistics.median(r.etcd_ms for r in rounds),
        wall_ms=statistics.median(r.wall_ms for r in rounds),
        cpu_ms_min=min(cpu),
        cpu_ms_max=max(cpu),
        encode_ms=statistics.median(encodes) if encodes else None,
        watchers=first.watchers,
    )


class Writer(ABC):
    """One object, created, then updated so that each update changes it (an update that
    changes nothing is not stored, and costs less: a write that kept its resourceVersion
    stops the run), then deleted."""

    shape: str
    entries: int

    def __init__(self, api: KubeApi, collection: str, name: str) -> None:
        self._api = api
        self._collection = collection
        self._name = name
        self._revision = ""

    @abstractmethod
    def create(self) -> None: ...

    @abstractmethod
    def update(self, n: int) -> None:
        """Write update number `n`."""

    @abstractmethod
    def spec_bytes(self) -> int:
        """The size of the spec it last wrote."""

    def encoding_ms(self) -> float | None:
        return None

    def delete(self) -> None:
        self._api.request("DELETE", f"{self._collection}/{self._name}")

    def _stored(self, revision: str) -> None:
        if revision == self._revision:
            raise RuntimeError(f"an update of {self._name} was not stored (no new version)")
        self._revision = revision


class LeaseWriter(Writer):
    """The cheapest update: a Lease's holder, as leader election writes it."""

    shape, entries = "lease", 0

    def __init__(self, api: KubeApi, namespace: str, name: str = NAME) -> None:
        super().__init__(api, f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases", name)
        self._lease: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name},
            "spec": {"holderIdentity": "0"},
        }

    def create(self) -> None:
        self._lease = self._api.request("POST", self._collection, body=self._lease)
        self._stored(self._lease["metadata"]["resourceVersion"])

    def update(self, n: int) -> None:
        self._lease["spec"]["holderIdentity"] = str(n + 1)
        path = f"{self._collection}/{self._name}"
        self._lease = self._api.request("PUT", path, body=self._lease)
        self._stored(self._lease["metadata"]["resourceVersion"])

    def spec_bytes(self) -> int:
        return len(compact_json(self._lease["spec"]))


class OwnBlockWriter(Writer):
    """pyabouts' block, through KubernetesStore.write_blocks: the request the agent sends."""

    shape = OWN_SHAPE

    def __init__(self, api: KubeApi, store: KubernetesStore, namespace: str, entries: int) -> None:
        self._block = full_block(entries)
        super().__init__(api, ippools_path(namespace), object_name(self._block.key))
        self._store = store
        self.entries = entries

    def create(self) -> None:
        self._write()

    def update(self, n: int) -> None:
        change_one(self._block, n)
        self._write()

    def spec_bytes(self) -> int:
        return len(block_json(self._block))

    def encoding_ms(self) -> float:
        """One encoding of the block as the stores write it, after a write of it (the minimum
        of 5 timings of 20 each)."""
        timings = timeit.repeat(lambda: block_json(self._block), number=20, repeat=5)
        return min(timings) / 20 * 1000

    def _write(self) -> None:
        outcome = self._store.write_blocks([self._block])
        if outcome.conflicts:
            raise RuntimeError(f"{self._name} was changed by somebody else")
        self._block.revision = outcome.revisions[self._block.key]
        self._stored(self._block.revision)


class EarlierFormWriter(Writer):
    """The same owners as OwnBlockWriter's, in an IPPool with the same labels and status,
    written raw as pyabouts stored them before (an object per address), under the earlier
    CRD (installed_earlier_crd)."""

    shape = SHAPES[1]

    def __init__(self, api: KubeApi, namespace: str, entries: int) -> None:
        self._block = full_block(entries)
        self._envelope = ippool_envelope(self._block, namespace)
        self._envelope["apiVersion"] = f"{EARLIER_GROUP}/{VERSION}"
        self._envelope["kind"] = EARLIER_KIND
        name = f"earlier-form-{entries}"
        self._envelope["metadata"]["name"] = name
        collection = f"/apis/{EARLIER_GROUP}/{VERSION}/namespaces/{namespace}/{EARLIER_PLURAL}"
        super().__init__(api, collection, name)
        self.entries = entries
        self._spec: dict[str, Any] = {}

    def create(self) -> None:
        self._put("POST", self._collection)

    def update(self, n: int) -> None:
        change_one(self._block, n)
        self._envelope["metadata"]["resourceVersion"] = self._revision
        self._put("PUT", f"{self._collection}/{self._name}")

    def spec_bytes(self) -> int:
        return len(compact_json(self._spec))

    def _put(self, method: str, path: str) -> None:
        self._spec = {**block_document(self._block), "allocations": earlier_form(self._block)}
        body = {**self._envelope, "spec": self._spec}
        stored = self._api.request(method, path, body=body, accept=METADATA_ONLY)
        self._stored(str(stored["metadata"]["resourceVersion"]))


def earlier_form(block: Block) -> dict[str, dict[str, str | int]]:
    """The owners of `block` as pyabouts stored them before its table, which it still reads:
    {offset: {containerID, ifname, podRef, ...}}, with the fields the bench's owners hold."""
    return {
        str(address - block.key.base): {
            "containerID": o.container_id,
            "ifname": o.ifname,
            "podRef": o.pod,
            "podUID": o.pod_uid,
            "node": o.node,
            "cniNetwork": o.cni_network,
            "allocated": o.allocated_at,
        }
        for address, o in sorted(block.entries.items())
    }


@contextlib.contextmanager
def installed_earlier_crd(control_plane: ControlPlane) -> Iterator[str]:
    """pyabouts' IPPool CRD as it was before the table, under EARLIER_GROUP and names of its
    own: allocations an object, declared an atomic map (its entries' fields not tracked one by
    one). Yields its name; deleted on the way out."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    crd["spec"]["group"] = EARLIER_GROUP
    crd["spec"]["names"] = {
        "kind": EARLIER_KIND,
        "listKind": f"{EARLIER_KIND}List",
        "plural": EARLIER_PLURAL,
        "singular": EARLIER_PLURAL[:-1],
    }
    name = crd["metadata"]["name"] = f"{EARLIER_PLURAL}.{EARLIER_GROUP}"
    [version] = crd["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["allocations"] = {
        "type": "object",
        "x-kubernetes-map-type": "atomic",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(crd))
    try:
        control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")
        yield name
    finally:
        control_plane.kubectl("delete", f"crd/{name}", "--wait=true", "--timeout=60s")


def change_one(block: Block, n: int) -> None:
    """Update `n` of `block`: an owner leaves and another takes its place; in an empty block the
    capacity changes (an update that changes nothing is not stored, so it would cost less)."""
    if block.entries:
        block.put(FIRST_ADDRESS + n % len(block.entries), owner(BLOCK_SIZE + n))
    else:
        block.capacity = BLOCK_SIZE - 1 - n % 2


def full_block(entries: int) -> Block:
    """A block of its own pool (one per size), holding `entries` owners from its start."""
    key = BlockKey(PoolId(f"write-cost-{entries}", 4), FIRST_ADDRESS)
    block = Block(key, capacity=BLOCK_SIZE, range_text="10.0.0.0/24")
    for n in range(entries):
        block.put(FIRST_ADDRESS + n, owner(n))
    return block


def owner(n: int) -> Owner:
    """An owner as the plugin records one for a pod's attachment."""
    return Owner(
        container_id=f"{n:064x}",
        ifname="net1",
        pod=f"default/pod-{n}",
        pod_uid=f"0c2f7b0e-8a1e-4f43-9a53-{n:012x}",
        node="node-1",
        cni_network="write-cost",
        allocated_at=1_764_800_000 + n,
    )


def _ensure_namespace(api: KubeApi, namespace: str) -> None:
    try:
        api.request("POST", "/api/v1/namespaces", body={"metadata": {"name": namespace}})
    except ApiStatusError as exc:
        if exc.status != HTTPStatus.CONFLICT:  # 409: it exists
            raise


def format_row(row: WriteFigures) -> str:
    ratio = "" if row.ratio_to_lease is None else f"  {row.ratio_to_lease:5.2f}x"
    encoding = "" if row.encode_ms is None else f"  encoding {row.encode_ms:.3f} ms"
    shape = f"{row.shape}, {row.watchers} watches" if row.watchers else row.shape
    return (
        f"{shape:24s} {row.entries:4d} entries {row.spec_bytes:7d} B  apiserver "
        f"{row.apiserver_ms:6.2f} ms  etcd {row.etcd_ms:5.2f} ms (both {row.cpu_ms_min:.2f}-"
        f"{row.cpu_ms_max:.2f})  wall {row.wall_ms:6.2f} ms{ratio}{encoding}"
    )


def format_figures(rows: Sequence[WriteFigures]) -> str:
    lines = [
        "CPU per write, medians of the rounds (kube-apiserver, etcd, the rounds' spread of the "
        "two), and (apiserver + etcd) over a Lease update's:",
        *(f"  {format_row(r)}" for r in rows),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
