"""The reconciler at scale: one pass over N allocations against N pods, for several N.

    .venv/bin/python -m bench.reconcile_scale [--sizes 1000,5000,10000]
        [--datastores kubernetes,etcd] [--leaked 0.1] [--out DIR]

It starts a local kube-apiserver (and an etcd for the etcd datastore). For each N, N Pod
objects exist (created through the API, as the scheduler leaves them), and the pool holds N
allocations: a fraction `--leaked` of them belong to pods that do not exist, the rest to live
pods. One reconcile pass (snapshot, pod listing, judgement, freeing) is timed, and it must free
exactly the leaked ones. It reports seconds per pass and per 1k allocations (a linear cost
keeps that flat). It reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from bench.kube import running_cluster
from deploy.local.etcd_server import running_etcd
from pyabouts.controller.leaks import Policy
from pyabouts.controller.pods import PodReader
from pyabouts.controller.reconciler import reconcile
from pyabouts.ipam.config import IpamConf
from pyabouts.ipam.pool import BLOCK_SIZE, Block, BlockKey, Owner, PoolId
from pyabouts.ipam.store import PoolStore
from pyabouts.ipam.stores.etcd import EtcdStore
from pyabouts.ipam.stores.kubeconfig import load_kubeconfig
from pyabouts.ipam.stores.kubernetes import KubernetesStore

NAMESPACE = "scale"
FIRST_ADDRESS = 10 << 24  # 10.0.0.0: room for 16M allocations
CREATORS = 16  # pod creations in flight


@dataclass(frozen=True)
class PassFigures:
    datastore: str
    allocations: int
    pods: int
    leaked: int
    freed: int
    exact: bool  # freed exactly the leaked allocations
    seconds: float
    seconds_per_1k: float


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--datastores", default="kubernetes,etcd")
    parser.add_argument("--leaked", type=float, default=0.1, help="fraction of dead allocations")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    figures: list[PassFigures] = []
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pyabouts-recon-")))
        cluster = stack.enter_context(running_cluster(work / "cluster"))
        configuration, namespace = load_kubeconfig(str(cluster.control_plane.kubeconfig))
        api = k8s.ApiClient(configuration)
        stack.callback(api.close)
        stores = {
            name: stack.enter_context(opened_store(name, configuration, namespace, work))
            for name in args.datastores.split(",")
        }
        create_namespace(api)
        reader = PodReader(api)
        for size in sizes:
            ensure_pods(api, size)  # the same pods for every datastore
            for name, store in stores.items():
                figures.append(measure_pass(name, store, reader, size, args.leaked))
    print_table(figures)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "reconcile-scale.json"
    path.write_text(json.dumps([asdict(f) for f in figures], indent=2))
    print(f"\nsaved {path}")


def measure_pass(
    datastore: str, store: PoolStore, reader: PodReader, size: int, leaked: float
) -> PassFigures:
    """Time one pass over `size` allocations (a fraction `leaked` of them dead) in a new pool."""
    dead = int(size * leaked)
    pool = PoolId(f"scale-{datastore}-{size}", 4)
    store.write_blocks(allocation_blocks(pool, live=size - dead, dead=dead))
    started = time.monotonic()
    summary = reconcile(store, lambda: reader.list_all().pods, Policy())
    seconds = time.monotonic() - started
    mine = [leak for leak in summary.freed if leak.key.pool == pool]
    print(f"  {datastore:10} {size:6} allocations: {seconds:.2f} s", flush=True)
    empty(store, pool)  # so that the next pass looks at its own pool only
    return PassFigures(
        datastore=datastore,
        allocations=size,
        pods=summary.pods,
        leaked=dead,
        freed=len(mine),
        exact={leak.owner.pod for leak in mine} == ghost_refs(dead),
        seconds=round(seconds, 2),
        seconds_per_1k=round(seconds / size * 1000, 3),
    )


def allocation_blocks(pool: PoolId, *, live: int, dead: int) -> list[Block]:
    """`live` allocations of existing pods, then `dead` of pods that never existed."""
    owners = [Owner(f"sandbox-{n}", "net1", f"{NAMESPACE}/pod-{n}") for n in range(live)]
    owners += [Owner(f"ghost-{n}", "net1", f"{NAMESPACE}/ghost-{n}") for n in range(dead)]
    blocks: dict[int, Block] = {}
    for n, owner in enumerate(owners):
        address = FIRST_ADDRESS + n
        key = BlockKey.of(pool, address)
        block = blocks.setdefault(key.base, Block(key, capacity=BLOCK_SIZE, range_text="bench"))
        block.put(address, owner)
    return list(blocks.values())


def ghost_refs(count: int) -> set[str]:
    return {f"{NAMESPACE}/ghost-{n}" for n in range(count)}


def empty(store: PoolStore, pool: PoolId) -> None:
    blocks = store.read_blocks(pool, 0, (1 << 32) - 1)
    for block in blocks:
        block.entries.clear()
    store.write_blocks(blocks)


def create_namespace(api: k8s.ApiClient) -> None:
    body: Any = {"metadata": {"name": NAMESPACE}}
    with contextlib.suppress(ApiException):  # already there
        k8s.CoreV1Api(api).create_namespace(body)


def ensure_pods(api: k8s.ApiClient, count: int) -> None:
    """Pods pod-0 .. pod-(count-1) exist, bound to a node, as the scheduler leaves them."""
    core = k8s.CoreV1Api(api)
    have = len(PodReader(api).list_all().pods)
    started = time.monotonic()

    def create(n: int) -> None:
        body: Any = {
            "metadata": {"name": f"pod-{n}", "namespace": NAMESPACE},
            "spec": {"nodeName": f"node-{n % 10}", "containers": [{"name": "a", "image": "x"}]},
        }
        core.create_namespaced_pod(NAMESPACE, body, _preload_content=False)

    with ThreadPoolExecutor(CREATORS) as pool:
        list(pool.map(create, range(have, count)))
    print(f"  {count} pods ({count - have} created in {time.monotonic() - started:.0f} s)")


@contextlib.contextmanager
def opened_store(
    datastore: str, configuration: k8s.Configuration, namespace: str, work: Path
) -> Iterator[PoolStore]:
    store: PoolStore
    if datastore == "kubernetes":
        store = KubernetesStore.from_configuration(configuration, namespace, timeout=60)
        yield store
        store.close()
        return
    with running_etcd(work / "etcd") as server:
        settings = {"type": "pyabouts", "datastore": "etcd", "etcd_host": server.endpoint}
        store = EtcdStore.from_config(IpamConf.model_validate(settings), timeout=60)
        yield store
        store.close()


def print_table(figures: list[PassFigures]) -> None:
    print(
        f"\n{'datastore':10} {'allocations':>11} {'pods':>6} {'leaked':>6} {'freed':>6} "
        f"{'exact':>5} {'seconds':>8} {'s per 1k':>8}"
    )
    for f in figures:
        print(
            f"{f.datastore:10} {f.allocations:11} {f.pods:6} {f.leaked:6} {f.freed:6} "
            f"{'yes' if f.exact else 'NO':>5} {f.seconds:8.2f} {f.seconds_per_1k:8.3f}"
        )


if __name__ == "__main__":
    main()
