"""Run one program as a CNI runtime runs a plugin: env and stdin in, stdout out, timed.

A program's CPU time is what wait4 reports for GNU time, which has reaped the program: theirs
together, to the microsecond (`floor` gives GNU time's own share, measured on /bin/true).
A program's peak RSS comes from wait4's ru_maxrss. On Linux exec keeps the peak RSS of the
address space it replaces, so a child spawned straight from this (25+ MiB) Python process would
report at least that much. So every program is started under Debian's GNU time
(`/usr/bin/time`, package `time`): it forks the program from its own small address space and
writes the child's exit status and ru_maxrss to a file (`-o`), leaving the program's stdout and
stderr alone.

The time per call is taken here, from just before GNU time is spawned until it is reaped (GNU
time's own `%e` has a 10 ms resolution, coarser than a whole host-local call). It includes
starting GNU time itself: `overhead_ms` measures that on /bin/true.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_TIMEOUT_SECONDS = 60.0
READ_CHUNK = 65536
GNU_TIME = Path("/usr/bin/time")
TIME_FORMAT = "%x %M"  # the child's exit status, its peak RSS in KiB
SIGNAL_EXIT_BASE = 128  # GNU time exits 128+N when its child was killed by signal N
FLOOR_RUNS = 10


@dataclass(frozen=True, slots=True)
class Finished:
    """What one run of a program left: its exit code, stdout, time and peak RSS."""

    exit_code: int  # negative: killed by that signal
    stdout: bytes
    seconds: float
    max_rss_kib: int
    timed_out: bool
    cpu_seconds: float = 0.0  # user + system of GNU time and the program


@dataclass(frozen=True, slots=True)
class Floor:
    """What a program that does nothing (/bin/true) costs when started this way."""

    wall_ms: float
    cpu_ms: float
    max_rss_mib: float


@dataclass(frozen=True, slots=True)
class Spawner:
    """Starts programs under GNU time; its reports go to files in `scratch`."""

    scratch: Path
    gnu_time: Path = GNU_TIME

    @property
    def description(self) -> str:
        return f"under {self.gnu_time} -f '{TIME_FORMAT}'"

    def run(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        stdin: bytes,
        *,
        stderr_path: Path,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> Finished:
        """Run `argv` once with exactly `env`; its stderr is appended to `stderr_path`.

        `stdin` must fit in a pipe buffer (64 KiB): it is written before stdout is read.
        """
        report = self._new_report_path()
        command = [str(self.gnu_time), "-q", "-f", TIME_FORMAT, "-o", str(report), "--", *argv]
        try:
            started = time.perf_counter()
            child = _spawn(command, env, stderr_path)
            stdout = _communicate(child, stdin, started + timeout)
            time_exit, cpu_seconds = _reap(child)
            seconds = time.perf_counter() - started
            fields = report.read_text().split()
        finally:
            report.unlink(missing_ok=True)
        if stdout is None:
            return Finished(-signal.SIGKILL, b"", seconds, 0, True, cpu_seconds)
        return replace(_finished(stdout, seconds, time_exit, fields), cpu_seconds=cpu_seconds)

    def floor(
        self,
        scratch_log: Path,
        *,
        rest_s: float = 0.0,
        runs: int = FLOOR_RUNS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Floor:
        """What a program that does nothing (/bin/true) costs this way (medians; peak RSS);
        with `rest_s`, each run after a rest that long, as the spaced phase starts its calls."""
        finished = []
        for _ in range(runs):
            if rest_s > 0:
                sleep(rest_s)
            finished.append(self.run(["/bin/true"], {}, b"", stderr_path=scratch_log))
        return Floor(
            wall_ms=statistics.median(r.seconds for r in finished) * 1e3,
            cpu_ms=statistics.median(r.cpu_seconds for r in finished) * 1e3,
            max_rss_mib=max(r.max_rss_kib for r in finished) / 1024,
        )

    def _new_report_path(self) -> Path:
        fd, name = tempfile.mkstemp(prefix="time-", suffix=".txt", dir=self.scratch)
        os.close(fd)
        return Path(name)


def require_gnu_time(path: Path = GNU_TIME) -> None:
    if not os.access(path, os.X_OK):
        raise RuntimeError(
            f"{path} is missing: `apt-get install time` (bash deploy/local/setup.sh)"
        )


def _finished(stdout: bytes, seconds: float, time_exit: int, fields: list[str]) -> Finished:
    """From GNU time's report ("<exit status> <KiB>"); without one, its own exit code."""
    if len(fields) != 2:  # GNU time itself failed: no figures, its exit code says why
        return Finished(time_exit, stdout, seconds, 0, timed_out=False)
    child_status, max_rss_kib = int(fields[0]), int(fields[1])
    return Finished(
        exit_code=_child_exit_code(child_status, time_exit),
        stdout=stdout,
        seconds=seconds,
        max_rss_kib=max_rss_kib,
        timed_out=False,
    )


def _child_exit_code(child_status: int, time_exit: int) -> int:
    """GNU time's %x is 0 for a child killed by a signal; its own exit code (128+N) says which."""
    if time_exit != child_status and time_exit > SIGNAL_EXIT_BASE:
        return -(time_exit - SIGNAL_EXIT_BASE)
    return child_status


def _spawn(
    argv: Sequence[str], env: Mapping[str, str], stderr_path: Path
) -> subprocess.Popen[bytes]:
    with stderr_path.open("ab") as stderr:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=dict(env),
            cwd="/",
            start_new_session=True,  # its own process group: a kill reaches GNU time and plugin
        )


def _communicate(child: subprocess.Popen[bytes], stdin: bytes, deadline: float) -> bytes | None:
    """Feed stdin, read stdout to its end; None (and the group killed) if the deadline passes."""
    try:
        _send(child, stdin)
        stdout = _read_stdout(child, deadline)
    except BaseException:
        _kill_group(child)
        _reap(child)
        raise
    if stdout is None:
        _kill_group(child)
    return stdout


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    # Safe from pid reuse: only this thread reaps the child, and it has not done so yet.
    os.killpg(child.pid, signal.SIGKILL)


def _send(child: subprocess.Popen[bytes], data: bytes) -> None:
    assert child.stdin is not None
    # BrokenPipeError: the program exited without reading its stdin; close() still frees the fd.
    with contextlib.suppress(BrokenPipeError):
        child.stdin.write(data)
    with contextlib.suppress(BrokenPipeError):
        child.stdin.close()


def _read_stdout(child: subprocess.Popen[bytes], deadline: float) -> bytes | None:
    """Everything the child writes to stdout until it closes it; None if the deadline passes."""
    assert child.stdout is not None
    fd = child.stdout.fileno()
    chunks: list[bytes] = []
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return None
            if not selector.select(remaining):
                continue
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def _reap(child: subprocess.Popen[bytes]) -> tuple[int, float]:
    """Wait for the child (GNU time); its exit code, and the CPU time of it and of the program
    it reaped (wait4's rusage counts both)."""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.stdout is not None:
        child.stdout.close()
    return child.returncode, usage.ru_utime + usage.ru_stime
