"""Supervised server processes: how the local tooling starts, watches and stops its servers.

etcd, kube-apiserver, and the kubelet, container runtime, scheduler, controller-manager and
kube-proxy after them, are each a :class:`SupervisedProcess`: a binary, its arguments, its
environment and a log file; a readiness probe that start() waits for; stop (SIGTERM, then
SIGKILL), kill (as on a crash) and start again with the same arguments (same ports, same data);
and a status line. It dies with the process (thread) that started it, through the one
PR_SET_PDEATHSIG helper, :func:`set_parent_death_signal`, unless told otherwise (a CLI that
leaves its servers running). :func:`start_on_free_ports` starts one on freshly chosen ports and
tries again when a port was taken between choosing and binding it.

A process recorded by pid (a CLI's state file) can be adopted: ``SupervisedProcess(..., pid=N)``
answers alive(), status() and stop() without being our child.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.commands import LocalToolError

#: None once the server is ready; otherwise what it answered, for the error if it never is.
#: OSError and ValueError it raises (no connection, a bad body) count as "not ready yet".
ReadinessProbe = Callable[[], str | None]

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
KILL_TIMEOUT_S = 5.0
POLL_S = 0.1
LOG_TAIL_CHARS = 4000
#: Attempts at a start when a freshly chosen port turns out to be taken (a race with another
#: instance or an outgoing connection between choosing the port and binding it).
START_ATTEMPTS = 3

_PR_SET_PDEATHSIG = 1


class ProcessError(LocalToolError):
    """A supervised process did not start, did not become ready, or would not stop."""


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """In a child before exec: the kernel sends it ``sig`` when the thread that started it dies.

    Keeps a crashed or killed test worker, demo or benchmark from leaking its servers. SIGKILL
    by default: on SIGTERM kube-apiserver shuts down gracefully, which hangs for good once its
    etcd (signalled at the same moment) is gone; nobody is left to care about a graceful exit.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last ``chars`` characters of a log file, or why there are none."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"


def process_cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) process ``pid`` has used so far, its threads included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    user_ticks, system_ticks = int(fields[11]), int(fields[12])  # utime, stime (stat(5))
    return (user_ticks + system_ticks) / os.sysconf("SC_CLK_TCK")


def pid_runs(pid: int, exe: str) -> bool:
    """True if ``pid`` is a live (not zombie) process whose argv[0] is ``exe``.

    The check on argv[0] keeps a CLI's ``down`` from signalling an unrelated process that
    reuses a pid recorded long ago.
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
    if state in ("Z", "X"):
        return False
    return cmdline.split(b"\0", 1)[0].decode(errors="replace") == exe


@dataclass
class SupervisedProcess:
    """A server: our child (``popen``) once started, or, adopted from a record, a ``pid``.

    ``env`` is its whole environment (default: ours). ``nice`` raises or lowers its CPU
    priority where we may. With ``die_with_parent`` it gets ``parent_death_signal`` when the
    thread that started it dies (Linux ties this to the thread: start it from one that lives as
    long as the server, e.g. the main thread). ``ready`` is polled by start() until it says
    ready, for ``ready_timeout`` seconds.
    """

    name: str
    argv: list[str]
    log: Path
    ready: ReadinessProbe | None = field(default=None, repr=False)
    ready_timeout: float = READY_TIMEOUT_S
    env: Mapping[str, str] | None = field(default=None, repr=False)
    nice: int | None = None
    die_with_parent: bool = True
    parent_death_signal: int = signal.SIGKILL
    stop_timeout: float = STOP_TIMEOUT_S
    pid: int | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    # ---- starting

    def start(self, *, ready_timeout: float | None = None) -> None:
        """Start it (again: same arguments, so same ports and data) and wait until it is ready.

        If it exits or is not ready in time, it is stopped and ProcessError says why, with the
        tail of its log.
        """
        self.spawn()
        try:
            self.wait_ready(self.ready_timeout if ready_timeout is None else ready_timeout)
        except BaseException:
            with contextlib.suppress(ProcessError):
                self.stop()
            raise

    def spawn(self) -> None:
        """Start it without waiting: its output appended to its log, in a session of its own."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            log.write(f"\n==== {time.strftime('%F %T')} starting: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=None if self.env is None else dict(self.env),
                # Own session: a Ctrl-C in the shell that started us does not reach it; we stop
                # our servers in order.
                start_new_session=True,
                preexec_fn=self._prepare_child,  # noqa: PLW1509 - it only calls nice and prctl
            )
        self.pid = self.popen.pid

    def _prepare_child(self) -> None:
        if self.nice is not None:
            with contextlib.suppress(PermissionError):  # not root: keep the default priority
                os.nice(self.nice)
        if self.die_with_parent:
            set_parent_death_signal(self.parent_death_signal)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll the readiness probe until it says ready; raise ProcessError if it exits first
        or is not ready within ``timeout`` (default: ``ready_timeout``)."""
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            if not self.alive():
                raise ProcessError(
                    f"{self.name} exited ({self.exit_code()}) before it was ready; "
                    f"log tail ({self.log}):\n{log_tail(self.log)}"
                )
            if self.ready is None:
                return
            try:
                answer = self.ready()
            except (OSError, ValueError) as exc:  # no connection yet, a half-written body
                answer = repr(exc)
            if answer is None:
                return
            last = answer
            if time.monotonic() > deadline:
                raise ProcessError(
                    f"{self.name} not ready after {timeout:.0f} s ({last}); "
                    f"log tail ({self.log}):\n{log_tail(self.log)}"
                )
            time.sleep(POLL_S)

    def port_was_taken(self) -> bool:
        """Its log says it could not bind a port (someone took it after we chose it)."""
        text = log_tail(self.log).lower()
        return "address already in use" in text or "bind: address" in text

    # ---- watching

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        if self.pid is None:
            return False
        return pid_runs(self.pid, self.argv[0])

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def cpu_seconds(self) -> float:
        """The CPU time it has used so far; 0 when it does not run."""
        if self.pid is None or not self.alive():
            return 0.0
        try:
            return process_cpu_seconds(self.pid)
        except OSError:
            return 0.0

    def status(self) -> str:
        return f"{'running' if self.alive() else 'not running'} (pid {self.pid})"

    # ---- stopping

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` (default ``stop_timeout``); a no-op when it
        is not running."""
        if self.pid is None or not self.alive():
            self._reap()
            return
        term_wait = self.stop_timeout if timeout is None else timeout
        for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, KILL_TIMEOUT_S)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not self.alive():
                    self._reap()
                    return
                time.sleep(0.05)
        raise ProcessError(f"{self.name} (pid {self.pid}) survived SIGKILL")

    def kill(self) -> None:
        """SIGKILL, as on a crash: nothing is flushed or closed. start() brings it back."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.stop()  # reaps it

    def restart(self) -> None:
        """Stop it, then start it again with the same arguments; wait until it is ready."""
        self.stop()
        self.start()

    def _reap(self) -> None:
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=1)


def start_on_free_ports(
    make: Callable[[], SupervisedProcess], attempts: int = START_ATTEMPTS
) -> SupervisedProcess:
    """Start the process ``make()`` builds (choosing its ports anew each time); try again, up to
    ``attempts`` times, while a start fails because a port was taken."""
    for attempt in range(1, attempts + 1):
        process = make()
        try:
            process.start()
        except ProcessError:
            if attempt == attempts or not process.port_was_taken():
                raise
        else:
            return process
    raise AssertionError("unreachable")
