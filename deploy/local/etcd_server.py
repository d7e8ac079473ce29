"""etcd for the local tooling: the one type describing a running etcd, and the one launcher.

:class:`EtcdServer` says how to reach an etcd (endpoint, TLS files, user) and, when it is a
process of ours, holds it (kill, start again, stop). :func:`start_etcd` runs Debian's binary
(``$PYABOUTS_ETCD_BINARY`` or ``/usr/bin/etcd``) on free loopback ports as a
:class:`~deploy.local.supervision.SupervisedProcess`; the control plane stores its data in it,
the benchmark and the fault tests use :func:`running_etcd`. The tests' session fixtures run etcd
in a container instead (``tests/integration/etcd_fixtures.py``) and describe it with the same
type.

Other etcds may run on the same machine (test sessions), so "healthy" is not enough: the server
that answers must be ours, which the member list tells by our unique member name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import ssl
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.ports import free_ports
from deploy.local.supervision import (
    ProcessError,
    ReadinessProbe,
    SupervisedProcess,
    start_on_free_ports,
)

DEFAULT_ETCD_BINARY = Path("/usr/bin/etcd")
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def default_etcd_binary() -> Path:
    """``$PYABOUTS_ETCD_BINARY`` or Debian's ``/usr/bin/etcd``."""
    env = os.environ.get("PYABOUTS_ETCD_BINARY")
    return Path(env) if env else DEFAULT_ETCD_BINARY


@dataclass(frozen=True)
class EtcdServer:
    """How to reach a running etcd, and the process when it is ours.

    ``endpoint`` is ``"127.0.0.1:PORT"`` (no scheme), as pyabouts' ``etcd_host`` takes it. The
    TLS fields are file paths on this host (all ``None`` for a plain server);
    ``username``/``password`` are ``None`` without auth. ``process`` is ``None`` for an etcd
    that is not our child (a container): kill() and start_again() need one.
    """

    endpoint: str
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = None
    process: SupervisedProcess | None = field(default=None, compare=False, repr=False)

    @property
    def host(self) -> str:
        return self.endpoint.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    @property
    def tls(self) -> bool:
        return self.ca_cert is not None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def kill(self) -> None:
        """SIGKILL, as on a crash: nothing is flushed or closed."""
        self._own().kill()

    def start_again(self) -> None:
        """Start it on the same ports and data (after kill()); return once it is healthy."""
        self._own().start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; a no-op for an etcd that is not ours or not running."""
        if self.process is not None:
            self.process.stop()

    def _own(self) -> SupervisedProcess:
        if self.process is None:
            raise ProcessError(f"etcd at {self.url} is not a process of ours")
        return self.process


def etcd_health(url: str, context: ssl.SSLContext | None = None) -> str | None:
    """None when etcd at ``url`` says it is healthy; otherwise what it said.

    Raises OSError or ValueError when it does not answer (yet) or answers nonsense.
    """
    with urllib.request.urlopen(f"{url}/health", timeout=2, context=context) as resp:
        body = json.loads(resp.read())
    return None if body.get("health") == "true" else f"/health said {body}"


def _member_names(url: str) -> list[str]:
    request = urllib.request.Request(f"{url}/v3/cluster/member/list", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=2) as response:
        members = json.load(response).get("members", [])
    return [str(member.get("name", "")) for member in members if isinstance(member, dict)]


def _ours_and_healthy(url: str, name: str) -> ReadinessProbe:
    def probe() -> str | None:
        members = _member_names(url)
        if members != [name]:
            return f"{url} is a member of {members}, not {name}"
        return etcd_health(url)

    return probe


def start_etcd(
    data_dir: Path,
    log: Path,
    *,
    binary: Path | None = None,
    die_with_parent: bool = True,
    nice: int | None = None,
) -> EtcdServer:
    """Start a single-member etcd on free 127.0.0.1 ports; return once it is ours and healthy.

    ``data_dir`` starts empty (whatever is there is removed). ``die_with_parent`` and ``nice``
    as for :class:`SupervisedProcess`. Raises ProcessError (nothing left running) if it does
    not come up.
    """
    binary = binary or default_etcd_binary()
    client_port = 0

    def make() -> SupervisedProcess:
        nonlocal client_port
        shutil.rmtree(data_dir, ignore_errors=True)
        client_port, peer_port = free_ports(2)
        client, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        name = f"pyabouts-{uuid.uuid4().hex[:12]}"
        return SupervisedProcess(
            name="etcd",
            argv=[
                str(binary),
                f"--name={name}",
                f"--data-dir={data_dir}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster={name}={peer}",
                "--log-level=warn",
            ],
            log=log,
            ready=_ours_and_healthy(client, name),
            ready_timeout=READY_TIMEOUT_S,
            nice=nice,
            die_with_parent=die_with_parent,
            stop_timeout=STOP_TIMEOUT_S,
        )

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    process = start_on_free_ports(make)
    return EtcdServer(endpoint=f"127.0.0.1:{client_port}", process=process)


@contextlib.contextmanager
def running_etcd(workdir: Path, binary: Path | None = None) -> Iterator[EtcdServer]:
    """An etcd with its data and log under ``workdir``, stopped on the way out."""
    server = start_etcd(workdir / "etcd-data", workdir / "etcd.log", binary=binary)
    try:
        yield server
    finally:
        server.stop()


def etcd_version(binary: Path | None = None) -> str:
    binary = binary or default_etcd_binary()
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return first.removeprefix("etcd Version:").strip() or "unknown"
