"""The benchmark's CPU figures: a process's CPU time from /proc, and a plugin call's from wait4
of GNU time (bench/process.py), both against CPU burnt on purpose."""

import os
import time
from pathlib import Path

from bench.process import Spawner
from deploy.local.supervision import process_cpu_seconds


def burn(seconds: float) -> None:
    """Keep this thread on the CPU for `seconds` of its own CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_process_cpu_time_counts_what_it_burnt() -> None:
    before = process_cpu_seconds(os.getpid())
    burn(0.3)
    spent = process_cpu_seconds(os.getpid()) - before
    assert 0.25 <= spent < 1.0  # ticks of 10 ms, and this process's other threads


def test_a_calls_cpu_time_is_the_programs_and_nothing_of_an_idle_one(tmp_path: Path) -> None:
    spawner = Spawner(tmp_path)
    loop = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"
    busy = spawner.run(["/bin/sh", "-c", loop], {}, b"", stderr_path=tmp_path / "err")
    idle = spawner.run(["/bin/sleep", "0.3"], {}, b"", stderr_path=tmp_path / "err")
    assert busy.exit_code == 0 and idle.exit_code == 0
    # The shell's loop costs about 0.3 s of CPU however loaded the machine (only its wall time
    # grows): counted through GNU time. Sleeping is wall time, not CPU.
    assert busy.cpu_seconds > 0.1
    assert idle.seconds >= 0.3 and idle.cpu_seconds < 0.05
