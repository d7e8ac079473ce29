"""bench.quiet: a measured command starts once the CPUs are quiet, or after its longest wait."""

from pathlib import Path

import pytest

from bench.quiet import busy_share, cpu_ticks, wait_for_quiet


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
