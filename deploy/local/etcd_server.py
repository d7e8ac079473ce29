"""etcd for the local tooling: the one type describing a running etcd, and the one launcher.

:class:`EtcdServer` says how to reach an etcd (endpoint, TLS files, user) and, when it is a
process of ours, holds it (kill, start again, stop). :func:`start_etcd` runs Debian's binary
(``$PYABOUTS_ETCD_BINARY`` or ``/usr/bin/etcd``) on free loopback ports as a
:class:`~deploy.local.supervision.SupervisedProcess`, plain or, given :class:`EtcdTls`, serving
TLS to clients that must present a certificate; the control plane stores its data in it, the
tests' session fixtures (``tests/integration/etcd_fixtures.py``) start theirs with it, the
benchmark and the fault tests use :func:`running_etcd`.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from deploy.local.ports import free_ports
from deploy.local.supervision import (
    ProcessError,
    ReadinessProbe,
    SupervisedProcess,
    start_on_free_ports,
)
from pyabouts.ipam.stores.etcd_settings import url_host

DEFAULT_ETCD_BINARY = Path("/usr/bin/etcd")
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
MEMORY_DIR = Path("/dev/shm")


def default_etcd_binary() -> Path:
    """``$PYABOUTS_ETCD_BINARY`` or Debian's ``/usr/bin/etcd``."""
    env = os.environ.get("PYABOUTS_ETCD_BINARY")
    return Path(env) if env else DEFAULT_ETCD_BINARY


@dataclass(frozen=True)
class EtcdServer:
    """How to reach a running etcd, and the process when it is ours.

    ``endpoint`` is ``"127.0.0.1:PORT"`` (``"[::1]:PORT"`` on IPv6; no scheme), as pyabouts'
    ``etcd_host`` takes it. The
    TLS fields are file paths on this host (all ``None`` for a plain server);
    ``username``/``password`` are ``None`` without auth. ``process`` is ``None`` for an etcd
    that is not our child: kill() and start_again() need one.
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

    def ssl_context(self) -> ssl.SSLContext | None:
        """For an HTTPS client of this etcd (its CA, our client certificate); None if plain."""
        if self.ca_cert is None:
            return None
        context = ssl.create_default_context(cafile=self.ca_cert)
        if self.cert is not None and self.key is not None:
            context.load_cert_chain(self.cert, self.key)
        return context

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


@dataclass(frozen=True)
class EtcdTls:
    """TLS for a started etcd's clients, all file paths.

    etcd serves ``server_cert``/``server_key`` (valid for 127.0.0.1) and takes only clients
    whose certificate ``ca_cert`` signed (``--client-cert-auth``); ``ca_cert`` signed the
    server's too, which must be good for client auth as well (``extendedKeyUsage = serverAuth,
    clientAuth``): etcd's HTTP gateway, which the readiness probe asks for the member list,
    calls etcd's gRPC server with it. ``client_cert``/``client_key`` are a client's: the
    probe's, and the ones the returned :class:`EtcdServer` carries.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def memory_dir() -> Path | None:
    """``/dev/shm`` where the machine has a writable one, for etcd's data: on a disk busy with a
    test session etcd's fsyncs can stall for seconds, past a client's timeout."""
    if MEMORY_DIR.is_dir() and os.access(MEMORY_DIR, os.W_OK):
        return MEMORY_DIR
    return None


def etcd_health(url: str, context: ssl.SSLContext | None = None) -> str | None:
    """None when etcd at ``url`` says it is healthy; otherwise what it said.

    Raises OSError or ValueError when it does not answer (yet) or answers nonsense.
    """
    with urllib.request.urlopen(f"{url}/health", timeout=2, context=context) as resp:
        body = json.loads(resp.read())
    return None if body.get("health") == "true" else f"/health said {body}"


def _member_names(url: str, context: ssl.SSLContext | None) -> list[str]:
    request = urllib.request.Request(f"{url}/v3/cluster/member/list", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=2, context=context) as response:
        members = json.load(response).get("members", [])
    return [str(member.get("name", "")) for member in members if isinstance(member, dict)]


def _ours_and_healthy(server: EtcdServer, name: str) -> ReadinessProbe:
    url, context = server.url, server.ssl_context()

    def probe() -> str | None:
        members = _member_names(url, context)
        if members != [name]:
            return f"{url} is a member of {members}, not {name}"
        return etcd_health(url, context)

    return probe


def _tls_arguments(tls: EtcdTls | None) -> list[str]:
    if tls is None:
        return []
    return [
        f"--cert-file={tls.server_cert}",
        f"--key-file={tls.server_key}",
        "--client-cert-auth",
        f"--trusted-ca-file={tls.ca_cert}",
    ]


def start_etcd(
    data_dir: Path,
    log: Path,
    *,
    binary: Path | None = None,
    tls: EtcdTls | None = None,
    die_with_parent: bool = True,
    nice: int | None = None,
    extra_args: Sequence[str] = (),
    host: str = "127.0.0.1",
) -> EtcdServer:
    """Start a single-member etcd on free 127.0.0.1 ports; return once it is ours and healthy.
    Its clients reach it on ``host`` (``"::1"``, say; its peer port stays on 127.0.0.1).

    ``data_dir`` starts empty (whatever is there is removed). With ``tls`` its clients speak
    HTTPS and must present a certificate of ``tls.ca_cert``; the returned server carries that
    CA and ``tls``' client certificate. ``die_with_parent`` and ``nice`` as for
    :class:`SupervisedProcess`; ``extra_args`` are etcd flags of the caller's choosing.
    Raises ProcessError (nothing left running) if it does not come up.
    """
    binary = binary or default_etcd_binary()
    server = EtcdServer(endpoint="")

    def make() -> SupervisedProcess:
        nonlocal server
        shutil.rmtree(data_dir, ignore_errors=True)
        client_port, peer_port = free_ports(1, host)[0], free_ports(1)[0]
        server = EtcdServer(
            endpoint=f"{url_host(host)}:{client_port}",
            ca_cert=None if tls is None else str(tls.ca_cert),
            cert=None if tls is None else str(tls.client_cert),
            key=None if tls is None else str(tls.client_key),
        )
        client, peer = server.url, f"http://127.0.0.1:{peer_port}"
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
                *_tls_arguments(tls),
                "--log-level=warn",
                *extra_args,
            ],
            log=log,
            ready=_ours_and_healthy(server, name),
            ready_timeout=READY_TIMEOUT_S,
            nice=nice,
            die_with_parent=die_with_parent,
            stop_timeout=STOP_TIMEOUT_S,
        )

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    process = start_on_free_ports(make)
    return replace(server, process=process)


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
