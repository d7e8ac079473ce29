"""A `pyabouts-agent` process for the tests, the demo and the benchmark: one per simulated
node, on a socket of its own, started and stopped (or killed) on purpose."""

from __future__ import annotations

import contextlib
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from deploy.local.ports import free_port
from deploy.local.supervision import SupervisedProcess

READY_TIMEOUT_SECONDS = 60.0
#: SIGTERM lets the requests in flight finish; SIGKILL after this long.
STOP_TIMEOUT_SECONDS = 90.0


class AgentProcess:
    """`config`: the agent's own flat file (its datastore and credentials); without one it
    trusts each request's datastore settings (--trust-request-datastore), as a test that serves
    several stores through one agent needs.

    It runs as a :class:`~deploy.local.supervision.SupervisedProcess`. Unlike the control
    plane's servers it does not die with its parent, as before this class used it; turning that
    on would tie each agent to the thread that started it (PR_SET_PDEATHSIG)."""

    def __init__(
        self,
        directory: Path,
        name: str = "agent",
        config: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.config = config
        self.extra_args = list(extra_args)  # more flags for pyabouts-agent
        self.node_name = directory.name  # simulated nodes differ by directory: node-0, ...
        self.socket = directory / f"{name}.sock"
        self.log = directory / f"{name}.log"
        self.metrics_port = free_port()
        self.process = SupervisedProcess(
            name="pyabouts-agent",
            argv=[
                str(Path(sys.executable).parent / "pyabouts-agent"),
                *("--socket", str(self.socket)),
                *("--listen", self.listen),
                *("--node-name", self.node_name),
                *(["--config", str(self.config)] if self.config else []),
                *([] if self.config else ["--trust-request-datastore"]),
                *self.extra_args,
            ],
            log=self.log,
            ready=self._not_ready,
            ready_timeout=READY_TIMEOUT_SECONDS,
            die_with_parent=False,
            stop_timeout=STOP_TIMEOUT_SECONDS,
        )

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def start(self) -> AgentProcess:
        """Start it (again, after kill() or stop()); return once it serves its socket."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process.start()
        return self

    def peak_rss_mib(self) -> float:
        """The agent's peak resident memory so far (VmHWM), in MiB; 0 when not running."""
        if not self.process.alive():
            return 0.0
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        """The agent's CPU time so far (user + system, all its threads)."""
        return self.process.cpu_seconds()

    def metrics(self) -> str:
        return self.endpoint("/metrics")

    def kill(self) -> None:
        """SIGKILL: the agent dies as on a crash, mid-request if one is in flight."""
        self.process.kill()

    def stop(self) -> None:
        """SIGTERM: requests in flight finish, then the agent exits."""
        self.process.stop()

    def _not_ready(self) -> str | None:
        """Started once it serves its socket; /readyz also asks that its datastore answer,
        which a test of an unreachable one never sees (see ready())."""
        healthz = self.endpoint("/healthz")
        if healthz != "ok":
            return f"/healthz said {healthz!r}"
        return None if self._connects() else f"{self.socket} refuses connections"

    def ready(self) -> bool:
        """Whether /readyz answers 200: serving, and its datastore answers."""
        try:
            return self.endpoint("/readyz") == "ok"
        except urllib.error.HTTPError as exc:
            if exc.code == 503:
                return False
            raise

    def _connects(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def endpoint(self, path: str) -> str:
        """The body of GET `path` (/metrics, /healthz, /readyz) on the agent's listen address."""
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())


@contextlib.contextmanager
def running_agent(
    directory: Path,
    name: str = "agent",
    config: Path | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[AgentProcess]:
    agent = AgentProcess(directory, name, config, extra_args).start()
    try:
        yield agent
    finally:
        agent.stop()
