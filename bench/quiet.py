"""Waiting for the machine to go quiet before a measured command.

What the contender before left running (its agents storing what they wrote behind, its first
agents still starting, kube-apiserver and etcd finishing its writes) must not be paid by the
next one: on two cores, a phase that starts while they run is slower and its processes spend
more CPU per call (cache, context switches), whoever they are. The benchmark waits until the
CPUs are nearly idle before each command, and again before it reads the command's counters (the
work the calls left running is theirs); it records how long the first wait took, and how busy
the CPUs were in the window before the command started.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
# Of all CPUs' time: the idle agents, kube-apiserver and etcd of a run stay well below it.
QUIET_BUSY = 0.1
WINDOW_S = 0.25  # at 100 ticks a second, 50 ticks of two CPUs: steps of 2%
MAX_WAIT_S = 20.0  # then it starts anyway, and the figure it records says so


@dataclass(frozen=True, slots=True)
class Quiet:
    """How long a wait took, and the share (0 to 1) of all CPUs' time spent busy in its last
    window: below busy_below, unless the wait ended at max_wait_s."""

    waited_s: float
    busy: float


def cpu_ticks(stat: Path = PROC_STAT) -> tuple[int, int]:
    """(busy, all) ticks of all CPUs since boot, from /proc/stat's first line."""
    fields = [int(v) for v in stat.read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle and iowait; guest time is in user's already
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the CPUs' time between two cpu_ticks spent busy; 1 if no time passed."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return busy / total if total > 0 else 1.0


def wait_for_quiet(
    *,
    busy_below: float = QUIET_BUSY,
    window_s: float = WINDOW_S,
    max_wait_s: float = MAX_WAIT_S,
    ticks: Callable[[], tuple[int, int]] = cpu_ticks,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Quiet:
    """Wait until a window of `window_s` finds the CPUs busy less than `busy_below` of their
    time, or `max_wait_s` has passed; how long that took, and the last window's share."""
    started = clock()
    before = ticks()
    while True:
        sleep(window_s)
        after = ticks()
        busy = busy_share(before, after)
        if busy < busy_below or clock() - started >= max_wait_s:
            return Quiet(clock() - started, busy)
        before = after
