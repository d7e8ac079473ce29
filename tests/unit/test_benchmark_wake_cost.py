"""What waking up costs on the benchmark's machine, measured before its phases: a spaced call
pays it in every process it crosses, so a run records it beside the spaced figures."""

from pathlib import Path
from typing import Any

import pytest

from bench.machine import json_round_trips, measure_wake_cost
from bench.process import Finished, Spawner
from bench.report import format_settings
from bench.results import Settings


class RestingMachine:
    """A thread CPU clock on which work costs `rested` seconds right after a rest and
    `back_to_back` otherwise, and a sleep that counts as a rest."""

    def __init__(self, back_to_back: float, rested: float) -> None:
        self.back_to_back, self.rested = back_to_back, rested
        self.cpu = 0.0
        self.just_rested = False
        self.log: list[str] = []

    def work(self) -> None:
        self.cpu += self.rested if self.just_rested else self.back_to_back
        self.just_rested = False
        self.log.append("work")

    def sleep(self, seconds: float) -> None:
        self.just_rested = True
        self.log.append(f"rest {seconds}")

    def clock(self) -> float:
        return self.cpu


def test_work_after_a_rest_is_timed_apart_from_work_back_to_back() -> None:
    machine = RestingMachine(back_to_back=0.001, rested=0.004)
    cost = measure_wake_cost(
        2.5, 3, work=machine.work, sleep=machine.sleep, cpu_clock=machine.clock
    )
    assert cost.back_to_back_ms == pytest.approx(1.0)
    assert cost.rested_ms == pytest.approx(4.0)
    # Every rested run rests first, and nothing else runs between the rest and the work.
    rested_part = machine.log[-6:]
    assert rested_part == ["rest 2.5", "work"] * 3
    assert "rest 2.5" not in machine.log[:-6]


def test_the_work_is_real_work_on_this_machine() -> None:
    # The fixed work must cost measurable CPU (about 1 ms here), or its ratio would be noise
    # from the clock; no rest here: only the work is under test.
    cost = measure_wake_cost(0.0, 3, work=json_round_trips)
    assert cost.back_to_back_ms > 0.1


def test_the_floor_after_rests_rests_before_each_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []

    def run(self: Spawner, argv: list[str], *args: Any, **kwargs: Any) -> Finished:
        log.append(" ".join(argv))
        return Finished(0, b"", seconds=0.002, max_rss_kib=1024, timed_out=False, cpu_seconds=0.001)

    monkeypatch.setattr(Spawner, "run", run)
    floor = Spawner(tmp_path).floor(
        tmp_path / "err", rest_s=2.5, runs=3, sleep=lambda s: log.append(f"rest {s}")
    )
    assert log == ["rest 2.5", "/bin/true"] * 3
    assert (floor.wall_ms, floor.cpu_ms) == pytest.approx((2.0, 1.0))
    log.clear()
    Spawner(tmp_path).floor(tmp_path / "err", runs=2, sleep=lambda s: log.append("rest"))
    assert log == ["/bin/true"] * 2  # the usual floor: back to back


def settings(
    rested_floor: tuple[float, float] = (0.0, 0.0), wake: tuple[float, float] = (0.0, 0.0)
) -> Settings:
    """A run's settings with /bin/true's (time, CPU) after rests and the wake cost's (back to
    back, rested) as measured; zeros: not measured."""
    return Settings(
        calls=10, concurrency=2, nodes=2, startup_runs=1, sequential_calls=1, pool_size=10,
        spawner="under GNU time", rss_floor_mib=1.0, time_floor_ms=2.0, cpu_floor_ms=1.9,
        spaced_calls=15, spaced_gap_s=2.5,
        rested_time_floor_ms=rested_floor[0], rested_cpu_floor_ms=rested_floor[1],
        wake_work_ms=wake[0], wake_work_rested_ms=wake[1],
    )  # fmt: skip


def test_the_settings_report_what_waking_up_cost() -> None:
    text = format_settings(settings(rested_floor=(6.4, 4.1), wake=(1.0, 3.9)))
    assert (
        "after a rest of 2.5 s (as each spaced call): /bin/true that way 6.4 ms, 4.10 ms of CPU; "
        "a fixed piece of Python work in a process that keeps running 3.90 ms of CPU, back to "
        "back 1.00 ms (3.9x)"
    ) in text
    assert "after a rest" not in format_settings(settings())  # a run without a spaced phase
