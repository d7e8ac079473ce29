"""Multus thick on a real kubelet: a Deployment on two networks scaled 0 -> N, pyabouts against
host-local, with the Multus daemon's limits raised as its users raise them, then at its upstream
limits.

    bash bench/run.sh multus [--rounds 3] [--at-limits 20] [--raised 50] [--out bench/results]

In thick mode every delegate runs inside the Multus daemon's container: pyabouts' node shim
(which hands the call to the node agent), host-local and macvlan alike. Its upstream limits are
50Mi of memory and 100m of CPU; its users raise them (Multus #1346), here to 256Mi and no CPU
limit. Per round and IPAM: the seconds until every pod is Ready, whether the daemon restarted
(OOM-killed) meanwhile, and duplicates. The IPAMs take turns first, round by round, so that
neither always runs on a cluster the other just warmed. It reports and never asserts; the JSON
(multus-thick-<time>.json) records the commit, the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.machine import code_commit, describe_machine, load_average
from bench.report import format_machine
from deploy.local.controlplane import KUBE_VERSION, ControlPlane
from deploy.local.install import cluster_with_pyabouts
from deploy.local.multus_install import THICK, install_multus, multus_overlay, uninstall_multus
from deploy.local.multus_scale import ScaleFigures, scale_round, set_multus_limits
from deploy.local.netns import macvlan_master
from pyabouts.controller.text_tables import format_table

IPAMS = ("pyabouts", "host-local")
#: A round whose pods are not all Ready by then is recorded as such (Multus' daemon OOM-killed
#: over and over at its upstream limits never gets there).
READY_TIMEOUT_S = 240
BASELINE = "host-local"
NAMESPACE = "default"
UPSTREAM_LIMITS = "50Mi memory, 100m CPU (upstream manifest, unchanged)"
UPSTREAM_LIMIT_VALUES = {"cpu": "100m", "memory": "50Mi"}  # its manifest's
RAISED_LIMITS = {"memory": "256Mi"}  # and no CPU limit
#: The targets of the node-binary issue: pyabouts' time to all Ready over host-local's.
TARGETS = {"upstream": 1.5, "raised": 1.2}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bash bench/run.sh multus", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per limits (default: 3)")
    parser.add_argument("--at-limits", type=int, default=20, help="pods at upstream limits")
    parser.add_argument("--raised", type=int, default=50, help="pods with the limits raised")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = describe_machine(kube_apiserver=KUBE_VERSION)
    print(format_machine(machine), flush=True)
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    path = args.out / f"multus-thick-{started_at.strftime('%Y%m%dT%H%M%SZ')}.json"
    phases: list[dict[str, Any]] = []
    with thick_cluster() as (cluster, master):
        # Raised limits first: the rounds at the upstream limits are those that can leave the
        # daemon crash-looping. Each phase is written as soon as it is measured, so that a run
        # stopped early keeps what it measured.
        for name, limits, replicas, setting in (
            ("raised", "256Mi memory, no CPU limit", args.raised, RAISED_LIMITS),
            ("upstream", UPSTREAM_LIMITS, args.at_limits, UPSTREAM_LIMIT_VALUES),
        ):
            set_multus_limits(cluster, setting)
            rounds = [run_round(cluster, master, n, replicas, name) for n in range(args.rounds)]
            phases.append(summarise(name, limits, replicas, [f for r in rounds for f in r]))
            document = {
                "benchmark": "multus-thick",
                "started_at": started_at.isoformat(),
                "duration_s": round(time.perf_counter() - started, 1),
                "commit": code_commit(),
                "machine": asdict(machine),
                "load_average_end": load_average(),
                "settings": {"rounds": args.rounds, "namespace": NAMESPACE, "networks_per_pod": 2},
                "phases": phases,
            }
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(document, indent=2) + "\n")
    print(format_phases(phases))
    print(f"results: {path}")
    return 0


@contextlib.contextmanager
def thick_cluster() -> Iterator[tuple[ControlPlane, str]]:
    """The local cluster with pyabouts and Multus thick (its upstream manifest), and a macvlan
    master; all taken down on the way out."""
    with tempfile.TemporaryDirectory(prefix="pyabouts-bench-multus-") as tmp:
        state_dir = Path(tmp)
        with cluster_with_pyabouts(state_dir) as cluster, macvlan_master("benchm") as master:
            overlay = multus_overlay(state_dir / "multus", THICK)
            install_multus(cluster, overlay, THICK)
            try:
                yield cluster, master
            finally:
                cluster.kubectl_run(
                    "delete", "deployments", "--all", "-n", NAMESPACE, "--timeout=120s"
                )
                uninstall_multus(cluster, overlay, THICK)


def run_round(
    cluster: ControlPlane, master: str, number: int, replicas: int, phase: str
) -> list[ScaleFigures]:
    order = IPAMS if number % 2 == 0 else IPAMS[::-1]
    figures = []
    for ipam in order:
        done = scale_round(
            cluster, NAMESPACE, master, ipam, replicas, ready_timeout_s=READY_TIMEOUT_S
        )
        restarted = "Multus restarted" if done.multus_restarted else "no Multus restart"
        outcome = (
            f"all Ready in {done.up_seconds:.1f} s"
            if done.up_seconds is not None
            else f"{done.ready} Ready after {READY_TIMEOUT_S} s"
        )
        print(
            f"{phase} round {number + 1}: {ipam} 0 -> {replicas} pods {outcome} "
            f"({restarted}, {done.duplicates} duplicates)",
            flush=True,
        )
        figures.append(done)
    return figures


def summarise(
    name: str, limits: str, replicas: int, figures: Sequence[ScaleFigures]
) -> dict[str, Any]:
    """The rounds of one limits setting: per IPAM, each round's time to all Ready (None: not
    within the round's time) and its median over the rounds that got there; pyabouts' median
    over host-local's against the target, which also wants every round all Ready, no
    duplicate, and at the upstream limits no Multus restart."""
    by_ipam: dict[str, dict[str, Any]] = {}
    for ipam in IPAMS:
        rounds = [f for f in figures if f.ipam == ipam]
        done = [f.up_seconds for f in rounds if f.up_seconds is not None]
        by_ipam[ipam] = {
            "up_seconds": [_rounded(f.up_seconds) for f in rounds],
            "ready": [f.ready for f in rounds],
            "up_seconds_median": _rounded(statistics.median(done)) if done else None,
            "rounds_not_all_ready": len(rounds) - len(done),
            "down_seconds": [round(f.down_seconds, 2) for f in rounds],
            "rounds_with_multus_restart": sum(f.multus_restarted for f in rounds),
            "multus_restarts": [[list(r) for r in f.restarts_after] for f in rounds],
            "duplicates": sum(f.duplicates for f in rounds),
        }
    mine, base = by_ipam["pyabouts"], by_ipam[BASELINE]
    medians = (mine["up_seconds_median"], base["up_seconds_median"])
    ratio = medians[0] / medians[1] if None not in medians else None
    return {
        "name": name,
        "limits": limits,
        "replicas": replicas,
        "by_ipam": by_ipam,
        "ratio_to_host_local": None if ratio is None else round(ratio, 3),
        "target_ratio": TARGETS[name],
        "met": ratio is not None
        and ratio <= TARGETS[name]
        and mine["rounds_not_all_ready"] == 0
        and mine["duplicates"] == 0
        and (name != "upstream" or mine["rounds_with_multus_restart"] == 0),
    }


def format_phases(phases: Sequence[dict[str, Any]]) -> str:
    rows = []
    for phase in phases:
        for ipam, figures in phase["by_ipam"].items():
            rows.append(
                [
                    phase["name"],
                    str(phase["replicas"]),
                    ipam,
                    " / ".join(
                        _seconds(s, r)
                        for s, r in zip(figures["up_seconds"], figures["ready"], strict=True)
                    ),
                    _number(figures["up_seconds_median"], 1),
                    f"{figures['rounds_with_multus_restart']} of {len(figures['up_seconds'])}",
                    str(figures["duplicates"]),
                    f"{_number(phase['ratio_to_host_local'], 2)} (target {phase['target_ratio']})"
                    if ipam == "pyabouts"
                    else "-",
                ]
            )
    headers = [
        "limits",
        "pods",
        "IPAM",
        "all Ready (s), per round",
        "median",
        "rounds with a Multus restart",
        "dups",
        "ratio to host-local",
    ]
    return format_table(headers, rows)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 2)


def _seconds(value: float | None, ready: int) -> str:
    """A round's time to all Ready, or how many pods were Ready when its time ran out."""
    return f"{value:.1f}" if value is not None else f"({ready} Ready)"


def _number(value: float | None, decimals: int) -> str:
    return f"{value:.{decimals}f}" if value is not None else "-"


if __name__ == "__main__":
    raise SystemExit(main())
