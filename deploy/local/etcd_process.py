"""A private etcd for a demo or a benchmark run: Debian's binary, a data dir we own, free
loopback ports.

Other etcds may run on the same machine (test sessions), so "healthy" is not enough: the server
that answers must be ours, which the member list tells by our unique member name.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ETCD_BINARY = Path("/usr/bin/etcd")
START_ATTEMPTS = 3  # a free port can be taken by someone else before etcd binds it
READY_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1


@dataclass(slots=True)
class EtcdServer:
    """A running etcd of ours; kill() and start_again() play a crash and its restart."""

    endpoint: str  # host:port, as pyabouts' etcd_host takes it
    data_dir: Path
    process: subprocess.Popen[bytes]
    argv: list[str]
    name: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL, as on a crash: nothing is flushed or closed."""
        self.process.kill()
        self.process.wait()

    def start_again(self) -> None:
        """Start it on the same ports and data (after kill()); return once it is healthy."""
        self.process = _spawn(self.argv, self.data_dir)
        if not _wait_until_ready(self.process, self.endpoint, self.name):
            raise RuntimeError(f"etcd did not start again; see {self.data_dir.with_suffix('.log')}")


@contextlib.contextmanager
def running_etcd(workdir: Path, binary: Path = ETCD_BINARY) -> Iterator[EtcdServer]:
    """Start etcd under `workdir`, wait until it is ours and healthy, and stop it on the way out."""
    for attempt in range(START_ATTEMPTS):
        data_dir = workdir / f"etcd-{attempt}"
        name = f"bench-{uuid.uuid4().hex[:12]}"
        client_port, peer_port = free_ports(2)
        argv = _argv(binary, data_dir, name, client_port, peer_port)
        process = _spawn(argv, data_dir)
        endpoint = f"127.0.0.1:{client_port}"
        try:
            ready = _wait_until_ready(process, endpoint, name)
        except BaseException:
            _stop(process)
            raise
        if ready:
            break
        _stop(process)
    else:
        raise RuntimeError(f"etcd did not start in {START_ATTEMPTS} attempts; see {workdir}/*.log")
    server = EtcdServer(endpoint, data_dir, process, argv, name)
    try:
        yield server
    finally:
        _stop(server.process)


def etcd_version(binary: Path = ETCD_BINARY) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return first.removeprefix("etcd Version:").strip() or "unknown"


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _argv(binary: Path, data_dir: Path, name: str, client_port: int, peer_port: int) -> list[str]:
    client = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    return [
        str(binary),
        f"--name={name}",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster={name}={peer}",
        "--log-level=warn",
    ]


def _spawn(argv: list[str], data_dir: Path) -> subprocess.Popen[bytes]:
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    with data_dir.with_suffix(".log").open("ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, and we stop etcd in order
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads exist yet when it runs
        )


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the benchmark dies without stopping etcd (SIGKILL, crash)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_until_ready(process: subprocess.Popen[bytes], endpoint: str, name: str) -> bool:
    """True once our etcd answers as healthy; False if it exited (its port was taken, say)."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if _member_names(endpoint) == [name] and _is_healthy(endpoint):
            return True
        time.sleep(0.1)
    return False


def _member_names(endpoint: str) -> list[str]:
    request = urllib.request.Request(
        f"http://{endpoint}/v3/cluster/member/list", data=b"{}", method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            members = json.load(response).get("members", [])
    except (OSError, ValueError):
        return []
    return [str(member.get("name", "")) for member in members if isinstance(member, dict)]


def _is_healthy(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=2) as response:
            return bool(json.load(response).get("health") == "true")
    except (OSError, ValueError, urllib.error.URLError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
