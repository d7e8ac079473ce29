"""The benchmark's rounds: the concurrent phase run again for the quick contenders, and each
ratio between them given as the median over the rounds as well as round by round."""

from types import SimpleNamespace
from typing import Any

import pytest

from bench import run_benchmark
from bench.results import PhaseFigures, Settings, compute_ratios, round_phase


def phase(contender: str, name: str, wall_s: float) -> PhaseFigures:
    return PhaseFigures(
        contender=contender,
        phase=name,
        command="ADD",
        calls=1000,
        concurrency=50,
        nodes=10,
        ok=1000,
        failures={},
        failure_samples={},
        duplicates=0,
        conflicts=0,
        p50_ms=1.0,
        p99_ms=1.0,
        max_ms=1.0,
        wall_s=wall_s,
        per_second=1000 / wall_s,
        rss_max_mib=1.0,
        rss_p50_mib=1.0,
    )


def test_the_median_of_the_rounds_ratios_is_a_row_of_its_own() -> None:
    # Ratios of 1, 1.5 and 9: their median is neither their mean nor the first round's.
    walls = {"pyabouts-shim": [3.0, 4.5, 27.0], "host-local": [3.0, 3.0, 3.0]}
    phases = [
        phase(contender, round_phase("concurrent", n), rounds[n - 1])
        for n in (1, 2, 3)
        for contender, rounds in walls.items()
    ]
    phases.append(phase("whereabouts", "concurrent", 100.0))  # ran once
    ratios = compute_ratios([], phases, baselines=("whereabouts", "host-local"))
    wall = {(r.contender, r.baseline, r.row): r.value for r in ratios if r.figure == "wall_s"}
    shim = "pyabouts-shim"
    assert wall[shim, "host-local", "concurrent ADD"] == 1.0
    assert wall[shim, "host-local", "concurrent-round-2 ADD"] == 1.5
    assert wall[shim, "host-local", "concurrent-round-3 ADD"] == 9.0
    assert wall[shim, "host-local", "concurrent ADD, median of 3"] == 1.5
    # Against a baseline that ran once there is one ratio, and no median.
    assert wall[shim, "whereabouts", "concurrent ADD"] == 0.03
    assert not [row for (_, base, row) in wall if base == "whereabouts" and "median" in row]


def test_each_round_after_the_first_runs_the_repeated_contenders_in_another_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Rounds in one fixed order would always run a contender right after the same one, on a
    # server still finishing that one's writes.
    ran: list[tuple[str, str]] = []

    def measure(contender: Any, phase: Any, *args: Any, **kwargs: Any) -> list[PhaseFigures]:
        ran.append((phase.name, contender.name))
        return []

    monkeypatch.setattr(run_benchmark, "measure_startup", lambda *args: None)
    monkeypatch.setattr(run_benchmark, "measure_phase", measure)
    monkeypatch.setattr(run_benchmark, "wait_for_quiet", lambda: None)  # before each start-up
    names = ["pyabouts-shim", "pyabouts-shim-slices", "whereabouts", "host-local"]
    contenders = [SimpleNamespace(name=name) for name in names]
    settings = Settings(
        calls=10, concurrency=2, nodes=2, startup_runs=1, sequential_calls=1, pool_size=10,
        spawner="-", rss_floor_mib=0.0, time_floor_ms=0.0, rounds=4,
        repeated=["pyabouts-shim", "pyabouts-shim-slices", "host-local"],
    )  # fmt: skip
    run_benchmark.run_all_phases(contenders, [], settings, spawner=None)  # type: ignore[arg-type]

    def order(phase: str) -> list[str]:
        return [name for ran_phase, name in ran if ran_phase == phase]

    assert order("concurrent") == names
    repeated = ["pyabouts-shim", "pyabouts-shim-slices", "host-local"]
    for n, expected in enumerate(run_benchmark.round_orders(repeated, 4), start=2):
        assert order(f"concurrent-round-{n}") == expected


@pytest.mark.parametrize("count", [2, 3, 4, 5, 6])
def test_no_contender_always_runs_first_or_right_after_the_same_one(count: int) -> None:
    names = [f"c{n}" for n in range(count)]
    orders = [names, *run_benchmark.round_orders(names, 5)]
    assert all(sorted(order) == names for order in orders)
    for name in names:  # in more than one place
        assert len({order.index(name) for order in orders}) > 1, (name, orders)
    for name in names:
        before = {order[order.index(name) - 1] if order.index(name) else None for order in orders}
        assert len(before) > 1, (name, orders)
