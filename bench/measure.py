"""Measuring: call the contenders as a runtime would, and turn the calls into figures.

Nothing here prints; bench.report does. Every plugin call is a fresh process, as in a cluster.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from bench.contenders import Contender, NodeSetup, Phase
from bench.process import Finished, Spawner
from bench.quiet import Quiet
from bench.results import PhaseFigures, StartupFigures

IMPORTTIME_RUNS = 5
CNI_NETNS = "/var/run/netns/none"  # IPAM plugins never enter the namespace
CNI_PATH = "/usr/lib/cni"
IFNAME = "net1"
POD_NAMESPACE = "bench"
MESSAGE_LIMIT = 300
_IMPORTTIME_LINE = re.compile(r"^import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)\s*$")

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """One plugin call, interpreted: its time, its peak RSS, and what it gave or why it failed."""

    seconds: float
    max_rss_kib: int
    cpu_seconds: float  # the process's, with GNU time's (see bench.process)
    failure: str | None  # None: success; else the CNI code, "timeout", "exit-N" or "no-ips"
    message: str
    address: str | None  # ADD: the first address given, without its prefix length


@dataclass(frozen=True, slots=True)
class Attachment:
    """One pod interface: the container it belongs to, its name in the pod, and how the node
    that serves it calls the plugin for its network."""

    container_id: str
    pod: str
    node: NodeSetup
    ifname: str = IFNAME


@dataclass(frozen=True, slots=True)
class PodOutcome:
    """A pod's calls, one per network in order, and how long they took together."""

    calls: list[CallOutcome]
    seconds: float


# --- start-up -------------------------------------------------------------------------------


def measure_startup(contender: Contender, runs: int, spawner: Spawner) -> StartupFigures:
    """VERSION calls (the plugin's fixed cost) and, for Python plugins, what their imports cost."""
    stderr_path = contender.workdir / "startup-stderr.log"
    calls = [_call_version(contender, spawner, stderr_path) for _ in range(runs + 1)][1:]
    figures = StartupFigures(
        contender=contender.name,
        version_runs=runs,
        version_p50_ms=_ms(statistics.median(c.seconds for c in calls)),
        version_max_rss_mib=_mib(max(c.max_rss_kib for c in calls)),
    )
    probe = contender.import_probe
    if probe is None:
        return figures
    entry_ms, total_ms = measure_importtime(probe.python, probe.entry_modules, spawner, stderr_path)

    def wall_ms(statement: str) -> float:
        return _python_wall_ms(probe.python, statement, runs, spawner, stderr_path)

    add_path = f"import {probe.add_path_module}"
    return replace(
        figures,
        import_entry_ms=entry_ms,
        import_total_ms=total_ms,
        add_path_import_ms=wall_ms(add_path),
        add_path_store_import_ms=(
            wall_ms(f"{add_path}, {probe.store_module}") if probe.store_module else None
        ),
        bare_python_ms=wall_ms("pass"),
    )


def measure_importtime(
    python: Path, modules: Sequence[str], spawner: Spawner, scratch: Path
) -> tuple[float, float]:
    """Median over a few runs of `python -X importtime`: (the modules `modules` add to a bare
    interpreter's, every module loaded), each as the sum of the modules' own times, in ms."""
    statement = "import " + ", ".join(modules)
    entry, total = [], []
    for _ in range(IMPORTTIME_RUNS):
        bare = _importtime_by_module(python, "pass", spawner, scratch)
        loaded = _importtime_by_module(python, statement, spawner, scratch)
        entry.append(sum(us for name, us in loaded.items() if name not in bare))
        total.append(sum(loaded.values()))
    return statistics.median(entry) / 1e3, statistics.median(total) / 1e3


def _call_version(contender: Contender, spawner: Spawner, stderr_path: Path) -> Finished:
    env = {"PATH": os.environ.get("PATH", ""), "CNI_COMMAND": "VERSION"}
    stdin = json.dumps({"cniVersion": "1.0.0"}).encode()
    return spawner.run([str(contender.executable)], env, stdin, stderr_path=stderr_path)


def _importtime_by_module(
    python: Path, statement: str, spawner: Spawner, scratch: Path
) -> dict[str, int]:
    """Each module's own import time (µs), from `python -X importtime -c statement`."""
    stderr_path = scratch.with_name(scratch.name + ".importtime")
    stderr_path.unlink(missing_ok=True)
    argv = [str(python), "-X", "importtime", "-c", statement]
    spawner.run(argv, _plain_env(), b"", stderr_path=stderr_path)
    times: dict[str, int] = {}
    for line in stderr_path.read_text().splitlines():
        match = _IMPORTTIME_LINE.match(line)
        if match:
            times[match.group(2)] = int(match.group(1))
    return times


def _python_wall_ms(
    python: Path, statement: str, runs: int, spawner: Spawner, stderr_path: Path
) -> float:
    argv = [str(python), "-c", statement]
    env = _plain_env()
    calls = [spawner.run(argv, env, b"", stderr_path=stderr_path) for _ in range(runs + 1)]
    return _ms(statistics.median(c.seconds for c in calls[1:]))


# --- ADD and DEL phases -------------------------------------------------------------------------


def measure_phase(
    contender: Contender,
    phase: Phase,
    pods: int,
    concurrency: int,
    spawner: Spawner,
    *,
    gap_s: float = 0.0,
    commands: Sequence[str] = ("ADD", "DEL"),
    settle: Callable[[], Quiet] | None = None,
) -> list[PhaseFigures]:
    """For each of `pods` pods, spread round-robin over the phase's nodes, an ADD on each of the
    phase's networks (one after the other, as Multus calls its delegates), then the same for
    DEL; at most `concurrency` pods at a time, and with one at a time `gap_s` seconds of rest
    before each ADD. Figures for each of `commands`, each settled by `settle` (the benchmark's
    wait_for_quiet) before and after its calls (see measure_command)."""
    nodes = [
        [contender.prepare_node(phase, node, network) for network in range(phase.networks)]
        for node in range(phase.nodes)
    ]
    attachments = [
        [
            Attachment(f"{phase.run_id}-{i:05d}", f"pod-{i}", setup, f"net{network + 1}")
            for network, setup in enumerate(nodes[i % len(nodes)])
        ]
        for i in range(pods)
    ]
    return [
        measure_command(
            contender,
            phase,
            command,
            attachments,
            concurrency=concurrency,
            spawner=spawner,
            gap_s=gap_s if command == "ADD" else 0.0,
            settle=settle,
        )
        for command in commands
    ]


def measure_command(
    contender: Contender,
    phase: Phase,
    command: str,
    pods: Sequence[Sequence[Attachment]],
    *,
    concurrency: int,
    spawner: Spawner,
    gap_s: float = 0.0,
    settle: Callable[[], Quiet] | None = None,
) -> PhaseFigures:
    """One command for every attachment of every pod, started once `settle` returns; what the
    plugin and its datastore counted meanwhile (conflicts, API requests, CPU) is the
    difference between before and after, read once `settle` returns again, so that the work
    the calls left running (a flush of what an agent wrote behind, say) is theirs. The figures
    record the first wait; the second is in the CPU counted, not recorded itself."""
    quiet = settle() if settle is not None else None
    conflicts_before = contender.count_conflicts(phase)
    requests_before = contender.api_requests()
    cpu_before = contender.daemon_cpu_seconds(), contender.server_cpu_seconds()
    outcomes, wall_s = _run_all(
        contender, command, pods, concurrency=concurrency, spawner=spawner, gap_s=gap_s
    )
    if settle is not None:
        settle()
    # The CPU first: asking the agents and the apiserver for their counts costs them some.
    cpu_after = contender.daemon_cpu_seconds(), contender.server_cpu_seconds()
    conflicts_after = contender.count_conflicts(phase)
    requests_after = contender.api_requests()
    figures = summarize(
        contender.name,
        phase,
        command,
        outcomes,
        concurrency=concurrency,
        wall_s=wall_s,
        conflicts=_difference(conflicts_after, conflicts_before),
    )
    calls = sum(len(pod.calls) for pod in outcomes)
    daemon_cpu, server_cpu = (
        _per_call_ms(_difference_s(after, before), calls)
        for after, before in zip(cpu_after, cpu_before, strict=True)
    )
    figures = replace(
        figures,
        daemon_rss_mib=contender.daemon_rss_mib(),
        daemon_cpu_ms=daemon_cpu,
        server_cpu_ms=server_cpu,
        quiet_wait_s=None if quiet is None else quiet.waited_s,
        busy_at_start=None if quiet is None else quiet.busy,
    )
    if requests_before is None or requests_after is None:
        return figures
    return with_api_requests(figures, requests_after - requests_before)


def with_api_requests(figures: PhaseFigures, requests: Counter[str]) -> PhaseFigures:
    """`figures` with the datastore requests made during the phase, in all and per call."""
    total = sum(requests.values())
    return replace(
        figures,
        api_requests=dict(sorted(requests.items())),
        api_requests_per_call=total / figures.calls if figures.calls else None,
    )


def summarize(
    contender: str,
    phase: Phase,
    command: str,
    pods: Sequence[PodOutcome],
    *,
    concurrency: int,
    wall_s: float,
    conflicts: int | None,
) -> PhaseFigures:
    outcomes = [call for pod in pods for call in pod.calls]
    seconds = [o.seconds for o in outcomes]
    rss = [o.max_rss_kib for o in outcomes]
    failed = [o for o in outcomes if o.failure is not None]
    ok = len(outcomes) - len(failed)
    figures = PhaseFigures(
        contender=contender,
        phase=phase.name,
        command=command,
        calls=len(outcomes),
        concurrency=concurrency,
        nodes=phase.nodes,
        ok=ok,
        failures=dict(Counter(str(o.failure) for o in failed)),
        failure_samples=_first_message_per_failure(failed),
        duplicates=count_duplicates(outcomes) if command == "ADD" else None,
        conflicts=conflicts,
        p50_ms=_ms(percentile(seconds, 50)),
        p99_ms=_ms(percentile(seconds, 99)),
        max_ms=_ms(max(seconds, default=0.0)),
        wall_s=wall_s,
        per_second=ok / wall_s if wall_s > 0 else 0.0,
        rss_max_mib=_mib(max(rss, default=0)),
        rss_p50_mib=_mib(statistics.median(rss) if rss else 0),
        plugin_cpu_ms=_per_call_ms(sum(o.cpu_seconds for o in outcomes), len(outcomes)),
        networks=phase.networks,
    )
    if phase.networks == 1:
        return figures
    pod_seconds = [pod.seconds for pod in pods]
    return replace(
        figures,
        pod_p50_s=percentile(pod_seconds, 50),
        pod_max_s=max(pod_seconds, default=0.0),
    )


def count_duplicates(outcomes: Iterable[CallOutcome]) -> int:
    """Successful ADDs whose address another live container was given too."""
    addresses = [o.address for o in outcomes if o.address is not None]
    return len(addresses) - len(set(addresses))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, interpolating linearly between the closest ranks (as numpy does)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _run_all(
    contender: Contender,
    command: str,
    pods: Sequence[Sequence[Attachment]],
    *,
    concurrency: int,
    spawner: Spawner,
    gap_s: float,
) -> tuple[list[PodOutcome], float]:
    """Every pod's calls, and the wall time they took (the rests between pods not counted)."""
    if gap_s and concurrency > 1:
        raise ValueError("a rest between pods needs one pod at a time")

    def run_pod(attachments: Sequence[Attachment]) -> PodOutcome:
        started = time.perf_counter()
        calls = [call_plugin(contender, command, a, spawner) for a in attachments]
        return PodOutcome(calls, time.perf_counter() - started)

    def rest_then_run_pod(attachments: Sequence[Attachment]) -> PodOutcome:
        time.sleep(gap_s)
        return run_pod(attachments)

    if gap_s:
        outcomes = [rest_then_run_pod(pod) for pod in pods]
        return outcomes, sum(pod.seconds for pod in outcomes)
    started = time.perf_counter()
    outcomes = _map_with_threads(run_pod, pods, concurrency)
    return outcomes, time.perf_counter() - started


def _map_with_threads(func: Callable[[T], R], items: Sequence[T], threads: int) -> list[R]:
    if threads <= 1:
        return [func(item) for item in items]
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-call")
    try:
        return list(executor.map(func, items))
    finally:  # on Ctrl-C: drop queued calls, let running ones end (they have deadlines)
        executor.shutdown(wait=True, cancel_futures=True)


def call_plugin(
    contender: Contender, command: str, attachment: Attachment, spawner: Spawner
) -> CallOutcome:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": attachment.container_id,
        "CNI_NETNS": CNI_NETNS,
        "CNI_IFNAME": attachment.ifname,
        "CNI_PATH": CNI_PATH,
        "CNI_ARGS": (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME={attachment.pod}"
        ),
        **attachment.node.extra_env,
    }
    finished = spawner.run(
        [str(contender.executable)],
        env,
        attachment.node.netconf,
        stderr_path=attachment.node.stderr_path,
    )
    return interpret(command, finished)


def interpret(command: str, finished: Finished) -> CallOutcome:
    """Success or the CNI error, from the exit code and the JSON on stdout."""

    def outcome(failure: str | None, message: str = "", address: str | None = None) -> CallOutcome:
        return CallOutcome(
            finished.seconds, finished.max_rss_kib, finished.cpu_seconds, failure, message, address
        )

    text = finished.stdout.decode(errors="replace")
    if finished.timed_out:
        return outcome("timeout", "killed after the call timeout")
    reply = _json_object(text)
    if finished.exit_code != 0:
        code = reply.get("code")
        key = str(code) if isinstance(code, int) else f"exit-{finished.exit_code}"
        return outcome(key, str(reply.get("msg", text))[:MESSAGE_LIMIT])
    if command != "ADD":
        return outcome(None)
    address = _first_address(reply)
    if address is None:
        return outcome("no-ips", text[:MESSAGE_LIMIT])
    return outcome(None, address=address)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _first_address(reply: dict[str, Any]) -> str | None:
    ips = reply.get("ips")
    if not isinstance(ips, list) or not ips or not isinstance(ips[0], dict):
        return None
    address = ips[0].get("address")
    return address.split("/")[0] if isinstance(address, str) else None


def _first_message_per_failure(failed: Iterable[CallOutcome]) -> dict[str, str]:
    samples: dict[str, str] = {}
    for o in failed:
        samples.setdefault(str(o.failure), o.message)
    return samples


def _difference(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def _plain_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "")}


def _difference_s(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _per_call_ms(total_s: float | None, calls: int) -> float | None:
    return None if total_s is None or not calls else total_s / calls * 1e3


def _ms(seconds: float) -> float:
    return seconds * 1e3


def _mib(kib: float) -> float:
    return kib / 1024
