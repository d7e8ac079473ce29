"""Race pyabouts (through the node shim and through the thin plugin, each with node agents, and
in-process) against whereabouts v0.9.4 and Debian's host-local, in one run, on the same local
kube-apiserver. The shim runs five times: on one pool all nodes share, the same on etcd (the
agents' datastore), with node slices (a /24 per node, so no two nodes write the same IPPool;
its range then holds a /24 per node), with node slices and the agents' --write-behind (a
node's slice stored behind its answers), and the same with slices of /25 (two nodes' slices in
each IPPool block, each node storing its own).

    .venv/bin/python -m bench.run_benchmark [--calls N] [--concurrency C] [--nodes M]
        [--sequential-calls S] [--spaced-calls K] [--pods P] [--pod-networks W] [--rounds R]
        [--out DIR] [--contenders pyabouts-agent,...] [--pod-contenders pyabouts-shim,...]

Starts what the chosen contenders need (one local kube-apiserver with pyabouts' and
whereabouts' CRDs and RBAC; one private etcd for pyabouts-shim-etcd and pyabouts-etcd), then
for each contender measures start-up (VERSION, imports); S sequential ADDs then DELs on one
node (uncontended latency); K ADDs one at a time, each after a rest longer than the agent's
pool cache age (a pod coming to a quiet node: a LIST of the pool, unless the agent's IPPool
watch says nobody wrote it), then their DELs; N ADDs then N DELs into a pool of exactly N
addresses at concurrency C from M simulated nodes (R times in all for pyabouts-shim,
pyabouts-shim-etcd, pyabouts-shim-slices, the two pyabouts-shim-write-behind and host-local,
in turn, each round
after the first in the next of their orders: their ratios also as a median over the rounds);
and, for the pod contenders, P pods on W
networks each (W pools of P addresses), all pods at once from M nodes, each pod's W ADDs one
after the other as Multus calls its delegates (whereabouts issue #313: 128 pods x 16 networks
passing kubelet's 4-minute limit). Prints tables and ratios against whereabouts and host-local,
and writes JSON and a PNG plot to DIR. It reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from bench.contenders import (
    Contender,
    HostLocal,
    Phase,
    PoolBounds,
    PyaboutsAgent,
    PyaboutsAgentEtcd,
    PyaboutsEtcd,
    PyaboutsKubernetes,
    Whereabouts,
    pool_of,
    sliced_pool_of,
)
from bench.kube import KubeCluster, install_whereabouts, running_cluster
from bench.machine import (
    WakeCost,
    code_commit,
    describe_machine,
    load_average,
    measure_wake_cost,
)
from bench.measure import measure_phase, measure_startup
from bench.plot import LATEST_PNG, write_plot
from bench.process import Floor, Spawner, require_gnu_time
from bench.quiet import wait_for_quiet
from bench.report import (
    LATEST,
    format_machine,
    format_report,
    format_settings,
    result_stem,
    write_json,
)
from bench.results import (
    BenchmarkResult,
    PhaseFigures,
    Settings,
    StartupFigures,
    compute_ratios,
    round_phase,
)
from deploy.local import whereabouts_install
from deploy.local.agent_process import AgentProcess, running_agent
from deploy.local.controlplane import KUBE_VERSION
from deploy.local.etcd_server import EtcdServer, running_etcd
from deploy.local.node_shim import built_shim
from pyabouts.plugin.agent.backend import POOL_MAX_AGE_SECONDS

T = TypeVar("T")
HOST_LOCAL_NAME = "host-local"
WHEREABOUTS_NAME = "whereabouts"
BASELINES = (WHEREABOUTS_NAME, HOST_LOCAL_NAME)  # every figure is also shown as a ratio to these
HOST_LOCAL = Path("/usr/lib/cni/host-local")
WHEREABOUTS_VERSION = whereabouts_install.VERSION
WHEREABOUTS = whereabouts_install.BINARY
PYABOUTS_SHIM = "pyabouts-shim"
#: The same with the etcd datastore: the agents' compare-and-swap is an etcd transaction.
PYABOUTS_SHIM_ETCD = "pyabouts-shim-etcd"
#: The same with node slices: each node allocates in a /24 of its own (Kubernetes' default pod
#: CIDR per node), at least one IPPool block, so no two nodes ever write the same object.
PYABOUTS_SHIM_SLICES = "pyabouts-shim-slices"
#: The same with the agents' --write-behind: a node's slice blocks stored behind its answers.
PYABOUTS_SHIM_WRITE_BEHIND = "pyabouts-shim-write-behind"
#: The same with slices of /25: every IPPool block holds two nodes' slices, and each node's
#: flush writes its own changes over the other's.
PYABOUTS_SHIM_WRITE_BEHIND_25 = "pyabouts-shim-write-behind-25"
WRITING_BEHIND = (PYABOUTS_SHIM_WRITE_BEHIND, PYABOUTS_SHIM_WRITE_BEHIND_25)
# The sliced contenders, and the prefix length of their slices.
SLICE_PREFIXES = {
    PYABOUTS_SHIM_SLICES: 24,
    PYABOUTS_SHIM_WRITE_BEHIND: 24,
    PYABOUTS_SHIM_WRITE_BEHIND_25: 25,
}
SLICED = tuple(SLICE_PREFIXES)
PYABOUTS_AGENT = "pyabouts-agent"
PYABOUTS_KUBERNETES = "pyabouts-kubernetes"
PYABOUTS_ETCD = "pyabouts-etcd"
# The order they run in; pyabouts-etcd only when asked for.
CONTENDERS = (
    PYABOUTS_SHIM,
    PYABOUTS_SHIM_ETCD,
    PYABOUTS_SHIM_SLICES,
    *WRITING_BEHIND,
    PYABOUTS_AGENT,
    PYABOUTS_KUBERNETES,
    PYABOUTS_ETCD,
    WHEREABOUTS_NAME,
    HOST_LOCAL_NAME,
)
DEFAULT_CONTENDERS = tuple(name for name in CONTENDERS if name != PYABOUTS_ETCD)
# The pods phase costs minutes for whereabouts: by default it runs for the plugin pyabouts
# installs on nodes and the two baselines.
DEFAULT_POD_CONTENDERS = (PYABOUTS_SHIM, WHEREABOUTS_NAME, HOST_LOCAL_NAME)
# The concurrent phase runs again (rounds 2, 3, ...) for the contenders quick to run it, in
# turn (each round in another of their orders), so that each ratio between them also has a
# median over rounds: on these two shared
# cores one phase's wall time varies by tens of percent from one minute to the next.
REPEATED_CONTENDERS = (
    PYABOUTS_SHIM,
    PYABOUTS_SHIM_ETCD,
    PYABOUTS_SHIM_SLICES,
    *WRITING_BEHIND,
    HOST_LOCAL_NAME,
)
# Longer than the agent's pool cache age: each spaced call finds its pool as old as that.
SPACED_GAP_S = POOL_MAX_AGE_SECONDS + 0.5
# How many times /bin/true and the wake-cost work each run after a rest (measure_settings).
REST_RUNS = 5
KUBERNETES_CONTENDERS = {
    PYABOUTS_SHIM,
    *SLICED,
    PYABOUTS_AGENT,
    PYABOUTS_KUBERNETES,
    WHEREABOUTS_NAME,
}
ETCD_CONTENDERS = {PYABOUTS_SHIM_ETCD, PYABOUTS_ETCD}
POOL_BASES = {
    PYABOUTS_SHIM: "10.75.0.0",
    PYABOUTS_SHIM_ETCD: "10.84.0.0",
    PYABOUTS_SHIM_SLICES: "10.81.0.0",
    PYABOUTS_SHIM_WRITE_BEHIND: "10.82.0.0",
    PYABOUTS_SHIM_WRITE_BEHIND_25: "10.83.0.0",
    PYABOUTS_AGENT: "10.76.0.0",
    PYABOUTS_ETCD: "10.77.0.0",
    HOST_LOCAL_NAME: "10.78.0.0",
    PYABOUTS_KUBERNETES: "10.79.0.0",
    WHEREABOUTS_NAME: "10.80.0.0",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run_benchmark", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--calls", type=_positive, default=1000, help="concurrent ADDs, and pool size (N)"
    )
    parser.add_argument("--concurrency", type=_positive, default=50, help="calls at once (C)")
    parser.add_argument("--nodes", type=_positive, default=10, help="simulated nodes (M)")
    parser.add_argument(
        "--sequential-calls", type=_positive, default=100, help="uncontended ADDs, one node (S)"
    )
    parser.add_argument(
        "--spaced-calls", type=_positive, default=15, help="ADDs each after a rest (K)"
    )
    parser.add_argument("--pods", type=_positive, default=128, help="pods of the pods phase (P)")
    parser.add_argument(
        "--pod-networks", type=_positive, default=16, help="networks of each pod (W)"
    )
    parser.add_argument(
        "--rounds",
        type=_positive,
        default=5,
        help=f"runs of the concurrent phase for {', '.join(REPEATED_CONTENDERS)} (R)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="JSON and PNG go here"
    )
    parser.add_argument("--startup-runs", type=_positive, default=20, help="VERSION calls")
    parser.add_argument(
        "--pyabouts",
        type=Path,
        default=Path(sys.executable).parent / "pyabouts",
        help="the pyabouts executable (default: the one beside this Python)",
    )
    parser.add_argument("--host-local", type=Path, default=HOST_LOCAL)
    parser.add_argument("--whereabouts", type=Path, default=WHEREABOUTS)
    parser.add_argument(
        "--contenders",
        type=_contender_list,
        default=list(DEFAULT_CONTENDERS),
        help=f"comma-separated, from {','.join(CONTENDERS)} (default: all but pyabouts-etcd)",
    )
    parser.add_argument(
        "--pod-contenders",
        type=_contender_list,
        default=list(DEFAULT_POD_CONTENDERS),
        help="those of the contenders that run the pods phase "
        f"(default: {','.join(DEFAULT_POD_CONTENDERS)})",
    )
    args = parser.parse_args(argv)
    if args.pods > 254:
        parser.error(f"--pods {args.pods}: each network's pool is at most a /24 (254)")
    # The most ADDs one node holds at once: the concurrent phase's share, or the sequential
    # and spaced phases', which run on one node.
    per_node = max(-(-args.calls // args.nodes), args.sequential_calls, args.spaced_calls)
    for sliced in SLICED:
        if sliced in args.pod_contenders:
            parser.error(f"{sliced}: the pods phase's pools are too small to slice")
        prefix = SLICE_PREFIXES[sliced]
        if sliced in args.contenders and per_node >= 1 << (32 - prefix):
            parser.error(f"{sliced}: {per_node} ADDs per node overflow a /{prefix}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    require_gnu_time()
    kube_version = KUBE_VERSION if KUBERNETES_CONTENDERS & set(args.contenders) else "-"
    machine = describe_machine(kube_apiserver=kube_version)
    print(format_machine(machine), flush=True)
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="pyabouts-bench-") as tmp:
            workdir = Path(tmp)
            spawner = Spawner(scratch=workdir)
            settings = measure_settings(args, spawner, workdir)
            print(format_settings(settings), flush=True)
            with contextlib.ExitStack() as servers:  # stopped on the way out, Ctrl-C included
                contenders = start_contenders(servers, workdir, args)
                pod_contenders = [c for c in contenders if c.name in args.pod_contenders]
                startup, phases = run_all_phases(contenders, pod_contenders, settings, spawner)
    except KeyboardInterrupt:
        progress("interrupted; servers stopped and work dir removed")
        return 130
    result = BenchmarkResult(
        started_at=started_at.isoformat(),
        duration_s=time.perf_counter() - started,
        load_average_end=load_average(),
        machine=machine,
        settings=settings,
        contenders=[c.name for c in contenders],
        startup=startup,
        phases=phases,
        ratios=compute_ratios(startup, phases, baselines=BASELINES),
        commit=code_commit(),
    )
    report(result, contenders, args.out)
    return 0


def measure_settings(args: argparse.Namespace, spawner: Spawner, workdir: Path) -> Settings:
    floor = spawner.floor(workdir / "floor-stderr.log")
    # What waking up costs here, which the spaced phase's calls pay (about 25 s of rests).
    rested: Floor | None = None
    wake: WakeCost | None = None
    if args.spaced_calls:
        rested = spawner.floor(workdir / "floor-stderr.log", rest_s=SPACED_GAP_S, runs=REST_RUNS)
        wake = measure_wake_cost(SPACED_GAP_S, REST_RUNS)
    return Settings(
        calls=args.calls,
        concurrency=args.concurrency,
        nodes=args.nodes,
        startup_runs=args.startup_runs,
        sequential_calls=args.sequential_calls,
        pool_size=args.calls,
        spawner=spawner.description,
        rss_floor_mib=floor.max_rss_mib,
        time_floor_ms=floor.wall_ms,
        cpu_floor_ms=floor.cpu_ms,
        spaced_calls=args.spaced_calls,
        spaced_gap_s=SPACED_GAP_S,
        rested_time_floor_ms=rested.wall_ms if rested else 0.0,
        rested_cpu_floor_ms=rested.cpu_ms if rested else 0.0,
        wake_work_ms=wake.back_to_back_ms if wake else 0.0,
        wake_work_rested_ms=wake.rested_ms if wake else 0.0,
        pods=args.pods,
        pod_networks=args.pod_networks,
        pod_concurrency=args.pods,
        sliced_pool=_sliced_pools(args),
        rounds=args.rounds,
        repeated=[name for name in REPEATED_CONTENDERS if name in args.contenders],
    )


def _sliced_pools(args: argparse.Namespace) -> str:
    """The ranges of the sliced contenders run, one per slice size."""
    described = {}
    for name in SLICED:
        if name in args.contenders and SLICE_PREFIXES[name] not in described:
            pool = _contender_pool(name, args)
            described[SLICE_PREFIXES[name]] = (
                f"{pool.cidr} from {pool.first} to {pool.last}, {pool.size} addresses, "
                f"a /{SLICE_PREFIXES[name]} per node"
            )
    return "; ".join(described.values())


def report(result: BenchmarkResult, contenders: Sequence[Contender], out: Path) -> None:
    print()
    print(format_report(result, {c.name: c.cluster_unique for c in contenders}))
    stem = result_stem(result)
    path = write_json(result, out)
    plot = write_plot(result, out, stem)
    print(f"results: {path} (also {out / LATEST})")
    print(f"plot:    {plot} (also {out / LATEST_PNG})")


class Servers:
    """What the contenders run against, each started on first need and stopped at the end: one
    kube-apiserver for all the Kubernetes contenders (the same server, the same load), an etcd."""

    def __init__(self, stack: contextlib.ExitStack[bool | None], workdir: Path) -> None:
        self._stack = stack
        self.workdir = workdir
        self._cluster: KubeCluster | None = None
        self._whereabouts_kubeconfig: Path | None = None
        self._etcd: EtcdServer | None = None

    def cluster(self) -> KubeCluster:
        if self._cluster is None:
            progress(f"starting kube-apiserver {KUBE_VERSION}, applying deploy/ (CRDs, RBAC)")
            begun = time.perf_counter()
            self._cluster = self._stack.enter_context(running_cluster(self.workdir / "cp"))
            progress(
                f"kube-apiserver ready at {self._cluster.control_plane.server} in "
                f"{time.perf_counter() - begun:.1f} s; pyabouts runs as kube-system/pyabouts, "
                "each contender with its IPPools in a namespace named after it"
            )
        return self._cluster

    def whereabouts_kubeconfig(self) -> Path:
        if self._whereabouts_kubeconfig is None:
            self._whereabouts_kubeconfig = install_whereabouts(self.cluster(), WHEREABOUTS)
            progress("whereabouts CRDs and RBAC applied; it runs as kube-system/whereabouts")
        return self._whereabouts_kubeconfig

    def etcd(self) -> EtcdServer:
        """The run's etcd, started at the first call (one for every contender that uses it:
        each keeps its pools under a network name of its own)."""
        if self._etcd is None:
            self._etcd = self._stack.enter_context(running_etcd(self.workdir))
            progress(f"etcd ready at {self._etcd.endpoint}")
        return self._etcd

    def etcd_cpu_seconds(self) -> float:
        """The CPU time the run's etcd used so far."""
        process = self.etcd().process
        assert process is not None  # started here, so ours
        return process.cpu_seconds()

    def start_agent(
        self, directory: Path, datastore: dict[str, Any], extra_args: Sequence[str] = ()
    ) -> AgentProcess:
        """A node's agent serving `datastore` (flat-file keys) from a flat file of its own."""
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "agent.conf"
        config.write_text(json.dumps(datastore))
        agent = running_agent(directory, config=config, extra_args=extra_args)
        return self._stack.enter_context(agent)


def start_contenders(
    stack: contextlib.ExitStack[bool | None], workdir: Path, args: argparse.Namespace
) -> list[Contender]:
    """The chosen contenders, in CONTENDERS order, each with what it needs running."""
    servers = Servers(stack, workdir)
    chosen = [name for name in CONTENDERS if name in args.contenders]
    return [_contender(name, servers, args) for name in chosen]


def _contender(name: str, servers: Servers, args: argparse.Namespace) -> Contender:
    contender = _new_contender(name, servers, args)
    if name in KUBERNETES_CONTENDERS:
        contender.server_cpu = servers.cluster().apiserver_cpu_seconds
    elif name in ETCD_CONTENDERS:
        contender.server_cpu = servers.etcd_cpu_seconds
    return contender


def _contender_pool(name: str, args: argparse.Namespace) -> PoolBounds:
    if name in SLICED:
        return sliced_pool_of(POOL_BASES[name], args.nodes, SLICE_PREFIXES[name])
    return pool_of(POOL_BASES[name], args.calls)


def _new_contender(name: str, servers: Servers, args: argparse.Namespace) -> Contender:
    pool = _contender_pool(name, args)
    workdir = servers.workdir
    if name == HOST_LOCAL_NAME:
        return HostLocal(args.host_local, workdir, pool=pool)
    if name == PYABOUTS_SHIM_ETCD:
        return PyaboutsAgentEtcd(
            workdir,
            etcd_endpoint=servers.etcd().endpoint,
            pool=pool,
            agents=servers.start_agent,
            name=name,
            shim=built_shim(),
        )
    if name == PYABOUTS_ETCD:
        endpoint = servers.etcd().endpoint
        python = Path(sys.executable)
        return PyaboutsEtcd(args.pyabouts, python, workdir, etcd_endpoint=endpoint, pool=pool)
    cluster = servers.cluster()
    if name == WHEREABOUTS_NAME:
        return Whereabouts(
            args.whereabouts,
            workdir,
            kubeconfig=servers.whereabouts_kubeconfig(),
            request_counter=cluster.whereabouts_requests,
            pool=pool,
        )
    if name in (PYABOUTS_SHIM, *SLICED, PYABOUTS_AGENT):
        write_behind = ["--write-behind"] if name in WRITING_BEHIND else []
        return PyaboutsAgent(
            workdir,
            kubeconfig=cluster.plugin_kubeconfig_in(name),
            request_counter=cluster.group_requests,
            pool=pool,
            agents=functools.partial(servers.start_agent, extra_args=write_behind),
            name=name,
            shim=None if name == PYABOUTS_AGENT else built_shim(),
            node_slice_size=f"/{SLICE_PREFIXES[name]}" if name in SLICED else None,
        )
    return PyaboutsKubernetes(
        args.pyabouts,
        Path(sys.executable),
        workdir,
        kubeconfig=cluster.plugin_kubeconfig_in(name),
        request_counter=cluster.group_requests,
        pool=pool,
    )


def round_orders(repeated: Sequence[T], rounds: int) -> list[list[T]]:
    """The order of each of `rounds` rounds after the first (which runs in `repeated`'s own),
    so that none of them always runs in the same place, nor right after the same one: each
    round takes the order whose places and neighbours were taken least so far (their
    permutations in lexicographic order, before, moved only the last few: with five, the
    first two ran first and second in every round)."""
    count = len(repeated)
    # Every order of up to seven (5040), else those that step through them by a stride
    # coprime with their number, from any start.
    candidates = (
        [list(order) for order in itertools.permutations(range(count))]
        if count <= 7
        else [
            [(start + i * stride) % count for i in range(count)]
            for stride in range(1, count)
            if math.gcd(stride, count) == 1
            for start in range(count)
        ]
    )
    taken: Counter[tuple[int, str, int]] = Counter()  # (contender, "at" or "after", which)

    def places(order: list[int]) -> list[tuple[int, str, int]]:
        at = [(x, "at", place) for place, x in enumerate(order)]
        after = [(x, "after", order[place - 1] if place else -1) for place, x in enumerate(order)]
        return at + after

    orders = [list(range(count))]
    taken.update(places(orders[0]))
    for _ in range(1, rounds):
        order = min(candidates, key=lambda o: sum(taken[p] for p in places(o)))
        taken.update(places(order))
        orders.append(order)
    return [[repeated[x] for x in order] for order in orders[1:]]


def run_all_phases(
    contenders: Sequence[Contender],
    pod_contenders: Sequence[Contender],
    settings: Settings,
    spawner: Spawner,
) -> tuple[list[StartupFigures], list[PhaseFigures]]:
    startup = []
    for contender in contenders:
        progress(f"{contender.name}: start-up ({settings.startup_runs} VERSION calls, imports)")
        # Not timed in this start-up: what the servers' start or the contender before left
        # running (the wait itself is not recorded for start-ups).
        wait_for_quiet()
        startup.append(measure_startup(contender, settings.startup_runs, spawner))
    for contender in contenders:
        # Not measured: the first call on a fresh apiserver pays its warm-up (authenticating a
        # new token, a first write to the resource) of ~1 s, which should fall on nobody.
        warmup = Phase(name="warmup", run_id=f"warmup-{uuid.uuid4().hex[:8]}", nodes=1)
        measure_phase(contender, warmup, 2, 1, spawner)
    phases: list[PhaseFigures] = []
    plan = (
        ("sequential", settings.sequential_calls, 1, 1, 0.0),
        ("spaced", settings.spaced_calls, 1, 1, settings.spaced_gap_s),
        ("concurrent", settings.calls, settings.concurrency, settings.nodes, 0.0),
    )
    rounds = [
        (round_phase("concurrent", n), settings.calls, settings.concurrency, settings.nodes, 0.0)
        for n in range(2, settings.rounds + 1)
    ]
    # Each round after the first in another order of the repeated contenders, so that none
    # always runs first, nor right after the same one, on a server and an etcd still finishing
    # what that one left them.
    repeated = [c for c in contenders if c.name in settings.repeated]
    names = [name for name, *_ in rounds]
    orders = dict(zip(names, round_orders(repeated, settings.rounds), strict=True))
    for name, calls, concurrency, nodes, gap_s in (*plan, *rounds):
        for contender in orders.get(name, contenders):
            phase = Phase(name=name, run_id=_run_id(name), nodes=nodes)
            rest = f", {gap_s:.1f} s apart" if gap_s else ""
            progress(
                f"{contender.name}: {name}: {calls} ADDs{rest} then DELs, "
                f"concurrency {concurrency}, {nodes} node(s)"
            )
            figures = measure_phase(
                contender, phase, calls, concurrency, spawner, gap_s=gap_s, settle=wait_for_quiet
            )
            phases += _progress_figures(figures)
    for contender in pod_contenders:
        phase = Phase(
            name="pods",
            run_id=_run_id("pods"),
            nodes=settings.nodes,
            networks=settings.pod_networks,
            network_pool_size=settings.pods,
        )
        progress(
            f"{contender.name}: pods: {settings.pods} pods x {settings.pod_networks} networks "
            f"(ADDs), {settings.pod_concurrency} pods at once, {settings.nodes} nodes"
        )
        figures = measure_phase(
            contender,
            phase,
            settings.pods,
            settings.pod_concurrency,
            spawner,
            commands=("ADD",),
            settle=wait_for_quiet,
        )
        phases += _progress_figures(figures)
    return startup, phases


def _run_id(phase: str) -> str:
    return f"{phase}-{uuid.uuid4().hex[:8]}"


def _progress_figures(figures: list[PhaseFigures]) -> list[PhaseFigures]:
    for f in figures:
        pods = f"; a pod's calls p50 {f.pod_p50_s:.1f} s" if f.pod_p50_s is not None else ""
        quiet = (
            f" (after {f.quiet_wait_s:.1f} s for quiet CPUs, {f.busy_at_start:.0%} busy)"
            if f.quiet_wait_s is not None and f.busy_at_start is not None
            else ""
        )
        progress(f"  {f.command}: {f.ok}/{f.calls} ok in {f.wall_s:.1f} s{pods}{quiet}")
    return figures


def progress(message: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _contender_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(CONTENDERS)}, not {text!r}")
    return names


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C: servers are stopped, the work dir removed


if __name__ == "__main__":
    sys.exit(main())
