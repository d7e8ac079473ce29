"""A `pyabouts-agent` process for the tests, the demo and the benchmark: one per simulated
node, on a socket of its own, started and stopped (or killed) on purpose."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from deploy.local.ports import free_ports

READY_TIMEOUT_SECONDS = 60.0


class AgentProcess:
    """`config`: the agent's own flat file (its datastore and credentials); without one it
    trusts each request's datastore settings (--trust-request-datastore), as a test that serves
    several stores through one agent needs."""

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
        self.metrics_port = free_ports(1)[0]
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.metrics_port}"

    def start(self) -> AgentProcess:
        self.directory.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).parent / "pyabouts-agent"
        with self.log.open("ab") as log:
            self._popen = subprocess.Popen(
                [
                    str(exe),
                    "--socket",
                    str(self.socket),
                    "--listen",
                    f"127.0.0.1:{self.metrics_port}",
                    "--node-name",
                    self.node_name,
                    *(["--config", str(self.config)] if self.config else []),
                    *([] if self.config else ["--trust-request-datastore"]),
                    *self.extra_args,
                ],
                stdout=log,
                stderr=log,
            )
        self._wait_ready()
        return self

    def peak_rss_mib(self) -> float:
        """The agent's peak resident memory so far (VmHWM), in MiB; 0 when not running."""
        if self._popen is None:
            return 0.0
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self._popen.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def metrics(self) -> str:
        return self.endpoint("/metrics")

    def kill(self) -> None:
        """SIGKILL: the agent dies as on a crash, mid-request if one is in flight."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: requests in flight finish, then the agent exits."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self._popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._popen.send_signal(sig)
        try:
            self._popen.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()
        self._popen = None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert self._popen is not None
            if self._popen.poll() is not None:
                raise RuntimeError(
                    f"pyabouts-agent exited {self._popen.returncode}: {self._tail()}"
                )
            with contextlib.suppress(OSError):
                if self.endpoint("/readyz") == "ok" and self._connects():
                    return
            time.sleep(0.05)
        raise RuntimeError(
            f"pyabouts-agent not ready in {READY_TIMEOUT_SECONDS:.0f} s: {self._tail()}"
        )

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

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


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
