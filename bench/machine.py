"""The machine a benchmark ran on, so that figures from different runs can be compared."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.results import Machine
from deploy.local.etcd_server import etcd_version

CNI_PLUGINS_PACKAGE = "containernetworking-plugins"
# The fixed piece of work of measure_wake_cost: JSON round trips of a small document, about a
# millisecond of CPU on the machines of this benchmark, some of what a request costs an agent.
_WAKE_DOCUMENT = {f"key-{i}": list(range(20)) for i in range(20)}
_WAKE_ROUND_TRIPS = 20
_WAKE_WARM_UP = 50


@dataclass(frozen=True, slots=True)
class WakeCost:
    """The CPU time of one fixed piece of Python work in a process that keeps running, done
    back to back and as the first thing after a rest (medians, ms). On a machine whose caches
    go cold while its CPUs rest, the second is several times the first: what each long-running
    process a spaced call crosses (an agent, kube-apiserver, etcd) pays on top of its work."""

    back_to_back_ms: float
    rested_ms: float


def json_round_trips() -> None:
    for _ in range(_WAKE_ROUND_TRIPS):
        json.loads(json.dumps(_WAKE_DOCUMENT))


def measure_wake_cost(
    rest_s: float,
    runs: int,
    *,
    work: Callable[[], None] = json_round_trips,
    sleep: Callable[[float], None] = time.sleep,
    cpu_clock: Callable[[], float] = time.thread_time,
) -> WakeCost:
    """`work`'s CPU time in this thread: `runs` times back to back, after a warm-up, and
    `runs` times each right after a rest of `rest_s`."""

    def cpu_ms() -> float:
        began = cpu_clock()
        work()
        return (cpu_clock() - began) * 1e3

    for _ in range(_WAKE_WARM_UP):
        work()
    back_to_back = [cpu_ms() for _ in range(runs)]
    rested = []
    for _ in range(runs):
        sleep(rest_s)
        rested.append(cpu_ms())
    return WakeCost(statistics.median(back_to_back), statistics.median(rested))


def describe_machine(kube_apiserver: str = "-") -> Machine:
    return Machine(
        nproc=os.cpu_count() or 0,
        cpu_model=cpu_model(),
        python=platform.python_version(),
        kernel=platform.release(),
        etcd=etcd_version(),
        cni_plugins=debian_package_version(CNI_PLUGINS_PACKAGE),
        kube_apiserver=kube_apiserver,
        load_average=load_average(),
    )


def load_average() -> str:
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown"


def debian_package_version(package: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def code_commit() -> str:
    """The checkout's commit, "-dirty" when it has changes; "-" when it is not a git checkout."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "-"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "-"
