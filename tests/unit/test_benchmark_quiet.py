"""bench.quiet: a measured command starts once the CPUs are quiet, or after its longest wait."""

from pathlib import Path

import pytest

from bench.quiet import busy_share, cpu_ticks, wait_for_quiet
from bench.report import _quiet_lines
from bench.results import PhaseFigures


class Machine:
    """/proc/stat's (busy, all) ticks, moving by one window's `busy` share each sleep."""

    def __init__(self, busy_by_window: list[float]) -> None:
        self.busy_by_window = busy_by_window
        self.now = 0.0
        self.counts = (0, 0)

    def ticks(self) -> tuple[int, int]:
        return self.counts

    def sleep(self, seconds: float) -> None:
        share = self.busy_by_window.pop(0)
        self.now += seconds
        busy, total = self.counts
        self.counts = (busy + round(share * 100), total + 100)

    def clock(self) -> float:
        return self.now


def waited(machine: Machine, max_wait_s: float = 20.0) -> tuple[float, float]:
    quiet = wait_for_quiet(
        busy_below=0.1,
        window_s=0.25,
        max_wait_s=max_wait_s,
        ticks=machine.ticks,
        sleep=machine.sleep,
        clock=machine.clock,
    )
    return quiet.waited_s, quiet.busy


def test_it_waits_through_busy_windows_until_one_is_quiet() -> None:
    machine = Machine([0.9, 0.6, 0.3, 0.05, 0.0])
    assert waited(machine) == (1.0, 0.05)
    assert machine.busy_by_window == [0.0]  # it stopped looking at the first quiet window


def test_a_machine_that_stays_busy_is_measured_after_the_longest_wait() -> None:
    machine = Machine([0.5] * 10)
    assert waited(machine, max_wait_s=1.0) == (1.0, 0.5)


def test_the_shares_come_from_proc_stats_first_line(tmp_path: Path) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat = tmp_path / "stat"
    stat.write_text("cpu  60 0 20 100 10 0 5 5 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    before = cpu_ticks(stat)
    assert before == (90, 200)
    stat.write_text("cpu  110 0 30 180 10 0 5 5 7 0\n")
    assert busy_share(before, cpu_ticks(stat)) == pytest.approx(60 / 140)
    assert busy_share(before, before) == 1.0  # no time passed: not found quiet


def phase(wait: float | None, busy: float | None) -> PhaseFigures:
    return PhaseFigures(
        contender="c", phase="p", command="ADD", calls=1, concurrency=1, nodes=1, ok=1,
        failures={}, failure_samples={}, duplicates=0, conflicts=0, p50_ms=1.0, p99_ms=1.0,
        max_ms=1.0, wall_s=1.0, per_second=1.0, rss_max_mib=1.0, rss_p50_mib=1.0,
        quiet_wait_s=wait, busy_at_start=busy,
    )  # fmt: skip


def test_the_report_tells_the_longest_wait_and_the_busiest_start() -> None:
    [line] = _quiet_lines([phase(0.25, 0.02), phase(2.5, 0.08), phase(None, None)])
    assert "0.2 to 2.5 s" in line and "at most 8% busy" in line
    assert "busier" not in line


def test_the_report_counts_the_commands_that_started_busy_after_the_longest_wait() -> None:
    [line] = _quiet_lines([phase(0.25, 0.02), phase(20.0, 0.4), phase(20.0, 0.3)])
    assert line.endswith("; 2 started busier, after the longest wait")
    assert _quiet_lines([phase(None, None)]) == []  # a run from before the waits
