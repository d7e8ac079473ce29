"""Fill a whole range (a /16 by default: 65,534 addresses) through the ADD code path, and report
the largest stored object and what the last allocation costs against the first.

It drives ipam.operations.allocate in-process, one allocation per call (no process per
allocation), on a CachedStore over the real datastore, as a long-lived node agent would. Run:
`.venv/bin/python -m bench.fill_pool [--datastore kubernetes|etcd] [--range CIDR]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.kube import running_cluster
from deploy.local.etcd_server import running_etcd
from pyabouts.ipam import operations
from pyabouts.ipam.config import IpamConf
from pyabouts.ipam.errors import RANGE_EXHAUSTED, CniError, RangeExhaustedError
from pyabouts.ipam.pool import Owner, PoolId
from pyabouts.ipam.ranges import AddressRange, build_range, parse_network
from pyabouts.ipam.store import PoolStore
from pyabouts.ipam.stores.cached import CachedStore
from pyabouts.ipam.stores.etcd import KEY_PREFIX, EtcdStore
from pyabouts.ipam.stores.kubernetes import KubernetesStore
from pyabouts.ipam.transaction import DirectTransactions

NETWORK = "fill"


@dataclass(frozen=True)
class FillReport:
    datastore: str
    range: str
    addresses: int
    seconds: float
    first_p50_ms: float
    last_p50_ms: float
    last_over_first: float
    objects: int
    largest_object_bytes: int
    distinct: bool
    exhausted_after: str
    pool_reads: int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datastore", choices=["kubernetes", "etcd"], default="kubernetes")
    parser.add_argument("--range", default="10.0.0.0/16")
    parser.add_argument("--sample", type=int, default=1000, help="allocations in each p50")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pyabouts-fill-") as work:
        report = fill(args.datastore, args.range, args.sample, Path(work))
    print_report(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"fill-{args.datastore}.json").write_text(json.dumps(asdict(report), indent=2))


def fill(datastore: str, cidr: str, sample: int, work: Path) -> FillReport:
    pool = PoolId(NETWORK, 4 if parse_network(cidr).version == 4 else 6)
    rng = build_range(cidr, range_start=None, range_end=None, exclude=[], pool=pool)
    with opened_store(datastore, work) as (store, sizes):
        cached = CachedStore(store)
        print(f"filling {rng.size} addresses of {cidr} on {datastore} ...", flush=True)
        started = time.monotonic()
        latencies, given = allocate_all(cached, rng)
        seconds = time.monotonic() - started
        exhausted = next_allocation_error(cached, rng)
        object_sizes = sizes()
    first, last = latencies[:sample], latencies[-sample:]
    return FillReport(
        datastore=datastore,
        range=cidr,
        addresses=len(given),
        seconds=round(seconds, 1),
        first_p50_ms=round(statistics.median(first) * 1e3, 2),
        last_p50_ms=round(statistics.median(last) * 1e3, 2),
        last_over_first=round(statistics.median(last) / statistics.median(first), 2),
        objects=len(object_sizes),
        largest_object_bytes=max(object_sizes),
        distinct=len(set(given)) == len(given) == rng.size,
        exhausted_after=exhausted,
        pool_reads=cached.reads,
    )


def allocate_all(store: PoolStore, rng: AddressRange) -> tuple[list[float], list[int]]:
    latencies, given = [], []
    for n in range(rng.size):
        owner = Owner(f"fill-{n:06d}", "net1", f"fill/pod-{n}")
        began = time.perf_counter()
        [address] = operations.allocate(
            DirectTransactions(store), [rng], owner, [], deadline=time.monotonic() + 60
        )
        latencies.append(time.perf_counter() - began)
        given.append(address)
        if (n + 1) % 5000 == 0:
            print(f"  {n + 1} allocated, last {latencies[-1] * 1e3:.1f} ms", flush=True)
    return latencies, given


def next_allocation_error(store: PoolStore, rng: AddressRange) -> str:
    try:
        operations.allocate(
            DirectTransactions(store),
            [rng],
            Owner("one-more", "net1"),
            [],
            deadline=time.monotonic() + 60,
        )
    except RangeExhaustedError as error:
        return f"code {RANGE_EXHAUSTED}: {error}"
    except CniError as error:
        return repr(error)
    return "not exhausted: another address was given"


ObjectSizes = Callable[[], list[int]]


@contextlib.contextmanager
def opened_store(datastore: str, work: Path) -> Iterator[tuple[PoolStore, ObjectSizes]]:
    """The store to fill, and how to measure the objects it stored."""
    opener = kubernetes_store if datastore == "kubernetes" else etcd_store
    with opener(work) as opened:
        yield opened
        opened[0].close()


@contextlib.contextmanager
def kubernetes_store(work: Path) -> Iterator[tuple[PoolStore, ObjectSizes]]:
    with running_cluster(work) as cluster:
        kubeconfig = str(cluster.plugin_kubeconfig)
        ipam = IpamConf.model_validate(
            {"type": "pyabouts", "kubernetes": {"kubeconfig": kubeconfig}}
        )

        def sizes() -> list[int]:
            listed = json.loads(cluster.control_plane.kubectl("get", "ippools", "-A", "-o", "json"))
            return [len(json.dumps(item, separators=(",", ":"))) for item in listed["items"]]

        yield KubernetesStore.from_config(ipam, timeout=30), sizes


@contextlib.contextmanager
def etcd_store(work: Path) -> Iterator[tuple[PoolStore, ObjectSizes]]:
    with running_etcd(work) as server:
        etcd_host = server.endpoint
        ipam = IpamConf.model_validate(
            {"type": "pyabouts", "datastore": "etcd", "etcd_host": etcd_host}
        )

        def sizes() -> list[int]:
            import etcd3  # noqa: PLC0415 - only to measure

            host, port = etcd_host.split(":")
            client = etcd3.client(host=host, port=int(port))
            found = [len(value) for value, _ in client.get_prefix(KEY_PREFIX)]
            client.close()
            return found

        yield EtcdStore.from_config(ipam, timeout=30), sizes


def print_report(report: FillReport) -> None:
    print()
    for name, value in asdict(report).items():
        print(f"  {name:22} {value}")
    print(
        f"\n  largest object {report.largest_object_bytes / 1024:.1f} KiB "
        f"(limit 256 KiB); last allocation costs {report.last_over_first}x the first"
    )


if __name__ == "__main__":
    main()
