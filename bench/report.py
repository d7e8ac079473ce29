"""Printing and saving a benchmark result: text tables for the terminal, JSON for later."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from bench.quiet import MAX_WAIT_S, QUIET_BUSY, WINDOW_S
from bench.results import (
    PHASE_RATIO_FIGURES,
    STARTUP_RATIO_FIGURES,
    BenchmarkResult,
    Machine,
    PhaseFigures,
    Ratio,
    Settings,
    StartupFigures,
    to_json,
)
from pyabouts.controller.text_tables import format_table

LATEST = "latest.json"


def _quiet_lines(phases: Sequence[PhaseFigures]) -> list[str]:
    """How quiet the CPUs were when the commands started (bench.quiet), at worst."""
    settled = [
        (p.quiet_wait_s, p.busy_at_start)
        for p in phases
        if p.quiet_wait_s is not None and p.busy_at_start is not None
    ]
    if not settled:
        return []
    waits = [wait for wait, _ in settled]
    shares = [share for _, share in settled]
    busy = sum(1 for share in shares if share >= QUIET_BUSY)
    return [
        f"quiet CPUs: each command waited for {WINDOW_S} s with them less than {QUIET_BUSY:.0%} "
        f"busy (at most {MAX_WAIT_S:.0f} s): {min(waits):.1f} to {max(waits):.1f} s; at most "
        f"{max(shares):.0%} busy in the {WINDOW_S} s before one started"
        + (f"; {busy} started busier, after the longest wait" if busy else "")
    ]


def format_machine(machine: Machine) -> str:
    return "\n".join(
        [
            f"machine:  {machine.nproc} CPUs, {machine.cpu_model}",
            f"software: Python {machine.python}, kernel {machine.kernel}, etcd {machine.etcd}, "
            f"CNI plugins {machine.cni_plugins}, kube-apiserver {machine.kube_apiserver}; "
            f"load average {machine.load_average}",
        ]
    )


def format_settings(settings: Settings) -> str:
    return (
        f"settings: calls={settings.calls} concurrency={settings.concurrency} "
        f"nodes={settings.nodes} pool={settings.pool_size} addresses "
        + (f"(with node slices: {settings.sliced_pool}) " if settings.sliced_pool else "")
        + f"sequential_calls={settings.sequential_calls} "
        f"spaced_calls={settings.spaced_calls} ({settings.spaced_gap_s:.1f} s apart) "
        f"pods={settings.pods}x{settings.pod_networks} networks "
        + (
            f"rounds={settings.rounds} ({', '.join(settings.repeated)}) "
            if settings.rounds > 1
            else ""
        )
        + f"startup_runs={settings.startup_runs}; "
        "plugins started "
        f"{settings.spawner}; /bin/true that way: {settings.time_floor_ms:.1f} ms, "
        f"{settings.cpu_floor_ms:.2f} ms of CPU, {settings.rss_floor_mib:.1f} MiB"
        + _wake_cost_line(settings)
    )


def _wake_cost_line(settings: Settings) -> str:
    """What waking up costs on this machine, which the spaced phase's calls pay; "" when it
    was not measured."""
    rested, back_to_back = settings.wake_work_rested_ms, settings.wake_work_ms
    if not (rested and back_to_back):
        return ""
    return (
        f"\nafter a rest of {settings.spaced_gap_s:.1f} s (as each spaced call): /bin/true that "
        f"way {settings.rested_time_floor_ms:.1f} ms, {settings.rested_cpu_floor_ms:.2f} ms of "
        f"CPU; a fixed piece of Python work in a process that keeps running "
        f"{rested:.2f} ms of CPU, back to back {back_to_back:.2f} ms ({rested / back_to_back:.1f}x)"
    )


def format_report(result: BenchmarkResult, cluster_unique: dict[str, bool]) -> str:
    sections = [
        format_machine(result.machine),
        format_settings(result.settings),
        "",
        "START-UP (ms; RSS in MiB; importtime: sum of the modules' own times; the others: wall "
        "time of `python -c 'import ...'`)",
        format_startup(result.startup),
        "",
        "ADD / DEL PHASES (latency per call in ms, wall in s, RSS of one plugin process in MiB, "
        "API/call: datastore API requests per call, agent RSS: peak of a node's agent in MiB; "
        "CPU ms per call of the plugin process, the agents and the datastore's server, "
        "kube-apiserver or etcd; conflicts: as the agents count them (on IPPools with the "
        "writes their watch showed bound to be refused, not sent), or the apiserver, in-process)",
        format_phases(result.phases),
        *_quiet_lines(result.phases),
        *_per_node_notes(cluster_unique),
        *_pod_lines(result.phases),
        *_api_request_lines(result.phases),
        "",
        *_ratio_sections(result.ratios),
        *_failure_samples(result.phases),
        f"total time: {result.duration_s:.1f} s; load average at the end "
        f"{result.load_average_end}; code {result.commit}",
    ]
    return "\n".join(sections)


def format_startup(rows: Sequence[StartupFigures]) -> str:
    headers = [
        "contender",
        "VERSION p50",
        "VERSION RSS",
        "importtime entry",
        "importtime all",
        "import ADD path",
        "+ store client",
        "python -c pass",
    ]
    body = [
        [
            s.contender,
            _num(s.version_p50_ms),
            _num(s.version_max_rss_mib),
            _num(s.import_entry_ms),
            _num(s.import_total_ms),
            _num(s.add_path_import_ms),
            _num(s.add_path_store_import_ms),
            _num(s.bare_python_ms),
        ]
        for s in rows
    ]
    return format_table(headers, body)


def format_phases(rows: Sequence[PhaseFigures]) -> str:
    headers = [
        "contender",
        "phase",
        "cmd",
        "calls",
        "conc",
        "nodes",
        "ok",
        "failures",
        "dups",
        "conflicts",
        "p50",
        "p99",
        "max",
        "wall",
        "ok/s",
        "RSS max",
        "RSS p50",
        "API/call",
        "agent RSS",
        "CPU plugin",
        "CPU agent",
        "CPU server",  # kube-apiserver or etcd, whichever the contender uses
    ]
    body = [
        [
            p.contender,
            p.phase,
            p.command,
            str(p.calls),
            str(p.concurrency),
            str(p.nodes),
            str(p.ok),
            _failures(p.failures),
            _num(p.duplicates),
            _num(p.conflicts),
            _num(p.p50_ms),
            _num(p.p99_ms),
            _num(p.max_ms),
            _num(p.wall_s, 2),
            _num(p.per_second),
            _num(p.rss_max_mib),
            _num(p.rss_p50_mib),
            _num(p.api_requests_per_call, 2),
            _num(p.daemon_rss_mib),
            _num(p.plugin_cpu_ms, 2),
            _num(p.daemon_cpu_ms, 2),
            _num(p.server_cpu_ms, 2),
        ]
        for p in rows
    ]
    return format_table(headers, body)


def format_ratios(ratios: Sequence[Ratio], figures: Sequence[str]) -> str:
    """One line per (contender, row), one column per figure."""
    cells: dict[tuple[str, str], dict[str, float | None]] = {}
    for r in ratios:
        cells.setdefault((f"{r.contender} / {r.baseline}", r.row), {})[r.figure] = r.value
    body = [
        [pair, row, *(_ratio(values.get(f)) for f in figures)]
        for (pair, row), values in cells.items()
    ]
    return format_table(["ratio", "row", *figures], body)


def write_json(result: BenchmarkResult, out_dir: Path) -> Path:
    """Write the result as <out_dir>/<result_stem>.json and as <out_dir>/latest.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_json(result), indent=2) + "\n"
    path = out_dir / f"{result_stem(result)}.json"
    path.write_text(text)
    (out_dir / LATEST).write_text(text)
    return path


def result_stem(result: BenchmarkResult) -> str:
    """e.g. "benchmark-20261123T191603Z": the files of one run share it."""
    stamp = result.started_at.replace("-", "").replace(":", "").split(".")[0]
    return f"benchmark-{stamp}Z"


def _api_request_lines(phases: Sequence[PhaseFigures]) -> list[str]:
    lines = [
        f"  {p.contender} {p.phase} {p.command}: "
        + ", ".join(f"{key} x{count}" for key, count in p.api_requests.items())
        for p in phases
        if p.api_requests is not None
    ]
    return ["API requests by verb and HTTP code (409: a write conflict)", *lines] if lines else []


def _pod_lines(phases: Sequence[PhaseFigures]) -> list[str]:
    lines = [
        f"  {p.contender} {p.phase} {p.command}: {p.calls // p.networks} pods x {p.networks} "
        f"networks; a pod's calls took p50 {p.pod_p50_s:.1f} s, at most {p.pod_max_s:.1f} s"
        for p in phases
        if p.pod_p50_s is not None and p.pod_max_s is not None
    ]
    title = "PODS (a pod's calls one after the other; kubelet allows 4 minutes)"
    return [title, *lines] if lines else []


def _ratio_sections(ratios: Sequence[Ratio]) -> list[str]:
    startup = [r for r in ratios if r.row == "startup"]
    phases = [r for r in ratios if r.row != "startup"]
    if not ratios:
        return []
    return [
        "RATIOS (contender / baseline; above 1 means larger: slower, or more memory, or for "
        "ok/s more throughput)",
        format_ratios(startup, STARTUP_RATIO_FIGURES),
        "",
        format_ratios(phases, PHASE_RATIO_FIGURES),
        "",
    ]


def _per_node_notes(cluster_unique: dict[str, bool]) -> list[str]:
    return [
        f"note: {name} allocates per node, not cluster-wide; with several nodes its 'dups' are "
        "expected (each node hands out the same addresses)"
        for name, unique in cluster_unique.items()
        if not unique
    ]


def _failure_samples(phases: Sequence[PhaseFigures]) -> list[str]:
    lines = [
        f"  {p.contender} {p.phase} {p.command} [{key}] x{p.failures[key]}: {message}"
        for p in phases
        for key, message in p.failure_samples.items()
    ]
    return ["FAILURES (first message per code)", *lines, ""] if lines else []


def _failures(failures: dict[str, int]) -> str:
    if not failures:
        return "0"
    return " ".join(f"{count}x{key}" for key, count in sorted(failures.items()))


def _num(value: float | None, decimals: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{decimals}f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}x"
