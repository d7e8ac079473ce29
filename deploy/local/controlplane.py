"""A local Kubernetes control plane: Debian's etcd and a real kube-apiserver on loopback.

pyabouts' Kubernetes datastore, its reconciler and the Multus end-to-end runs need a real API
server (resourceVersion conflicts, RBAC, custom resources), and no registry here ships one. So
``deploy/local/build_binaries.sh`` builds kube-apiserver from its Go module into
``~/.cache/pyabouts/bin/kube-apiserver-<version>``, and this module runs it on Debian's
``/usr/bin/etcd`` (see shared/notes/environment.md, "Kubernetes control plane"). There is no
controller-manager, scheduler or kubelet: namespaces never finish deleting, pods stay Pending,
new namespaces get no ``default`` ServiceAccount.

From the command line (from the repository root)::

    .venv/bin/python -m deploy.local.controlplane up       # starts it in the background
    eval "$(.venv/bin/python -m deploy.local.controlplane env)"
    kubectl get ns
    .venv/bin/python -m deploy.local.controlplane status
    .venv/bin/python -m deploy.local.controlplane down     # stops it, removes its state

``--dir DIR`` chooses the state directory (default ``~/.cache/pyabouts/run/controlplane``).

As a library (tests, benchmarks)::

    cp = start_control_plane(tmp_dir)   # certificates, etcd, kube-apiserver, kubeconfig
    cp.kubectl("get", "ns")             # /usr/bin/kubectl with the admin kubeconfig
    cp.restart_apiserver()              # same port, same etcd: the data survives
    cp.stop()                           # idempotent

Everything listens on 127.0.0.1 only, on free ports chosen per instance, so several control
planes (one per pytest-xdist worker) run side by side. Certificates are made with openssl: a
CA, a serving certificate for 127.0.0.1/localhost, an admin client certificate in the group
``system:masters`` and a service-account key pair.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.local.commands import LocalToolError, run_command
from deploy.local.pki import CLIENT_USAGE, SERVER_USAGE, issue_certificate, make_ca

KUBE_VERSION = "v1.34.3"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
KUBECTL = "/usr/bin/kubectl"
DEFAULT_ETCD = "/usr/bin/etcd"
MEMORY_DIR = Path("/dev/shm")
CONTEXT_NAME = "pyabouts-local"
CONTEXT_NAMESPACE = "kube-system"

# /readyz waits for post-start hooks (RBAC bootstrap roles, priority classes) that take a few
# seconds on an idle machine and minutes on two cores busy with hundreds of plugin processes.
READY_TIMEOUT_S = 240.0
ETCD_READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
KUBECTL_TIMEOUT_S = 60.0
CERT_DAYS = 365
#: Attempts at a start when a freshly chosen port turns out to be taken (a race with another
#: instance or an outgoing connection between choosing the port and binding it).
START_ATTEMPTS = 3
LOG_TAIL_CHARS = 4000

STATE_FILE = "state.json"


class ControlPlaneError(LocalToolError):
    """The control plane could not be started, reached or stopped."""


class KubectlError(ControlPlaneError):
    """kubectl exited non-zero; ``returncode``, ``stdout`` and ``stderr`` say how."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"kubectl {' '.join(self.argv[1:])} failed ({returncode}): {stderr.strip()}"
        )


def cache_dir() -> Path:
    """``$PYABOUTS_CACHE`` or ``~/.cache/pyabouts`` (the same as build_binaries.sh)."""
    env = os.environ.get("PYABOUTS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyabouts"


def default_apiserver_binary() -> Path:
    """``$PYABOUTS_KUBE_APISERVER`` or the binary build_binaries.sh caches."""
    env = os.environ.get("PYABOUTS_KUBE_APISERVER")
    return Path(env) if env else cache_dir() / "bin" / f"kube-apiserver-{KUBE_VERSION}"


def default_etcd_binary() -> Path:
    env = os.environ.get("PYABOUTS_ETCD_BINARY")
    return Path(env) if env else Path(DEFAULT_ETCD)


def default_state_dir() -> Path:
    return cache_dir() / "run" / "controlplane"


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _failed_checks(body: str) -> str:
    """The checks a /readyz answer marks failed ("[-]name failed: ..."), else its last line."""
    failed = [line.strip() for line in body.splitlines() if line.lstrip().startswith("[-]")]
    return "; ".join(failed) or body.strip()[-300:]


def _tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"


# A real control plane runs on its own machines. Here it shares two cores with the simulated
# nodes, whose hundreds of plugin processes would otherwise starve it until Multus gives up on a
# pod it cannot read within seconds. A higher CPU priority gives it back its own machine's share.
CONTROL_PLANE_NICE = -10


def _prepare_child(*, die_with_parent: bool) -> Callable[[], None]:
    """The preexec_fn of a control-plane server: its CPU priority, and its death with us."""

    def prepare() -> None:
        with contextlib.suppress(PermissionError):  # not root: keep the default priority
            os.nice(CONTROL_PLANE_NICE)
        if die_with_parent:
            _set_parent_death_signal()

    return prepare


def _set_parent_death_signal() -> None:
    """preexec_fn: SIGKILL the child when the process (thread) that started it dies.

    Keeps a crashed or killed pytest worker from leaking an apiserver and an etcd. SIGKILL, not
    SIGTERM: on SIGTERM kube-apiserver shuts down gracefully, which hangs for good once etcd
    (signalled at the same moment) is gone; nobody is left to care about a graceful exit.
    """
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Certificates:
    """Paths of the PEM files the control plane uses (all inside ``<state>/pki``)."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path

    @classmethod
    def in_dir(cls, pki: Path) -> Certificates:
        return cls(
            ca_cert=pki / "ca.crt",
            ca_key=pki / "ca.key",
            serving_cert=pki / "apiserver.crt",
            serving_key=pki / "apiserver.key",
            admin_cert=pki / "admin.crt",
            admin_key=pki / "admin.key",
            sa_key=pki / "sa.key",
            sa_pub=pki / "sa.pub",
        )

    def all_present(self) -> bool:
        return all(Path(p).is_file() for p in vars(self).values())


def make_certificates(pki: Path) -> Certificates:
    """Create the CA, serving, admin and service-account keys with openssl (reused if present)."""
    certs = Certificates.in_dir(pki)
    if certs.all_present():
        return certs
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    make_ca(pki, "pyabouts-local-ca", CERT_DAYS)
    issue_certificate(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        "subjectAltName = IP:127.0.0.1, IP:10.96.0.1, DNS:localhost, DNS:kubernetes, "
        "DNS:kubernetes.default, DNS:kubernetes.default.svc\n"
        "basicConstraints = critical, CA:FALSE\n" + SERVER_USAGE,
        CERT_DAYS,
    )
    issue_certificate(
        pki,
        "admin",
        "/O=system:masters/CN=kubernetes-admin",
        "basicConstraints = critical, CA:FALSE\n" + CLIENT_USAGE,
        CERT_DAYS,
    )
    run_command(
        [
            *("openssl", "genpkey", "-algorithm", "RSA"),
            *("-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key"),
        ],
        cwd=pki,
    )
    run_command(["openssl", "pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"], cwd=pki)
    for key in pki.glob("*.key"):
        key.chmod(0o600)
    return certs


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_cert: Path,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    token: str | None = None,
    user: str = "admin",
    namespace: str = CONTEXT_NAMESPACE,
) -> Path:
    """Write a self-contained kubeconfig (certificates embedded) with one context."""
    if token is not None:
        creds = f"    token: {token}\n"
    elif client_cert is not None and client_key is not None:
        creds = (
            f"    client-certificate-data: {_b64(client_cert)}\n"
            f"    client-key-data: {_b64(client_key)}\n"
        )
    else:
        raise ValueError("a kubeconfig needs a token or a client certificate and key")
    text = (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        f"- name: {CONTEXT_NAME}\n"
        "  cluster:\n"
        f"    server: {server}\n"
        f"    certificate-authority-data: {_b64(ca_cert)}\n"
        "users:\n"
        f"- name: {user}\n"
        "  user:\n"
        f"{creds}"
        "contexts:\n"
        f"- name: {CONTEXT_NAME}\n"
        "  context:\n"
        f"    cluster: {CONTEXT_NAME}\n"
        f"    user: {user}\n"
        f"    namespace: {namespace}\n"
        f"current-context: {CONTEXT_NAME}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- processes


@dataclass
class _Process:
    """A server process: our child (``popen``) or, from the CLI, a recorded pid."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    pid: int | None = None

    def start(self, *, die_with_parent: bool) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            log.write(f"\n==== {time.strftime('%F %T')} starting: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the shell that ran `up` does not reach the servers.
                start_new_session=True,
                preexec_fn=_prepare_child(die_with_parent=die_with_parent),  # noqa: PLW1509
            )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        if self.pid is None:
            return False
        return _pid_runs(self.pid, self.argv[0])

    def exit_code(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; a no-op when it is not running."""
        if self.pid is None or not self.alive():
            self._reap()
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not self.alive():
                    self._reap()
                    return
                time.sleep(0.05)
        raise ControlPlaneError(f"{self.name} (pid {self.pid}) survived SIGKILL")

    def _reap(self) -> None:
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=1)


def _pid_runs(pid: int, exe: str) -> bool:
    """True if ``pid`` is a live (not zombie) process whose argv[0] is ``exe``.

    The check on argv[0] keeps ``down`` from signalling an unrelated process that reuses a
    pid recorded long ago.
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


def _port_in_use(log: Path) -> bool:
    text = _tail(log).lower()
    return "address already in use" in text or "bind: address" in text


# --------------------------------------------------------------------------- control plane


@dataclass
class ControlPlane:
    """etcd plus kube-apiserver on 127.0.0.1, with an admin kubeconfig.

    Build one with :func:`start_control_plane`. ``server`` is ``https://127.0.0.1:PORT``;
    ``etcd_endpoint`` is ``http://127.0.0.1:PORT``; ``kubeconfig`` is the admin kubeconfig
    (certificates embedded, context namespace ``kube-system``).
    """

    state_dir: Path
    apiserver_binary: Path = field(default_factory=default_apiserver_binary)
    etcd_binary: Path = field(default_factory=default_etcd_binary)
    extra_apiserver_args: tuple[str, ...] = ()
    #: SIGKILL the servers when the process that started them dies (library use); the CLI's
    #: ``up`` turns this off so that they outlive it. Linux ties this to the *thread* that
    #: started them: call start() and restart_apiserver() from a thread that lives as long as
    #: the control plane (e.g. the main thread), or turn it off.
    die_with_parent: bool = True

    etcd_port: int = 0
    etcd_peer_port: int = 0
    apiserver_port: int = 0
    _etcd: _Process | None = field(default=None, repr=False)
    _apiserver: _Process | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.state_dir = self.state_dir.resolve()
        self.certs = Certificates.in_dir(self.state_dir / "pki")

    # ---- paths and addresses

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def etcd_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    @property
    def ca_cert(self) -> Path:
        return self.certs.ca_cert

    @property
    def admin_cert(self) -> Path:
        return self.certs.admin_cert

    @property
    def admin_key(self) -> Path:
        return self.certs.admin_key

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def apiserver_log(self) -> Path:
        return self.logs_dir / "kube-apiserver.log"

    @property
    def etcd_log(self) -> Path:
        return self.logs_dir / "etcd.log"

    @property
    def etcd_data_dir(self) -> Path:
        """In memory where the machine has /dev/shm: a disk busy with a test session can stall
        etcd's fsyncs for seconds, and the data starts empty on every start anyway."""
        if MEMORY_DIR.is_dir() and os.access(MEMORY_DIR, os.W_OK):
            tag = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:16]
            return MEMORY_DIR / f"pyabouts-etcd-{tag}"
        return self.state_dir / "etcd-data"

    # ---- lifecycle

    def start(self) -> None:
        """Certificates, etcd, kube-apiserver, kubeconfig; return once /readyz says ok.

        etcd's data directory starts empty on every start (certificates are reused). On
        failure everything started so far is stopped again and ControlPlaneError says why,
        with the log's tail.
        """
        if not self.apiserver_binary.is_file():
            raise ControlPlaneError(
                f"kube-apiserver binary {self.apiserver_binary} is missing: "
                "build it with `bash deploy/local/build_binaries.sh` (4-10 minutes)"
            )
        if not self.etcd_binary.is_file():
            raise ControlPlaneError(
                f"etcd binary {self.etcd_binary} is missing: run `bash deploy/local/setup.sh` "
                "(Debian package etcd-server)"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        make_certificates(self.state_dir / "pki")
        try:
            self._start_etcd()
            self._start_apiserver(new_port=True)
            write_kubeconfig(
                self.kubeconfig,
                server=self.server,
                ca_cert=self.ca_cert,
                client_cert=self.admin_cert,
                client_key=self.admin_key,
            )
            self._write_state()
        except BaseException:
            with contextlib.suppress(ControlPlaneError):
                self.stop()
            raise

    def stop(self) -> None:
        """Stop kube-apiserver, then etcd (SIGTERM, then SIGKILL). Safe to call twice."""
        errors: list[str] = []
        for proc in (self._apiserver, self._etcd):
            if proc is None:
                continue
            try:
                proc.stop()
            except ControlPlaneError as exc:
                errors.append(str(exc))
        if errors:
            raise ControlPlaneError("; ".join(errors))
        shutil.rmtree(self.etcd_data_dir, ignore_errors=True)

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver and start it again on the same port and etcd; wait for ready."""
        if self._apiserver is None:
            raise ControlPlaneError("kube-apiserver was never started")
        self._apiserver.stop()
        self._start_apiserver(new_port=False)
        self._write_state()

    def kill(self, name: str) -> None:
        """SIGKILL "etcd" or "kube-apiserver", as on a crash; start_again() brings it back."""
        process = self._component(name)
        assert process.pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.stop()  # reaps it

    def start_again(self, name: str) -> None:
        """Start a killed component on its old port (etcd: and its data); wait until ready."""
        if name == "kube-apiserver":
            self._start_apiserver(new_port=False)
            return
        self._component(name).start(die_with_parent=self.die_with_parent)
        self._wait_etcd()

    def _component(self, name: str) -> _Process:
        process = {"etcd": self._etcd, "kube-apiserver": self._apiserver}[name]
        if process is None:
            raise ControlPlaneError(f"{name} was never started")
        return process

    def running(self) -> bool:
        return all(p is not None and p.alive() for p in (self._etcd, self._apiserver))

    def pids(self) -> dict[str, int | None]:
        return {
            "etcd": None if self._etcd is None else self._etcd.pid,
            "kube-apiserver": None if self._apiserver is None else self._apiserver.pid,
        }

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_etcd(self) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            shutil.rmtree(self.etcd_data_dir, ignore_errors=True)
            self.etcd_port, self.etcd_peer_port = free_port(), free_port()
            peer = f"http://127.0.0.1:{self.etcd_peer_port}"
            self._etcd = _Process(
                name="etcd",
                argv=[
                    str(self.etcd_binary),
                    *("--name", "pyabouts-local"),
                    *("--data-dir", str(self.etcd_data_dir)),
                    *("--listen-client-urls", self.etcd_endpoint),
                    *("--advertise-client-urls", self.etcd_endpoint),
                    *("--listen-peer-urls", peer),
                    *("--initial-advertise-peer-urls", peer),
                    *("--initial-cluster", f"pyabouts-local={peer}"),
                    *("--log-outputs", "stderr"),
                ],
                log=self.etcd_log,
            )
            self._etcd.start(die_with_parent=self.die_with_parent)
            try:
                self._wait_etcd()
                return
            except ControlPlaneError:
                self._etcd.stop()
                if attempt == START_ATTEMPTS or not _port_in_use(self.etcd_log):
                    raise

    def _wait_etcd(self) -> None:
        assert self._etcd is not None
        deadline = time.monotonic() + ETCD_READY_TIMEOUT_S
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not self._etcd.alive():
                raise ControlPlaneError(
                    f"etcd exited ({self._etcd.exit_code()}) before it became healthy; "
                    f"log tail ({self.etcd_log}):\n{_tail(self.etcd_log)}"
                )
            try:
                with urllib.request.urlopen(f"{self.etcd_endpoint}/health", timeout=2) as resp:
                    body = json.loads(resp.read())
                if body.get("health") == "true":
                    return
                last = f"/health said {body}"
            except (OSError, ValueError) as exc:
                last = repr(exc)
            time.sleep(0.05)
        raise ControlPlaneError(
            f"etcd at {self.etcd_endpoint} not healthy after {ETCD_READY_TIMEOUT_S:.0f} s "
            f"({last}); log tail ({self.etcd_log}):\n{_tail(self.etcd_log)}"
        )

    def _apiserver_argv(self) -> list[str]:
        c = self.certs
        return [
            str(self.apiserver_binary),
            f"--etcd-servers={self.etcd_endpoint}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.apiserver_port}",
            f"--tls-cert-file={c.serving_cert}",
            f"--tls-private-key-file={c.serving_key}",
            f"--client-ca-file={c.ca_cert}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={c.sa_pub}",
            f"--service-account-signing-key-file={c.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            # Only used when the TLS files above are missing; keeps it out of /var/run.
            f"--cert-dir={self.state_dir / 'pki' / 'generated'}",
            *self.extra_apiserver_args,
        ]

    def _start_apiserver(self, *, new_port: bool) -> None:
        attempts = START_ATTEMPTS if new_port else 1
        for attempt in range(1, attempts + 1):
            if new_port:
                self.apiserver_port = free_port()
            self._apiserver = _Process(
                name="kube-apiserver", argv=self._apiserver_argv(), log=self.apiserver_log
            )
            self._apiserver.start(die_with_parent=self.die_with_parent)
            try:
                self.wait_ready()
                return
            except ControlPlaneError:
                self._apiserver.stop()
                if attempt == attempts or not _port_in_use(self.apiserver_log):
                    raise

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Poll /readyz until it answers ``ok``, then wait for the kube-system namespace."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        for path, want in (("/readyz", "ok"), ("/api/v1/namespaces/kube-system", None)):
            while True:
                if self._apiserver is not None and not self._apiserver.alive():
                    raise ControlPlaneError(
                        f"kube-apiserver exited ({self._apiserver.exit_code()}) before it was "
                        f"ready; log tail ({self.apiserver_log}):\n{_tail(self.apiserver_log)}"
                    )
                try:
                    status, body = self._get(path, timeout=5)
                    if status == 200 and (want is None or body.strip() == want):
                        break
                    last = f"{path}: HTTP {status}: {_failed_checks(body)}"
                except (OSError, ssl.SSLError) as exc:
                    last = f"{path}: {exc!r}"
                if time.monotonic() > deadline:
                    raise ControlPlaneError(
                        f"kube-apiserver at {self.server} not ready after {timeout:.0f} s "
                        f"({last}); log tail ({self.apiserver_log}):\n"
                        f"{_tail(self.apiserver_log)}"
                    )
                time.sleep(0.1)

    # ---- talking to it

    def ssl_context(self) -> ssl.SSLContext:
        """TLS context trusting the CA and presenting the admin client certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        context.load_cert_chain(str(self.admin_cert), str(self.admin_key))
        return context

    def _get(self, path: str, *, timeout: float) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"{self.server}{path}", timeout=timeout, context=self.ssl_context()
            ) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def request(
        self, method: str, path: str, body: Any = None, *, timeout: float = 30.0
    ) -> tuple[int, Any]:
        """One raw API call as admin: ``(HTTP status, decoded JSON body or text)``.

        ``body`` is sent as JSON (``application/merge-patch+json`` for PATCH). Non-2xx
        statuses are returned, not raised, so that callers can look at a 409 Conflict.
        """
        data = None if body is None else json.dumps(body).encode()
        ctype = "application/merge-patch+json" if method == "PATCH" else "application/json"
        req = urllib.request.Request(f"{self.server}{path}", data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", ctype)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context()) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def kubectl_run(
        self, *args: str, input: str | None = None, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl with this control plane's kubeconfig; the result, whatever the exit."""
        config = kubeconfig or self.kubeconfig
        argv = [
            KUBECTL,
            f"--kubeconfig={config}",
            # Its own discovery cache: another instance may have had this port before.
            f"--cache-dir={self.state_dir / 'kubectl-cache'}",
            *args,
        ]
        env = dict(os.environ, KUBECONFIG=str(config))
        return subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=KUBECTL_TIMEOUT_S,
            env=env,
            check=False,
        )

    def kubectl(self, *args: str, input: str | None = None, kubeconfig: Path | None = None) -> str:
        """Run kubectl; return its stdout, raise :class:`KubectlError` (with stderr) if it fails."""
        proc = self.kubectl_run(*args, input=input, kubeconfig=kubeconfig)
        if proc.returncode != 0:
            raise KubectlError(proc.args, proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    def service_account_token(self, namespace: str, name: str, *, duration: str = "24h") -> str:
        """A bound token of ServiceAccount ``namespace/name``, which must exist."""
        return self.kubectl(
            "create", "token", name, "-n", namespace, f"--duration={duration}"
        ).strip()

    def service_account_kubeconfig(
        self, namespace: str, name: str, path: Path | None = None, *, duration: str = "24h"
    ) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` (a bound token).

        The ServiceAccount must exist (nothing creates ``default`` ones here).
        """
        token = self.service_account_token(namespace, name, duration=duration)
        path = path or self.state_dir / f"kubeconfig-sa-{namespace}-{name}"
        return write_kubeconfig(
            path,
            server=self.server,
            ca_cert=self.ca_cert,
            token=token,
            user=f"system:serviceaccount:{namespace}:{name}",
            namespace=namespace,
        )

    # ---- state file (for the CLI)

    def _write_state(self) -> None:
        state = {
            "version": KUBE_VERSION,
            "server": self.server,
            "etcd_endpoint": self.etcd_endpoint,
            "etcd_port": self.etcd_port,
            "etcd_peer_port": self.etcd_peer_port,
            "apiserver_port": self.apiserver_port,
            "kubeconfig": str(self.kubeconfig),
            "apiserver_binary": str(self.apiserver_binary),
            "etcd_binary": str(self.etcd_binary),
            "pids": self.pids(),
            "argv": {
                "etcd": None if self._etcd is None else self._etcd.argv,
                "kube-apiserver": None if self._apiserver is None else self._apiserver.argv,
            },
        }
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_dir / STATE_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> ControlPlane:
        """The control plane recorded in ``state_dir`` by ``up`` (its processes by pid)."""
        state_file = state_dir / STATE_FILE
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as exc:
            raise ControlPlaneError(f"no control plane state in {state_dir}: {exc}") from exc
        cp = cls(
            state_dir=state_dir,
            apiserver_binary=Path(state["apiserver_binary"]),
            etcd_binary=Path(state["etcd_binary"]),
            die_with_parent=False,
            etcd_port=int(state["etcd_port"]),
            etcd_peer_port=int(state["etcd_peer_port"]),
            apiserver_port=int(state["apiserver_port"]),
        )
        pids, argvs = state.get("pids", {}), state.get("argv", {})
        for name, log in (("etcd", cp.etcd_log), ("kube-apiserver", cp.apiserver_log)):
            if pids.get(name) and argvs.get(name):
                proc = _Process(name=name, argv=list(argvs[name]), log=log, pid=int(pids[name]))
                if name == "etcd":
                    cp._etcd = proc
                else:
                    cp._apiserver = proc
        return cp


def start_control_plane(
    state_dir: Path,
    *,
    apiserver_binary: Path | None = None,
    etcd_binary: Path | None = None,
    extra_apiserver_args: Sequence[str] = (),
    die_with_parent: bool = True,
) -> ControlPlane:
    """Start etcd and kube-apiserver with their state in ``state_dir``; wait until ready.

    Raises :class:`ControlPlaneError` (nothing left running) if a binary is missing or a
    server does not come up within READY_TIMEOUT_S.
    """
    cp = ControlPlane(
        state_dir=state_dir,
        apiserver_binary=apiserver_binary or default_apiserver_binary(),
        etcd_binary=etcd_binary or default_etcd_binary(),
        extra_apiserver_args=tuple(extra_apiserver_args),
        die_with_parent=die_with_parent,
    )
    cp.start()
    return cp


# --------------------------------------------------------------------------- CLI


def _export_line(kubeconfig: Path) -> str:
    return f"export KUBECONFIG={kubeconfig}"


def _cmd_up(state_dir: Path) -> int:
    if (state_dir / STATE_FILE).is_file():
        old = ControlPlane.load(state_dir)
        if old.running():
            print(f"[controlplane] already running: {old.server}", file=sys.stderr)
            print(_export_line(old.kubeconfig))
            return 0
        old.stop()  # whatever half of it is left
    t0 = time.monotonic()
    cp = start_control_plane(state_dir, die_with_parent=False)
    pids = ", ".join(f"{k} {v}" for k, v in cp.pids().items())
    print(
        f"[controlplane] kube-apiserver {KUBE_VERSION} ready at {cp.server} in "
        f"{time.monotonic() - t0:.1f} s (etcd {cp.etcd_endpoint}; pids: {pids}; "
        f"logs: {cp.logs_dir})",
        file=sys.stderr,
    )
    print(_export_line(cp.kubeconfig))
    return 0


def _cmd_down(state_dir: Path) -> int:
    if not state_dir.exists():
        print(f"[controlplane] nothing in {state_dir}", file=sys.stderr)
        return 0
    if not (state_dir / STATE_FILE).is_file():
        if any(state_dir.iterdir()) and not (state_dir / "pki").is_dir():
            print(
                f"[controlplane] {state_dir} holds no control plane state; not removing it",
                file=sys.stderr,
            )
            return 1
    else:
        ControlPlane.load(state_dir).stop()
    shutil.rmtree(state_dir)
    print(f"[controlplane] stopped; removed {state_dir}", file=sys.stderr)
    return 0


def _cmd_status(state_dir: Path) -> int:
    try:
        cp = ControlPlane.load(state_dir)
    except ControlPlaneError:
        print(f"not running (no state in {state_dir})")
        return 1
    ok = True
    for name, proc in (("etcd", cp._etcd), ("kube-apiserver", cp._apiserver)):
        alive = proc is not None and proc.alive()
        ok = ok and alive
        pid = None if proc is None else proc.pid
        print(f"{name}: {'running' if alive else 'not running'} (pid {pid})")
    try:
        status, body = cp._get("/readyz", timeout=5)
        ready = status == 200 and body.strip() == "ok"
        print(f"{cp.server}/readyz: HTTP {status} {body.strip()[:200]}")
    except (OSError, ssl.SSLError) as exc:
        ready = False
        print(f"{cp.server}/readyz: {exc}")
    print(f"etcd: {cp.etcd_endpoint}")
    print(f"kubeconfig: {cp.kubeconfig}")
    return 0 if ok and ready else 1


def _cmd_env(state_dir: Path) -> int:
    cp = ControlPlane.load(state_dir)
    print(_export_line(cp.kubeconfig))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local.controlplane",
        description="A local etcd + kube-apiserver on 127.0.0.1 (see the module docstring).",
    )
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument(
        "--dir",
        type=Path,
        default=default_state_dir(),
        help="state directory (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    state_dir: Path = args.dir.expanduser().resolve()
    commands = {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status, "env": _cmd_env}
    try:
        return commands[args.command](state_dir)
    except ControlPlaneError as exc:
        print(f"[controlplane] error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
