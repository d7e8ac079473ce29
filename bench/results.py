"""The figures of a benchmark run, as plain data: what bench.measure produces, and what the
report prints, the JSON holds and a plot would read. Times are in milliseconds (per call) or
seconds (per phase), memory in MiB."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import median
from typing import Any


@dataclass(frozen=True, slots=True)
class Machine:
    nproc: int
    cpu_model: str
    python: str
    kernel: str
    etcd: str
    cni_plugins: str  # the Debian package version of /usr/lib/cni
    kube_apiserver: str  # the version the Kubernetes contender ran against ("-": not run)
    load_average: str  # 1, 5 and 15 minutes, when the run started: other work skews figures


@dataclass(frozen=True, slots=True)
class Settings:
    calls: int  # ADDs (then DELs) of the concurrent phase
    concurrency: int
    nodes: int
    startup_runs: int
    sequential_calls: int  # ADDs (then DELs) of the sequential, uncontended phase
    pool_size: int  # addresses each contender's pool holds: exactly `calls`
    spawner: str  # how plugins were started (see bench.process)
    rss_floor_mib: float  # the peak RSS reported for /bin/true: nothing below it is measurable
    time_floor_ms: float  # the median time of /bin/true: what starting it this way costs
    cpu_floor_ms: float = 0.0  # the median CPU of GNU time and /bin/true, in every plugin's
    # The spaced phase: ADDs one at a time, each after a rest longer than the agent's pool cache
    # age (2 s): a pod coming to a quiet node. Without the agent's IPPool watch each one reads
    # the pool whole; with it, only if another node wrote it meanwhile.
    spaced_calls: int = 0
    spaced_gap_s: float = 0.0
    # What waking up costs on this machine, measured before the phases when there is a spaced
    # one: /bin/true started this way, each run after a rest of spaced_gap_s (its time and CPU,
    # medians), and bench.machine.measure_wake_cost with that rest (0: not measured).
    rested_time_floor_ms: float = 0.0
    rested_cpu_floor_ms: float = 0.0
    wake_work_ms: float = 0.0  # a fixed piece of Python work in this process, back to back
    wake_work_rested_ms: float = 0.0  # the same, each right after a rest
    # The pods phase: pods x networks ADDs, `pod_concurrency` pods at a time, each pod's ADDs
    # one after the other; each network a pool of its own of `pods` addresses.
    pods: int = 0
    pod_networks: int = 0
    pod_concurrency: int = 0
    # The ranges of the sliced contenders that ran (pyabouts-shim-slices and the two
    # -write-behind), one per slice size: a slice per node, so more addresses than calls.
    sliced_pool: str = ""
    # How many times the concurrent phase ran for the `repeated` contenders, in turn, each
    # round in another of their orders (the phases "concurrent", "concurrent-round-2", ...):
    # their ratios have a median over rounds.
    rounds: int = 1
    repeated: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StartupFigures:
    contender: str
    version_runs: int
    version_p50_ms: float
    version_max_rss_mib: float
    # Only for plugins written in Python (None otherwise):
    import_entry_ms: float | None = None  # -X importtime: modules the entry modules add
    import_total_ms: float | None = None  # -X importtime: every module, interpreter's included
    add_path_import_ms: float | None = None  # wall time of `python -c 'import <ADD path>'`
    add_path_store_import_ms: float | None = None  # the same, the datastore client included
    bare_python_ms: float | None = None  # wall time of `python -c pass`, for scale


@dataclass(frozen=True, slots=True)
class PhaseFigures:
    """One command (ADD or DEL) of one phase of one contender."""

    contender: str
    phase: str
    command: str
    calls: int
    concurrency: int
    nodes: int
    ok: int
    failures: dict[str, int]  # CNI code (or "timeout", "exit-N", "no-ips") -> count
    failure_samples: dict[str, str]  # the first message seen for each failure key
    duplicates: int | None  # ADD: successful ADDs that got an address already given
    conflicts: int | None  # write conflicts the plugin retried (None: it does not say)
    p50_ms: float
    p99_ms: float
    max_ms: float
    wall_s: float
    per_second: float  # successful calls per second of wall time
    rss_max_mib: float
    rss_p50_mib: float
    # Only for a datastore whose server counts requests (the Kubernetes one; None otherwise):
    api_requests: dict[str, int] | None = None  # "<VERB> <HTTP code>" -> requests in the phase
    api_requests_per_call: float | None = None  # all of them divided by the calls
    # Only for a contender with a node daemon (the agent): its peak RSS so far, in MiB.
    daemon_rss_mib: float | None = None
    # CPU time per call, in ms: the plugin process (with GNU time's share, cpu_floor_ms), the
    # node daemons (the agents, all nodes') and the datastore's server (kube-apiserver or
    # etcd), over the phase's wall time; None where there is none.
    plugin_cpu_ms: float | None = None
    daemon_cpu_ms: float | None = None
    server_cpu_ms: float | None = None
    # Pods on several networks: how long a pod's calls took together (kubelet gives a pod's
    # network set-up 4 minutes); None with one network, where it is the call's own time.
    networks: int = 1
    pod_p50_s: float | None = None
    pod_max_s: float | None = None
    # How long the command waited for the CPUs to go quiet before it started (bench.quiet),
    # and the share of their time busy in the window just before; None in runs before the wait.
    quiet_wait_s: float | None = None
    busy_at_start: float | None = None


@dataclass(frozen=True, slots=True)
class Ratio:
    """A figure of one contender divided by the same figure of the baseline contender."""

    contender: str
    baseline: str
    row: str  # "startup" or "<phase> <command>"
    figure: str
    value: float | None  # None when the baseline figure is 0


@dataclass(frozen=True, slots=True)
class BenchmarkResult:
    started_at: str  # ISO 8601, UTC
    duration_s: float
    load_average_end: str
    machine: Machine
    settings: Settings
    contenders: list[str]
    startup: list[StartupFigures]
    phases: list[PhaseFigures]
    ratios: list[Ratio]
    # The code measured: `git describe --always --dirty` of the checkout ("-" outside one).
    commit: str = "-"


PHASE_RATIO_FIGURES = ("p50_ms", "p99_ms", "wall_s", "per_second", "rss_max_mib")
STARTUP_RATIO_FIGURES = ("version_p50_ms", "version_max_rss_mib")


ROUND = "-round-"


def round_phase(phase: str, number: int) -> str:
    """The name of the `number`th run of `phase` (the first keeps the phase's own name)."""
    return phase if number == 1 else f"{phase}{ROUND}{number}"


def compute_ratios(
    startup: list[StartupFigures], phases: list[PhaseFigures], baselines: Sequence[str]
) -> list[Ratio]:
    """Every other contender's main figures divided by each baseline's; for a phase run in
    rounds, also the median of the rounds' ratios (row "<phase> <command>, median of N")."""
    ratios = [r for baseline in baselines for r in _ratios_to(startup, phases, baseline)]
    return ratios + _medians_over_rounds(ratios)


def _medians_over_rounds(ratios: Sequence[Ratio]) -> list[Ratio]:
    rounds: defaultdict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    for r in ratios:
        phase, _, command = r.row.rpartition(" ")
        if r.value is not None and r.row != "startup":
            key = (r.contender, r.baseline, f"{phase.split(ROUND)[0]} {command}", r.figure)
            rounds[key].append(r.value)
    return [
        Ratio(contender, baseline, f"{row}, median of {len(values)}", figure, median(values))
        for (contender, baseline, row, figure), values in rounds.items()
        if len(values) > 1
    ]


def _ratios_to(
    startup: list[StartupFigures], phases: list[PhaseFigures], baseline: str
) -> list[Ratio]:
    ratios: list[Ratio] = []
    base_startup = {s.contender: s for s in startup}.get(baseline)
    for started in startup:
        if started.contender != baseline and base_startup is not None:
            ratios += _ratios(started, base_startup, "startup", STARTUP_RATIO_FIGURES)
    base_phases = {(p.phase, p.command): p for p in phases if p.contender == baseline}
    for measured in phases:
        base = base_phases.get((measured.phase, measured.command))
        if measured.contender != baseline and base is not None:
            row = f"{measured.phase} {measured.command}"
            ratios += _ratios(measured, base, row, PHASE_RATIO_FIGURES)
    return ratios


def _ratios(
    figures: StartupFigures | PhaseFigures,
    base: StartupFigures | PhaseFigures,
    row: str,
    names: tuple[str, ...],
) -> list[Ratio]:
    ratios = []
    for name in names:
        mine, theirs = float(getattr(figures, name)), float(getattr(base, name))
        value = mine / theirs if theirs else None
        ratios.append(Ratio(figures.contender, base.contender, row, name, value))
    return ratios


def to_json(result: BenchmarkResult) -> dict[str, Any]:
    return dataclasses.asdict(result)
