"""A local Kubernetes control plane: Debian's etcd and a real kube-apiserver on loopback.

pyabouts' Kubernetes datastore, its reconciler and the Multus end-to-end runs need a real API
server (resourceVersion conflicts, RBAC, custom resources), and no registry here ships one. So
``deploy/local/build_binaries.sh`` builds kube-apiserver from its Go module into
``~/.cache/pyabouts/bin/kube-apiserver-<version>``, and this module runs it on Debian's
``/usr/bin/etcd`` (see shared/notes/environment.md, "Kubernetes control plane"). There is no
controller-manager, scheduler or kubelet: namespaces never finish deleting, pods stay Pending,
new namespaces get no ``default`` ServiceAccount.

It is composed of the parts beside it: certificates (``pki.py``), etcd (``etcd_server.py``),
kube-apiserver as a supervised process (``supervision.py``), kubeconfigs (``kubeconfigs.py``).
From the command line (``controlplane_cli.py``; from the repository root)::

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
planes (one per pytest-xdist worker) run side by side. The local cluster's (``cluster.py``)
listens on its pod bridge's address instead (``address``) and serves a kubelet
(``serves_nodes``). Certificates are made with openssl: a
CA, a serving certificate for 127.0.0.1/localhost, an admin client certificate in the group
``system:masters`` and a service-account key pair.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.local.commands import LocalToolError
from deploy.local.etcd_server import EtcdServer, default_etcd_binary, memory_dir, start_etcd
from deploy.local.kubeconfigs import write_kubeconfig
from deploy.local.pki import Certificates, make_certificates
from deploy.local.ports import free_port
from deploy.local.supervision import ProcessError, SupervisedProcess, start_on_free_ports

KUBE_VERSION = "v1.34.3"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
KUBECTL = "/usr/bin/kubectl"

# /readyz waits for post-start hooks (RBAC bootstrap roles, priority classes) that take a few
# seconds on an idle machine and minutes on two cores busy with hundreds of plugin processes.
READY_TIMEOUT_S = 240.0
KUBECTL_TIMEOUT_S = 60.0  # unless the command's own --timeout is longer

# A real control plane runs on its own machines. Here it shares two cores with the simulated
# nodes, whose hundreds of plugin processes would otherwise starve it until Multus gives up on a
# pod it cannot read within seconds. A higher CPU priority gives it back its own machine's share.
CONTROL_PLANE_NICE = -10

STATE_FILE = "state.json"
LOOPBACK = "127.0.0.1"


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


@contextlib.contextmanager
def _as_control_plane_error() -> Iterator[None]:
    """A server that does not start or stop is the control plane's failure, for its callers."""
    try:
        yield
    except ProcessError as exc:
        raise ControlPlaneError(str(exc)) from exc


def cache_dir() -> Path:
    """``$PYABOUTS_CACHE`` or ``~/.cache/pyabouts`` (the same as build_binaries.sh)."""
    env = os.environ.get("PYABOUTS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyabouts"


def default_apiserver_binary() -> Path:
    """``$PYABOUTS_KUBE_APISERVER`` or the binary build_binaries.sh caches."""
    env = os.environ.get("PYABOUTS_KUBE_APISERVER")
    return Path(env) if env else cache_dir() / "bin" / f"kube-apiserver-{KUBE_VERSION}"


def default_state_dir() -> Path:
    return cache_dir() / "run" / "controlplane"


def _failed_checks(body: str) -> str:
    """The checks a /readyz answer marks failed ("[-]name failed: ..."), else its last line."""
    failed = [line.strip() for line in body.splitlines() if line.lstrip().startswith("[-]")]
    return "; ".join(failed) or body.strip()[-300:]


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
    #: Where kube-apiserver listens and what it advertises (the ``kubernetes`` Service's
    #: endpoint): loopback alone, or a node's pod-bridge address that pods can reach too.
    address: str = LOOPBACK
    #: Serve a node (kubelet): Node authorization, ServiceAccount admission, and a client
    #: certificate for the kubelet's API (logs, exec).
    serves_nodes: bool = False

    apiserver_port: int = 0
    etcd: EtcdServer | None = field(default=None, repr=False)
    _apiserver: SupervisedProcess | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.state_dir = self.state_dir.resolve()
        self.certs = Certificates.in_dir(self.state_dir / "pki")

    # ---- paths and addresses

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.apiserver_port}"

    @property
    def etcd_endpoint(self) -> str:
        return f"http://127.0.0.1:{0 if self.etcd is None else self.etcd.port}"

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
        """In memory where the machine has /dev/shm (see memory_dir()); the data starts empty
        on every start anyway."""
        memory = memory_dir()
        if memory is not None:
            tag = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:16]
            return memory / f"pyabouts-etcd-{tag}"
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
        serving_ips = () if self.address == LOOPBACK else (self.address,)
        make_certificates(self.state_dir / "pki", serving_ips)
        try:
            with _as_control_plane_error():
                self.etcd = start_etcd(
                    self.etcd_data_dir,
                    self.etcd_log,
                    binary=self.etcd_binary,
                    die_with_parent=self.die_with_parent,
                    nice=CONTROL_PLANE_NICE,
                )
                self._apiserver = start_on_free_ports(self._new_apiserver)
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
        for proc in self.processes().values():
            try:
                proc.stop()
            except ProcessError as exc:
                errors.append(str(exc))
        if errors:
            raise ControlPlaneError("; ".join(errors))
        shutil.rmtree(self.etcd_data_dir, ignore_errors=True)

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver and start it again on the same port and etcd; wait for ready."""
        with _as_control_plane_error():
            self._component("kube-apiserver").restart()
        self._write_state()

    def kill(self, name: str) -> None:
        """SIGKILL "etcd" or "kube-apiserver", as on a crash; start_again() brings it back."""
        with _as_control_plane_error():
            self._component(name).kill()

    def start_again(self, name: str) -> None:
        """Start a killed component on its old port (etcd: and its data); wait until ready."""
        with _as_control_plane_error():
            self._component(name).start()

    def _component(self, name: str) -> SupervisedProcess:
        process = self.processes().get(name)
        if process is None:
            raise ControlPlaneError(f"{name} was never started")
        return process

    def processes(self) -> dict[str, SupervisedProcess]:
        """Its servers that were started (or adopted from the state file), in stopping order."""
        found = {"kube-apiserver": self._apiserver}
        found["etcd"] = None if self.etcd is None else self.etcd.process
        return {name: proc for name, proc in found.items() if proc is not None}

    def running(self) -> bool:
        processes = self.processes()
        return len(processes) == 2 and all(p.alive() for p in processes.values())

    def pids(self) -> dict[str, int | None]:
        processes = self.processes()
        return {
            name: None if name not in processes else processes[name].pid
            for name in ("etcd", "kube-apiserver")
        }

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _apiserver_argv(self) -> list[str]:
        c = self.certs
        return [
            str(self.apiserver_binary),
            f"--etcd-servers={self.etcd_endpoint}",
            f"--bind-address={self.address}",
            f"--advertise-address={self.address}",
            f"--secure-port={self.apiserver_port}",
            f"--tls-cert-file={c.serving_cert}",
            f"--tls-private-key-file={c.serving_key}",
            f"--client-ca-file={c.ca_cert}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={c.sa_pub}",
            f"--service-account-signing-key-file={c.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            *(self._node_serving_args() if self.serves_nodes else self._no_node_args()),
            # Only used when the TLS files above are missing; keeps it out of /var/run.
            f"--cert-dir={self.state_dir / 'pki' / 'generated'}",
            *self.extra_apiserver_args,
        ]

    @staticmethod
    def _no_node_args() -> list[str]:
        # Without a controller-manager nobody would create the ServiceAccounts it requires.
        return ["--authorization-mode=RBAC", "--disable-admission-plugins=ServiceAccount"]

    def _node_serving_args(self) -> list[str]:
        return [
            "--authorization-mode=Node,RBAC",
            # As kubeadm's and kind's: node DaemonSets (Multus') run privileged containers.
            "--allow-privileged=true",
            # The node's name does not resolve here; its InternalIP (the bridge) does.
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--kubelet-client-certificate={self.admin_cert}",
            f"--kubelet-client-key={self.admin_key}",
        ]

    def _new_apiserver(self) -> SupervisedProcess:
        """kube-apiserver on a newly chosen port (not started)."""
        self.apiserver_port = free_port()
        return self._apiserver_process(self._apiserver_argv())

    def _apiserver_process(self, argv: list[str], pid: int | None = None) -> SupervisedProcess:
        return SupervisedProcess(
            name="kube-apiserver",
            argv=argv,
            log=self.apiserver_log,
            ready=self._apiserver_not_ready,
            ready_timeout=READY_TIMEOUT_S,
            nice=CONTROL_PLANE_NICE,
            die_with_parent=self.die_with_parent,
            pid=pid,
        )

    def _apiserver_not_ready(self) -> str | None:
        """None once /readyz says ``ok`` and the kube-system namespace exists; else why not."""
        for path, want in (("/readyz", "ok"), ("/api/v1/namespaces/kube-system", None)):
            try:
                status, body = self._get(path, timeout=5)
            except OSError as exc:  # ssl.SSLError included
                return f"{self.server}{path}: {exc!r}"
            if status != 200 or (want is not None and body.strip() != want):
                return f"{self.server}{path}: HTTP {status}: {_failed_checks(body)}"
        return None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Poll /readyz until it answers ``ok``, then wait for the kube-system namespace."""
        with _as_control_plane_error():
            self._component("kube-apiserver").wait_ready(timeout)

    def readyz(self) -> str:
        """What ``/readyz`` answers now, on one line (for a status display)."""
        try:
            status, body = self._get("/readyz", timeout=5)
        except OSError as exc:  # ssl.SSLError included
            return f"{self.server}/readyz: {exc}"
        return f"{self.server}/readyz: HTTP {status} {body.strip()[:200]}"

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
            timeout=_kubectl_timeout(args),
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
        self,
        namespace: str,
        name: str,
        path: Path | None = None,
        *,
        duration: str = "24h",
        context_namespace: str | None = None,
    ) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` (a bound token),
        its context in ``context_namespace`` (default: the ServiceAccount's).

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
            namespace=context_namespace or namespace,
        )

    # ---- state file (for the CLI)

    def _write_state(self) -> None:
        processes = self.processes()
        state = {
            "version": KUBE_VERSION,
            "server": self.server,
            "etcd_endpoint": self.etcd_endpoint,
            "apiserver_port": self.apiserver_port,
            "address": self.address,
            "serves_nodes": self.serves_nodes,
            "kubeconfig": str(self.kubeconfig),
            "apiserver_binary": str(self.apiserver_binary),
            "etcd_binary": str(self.etcd_binary),
            "pids": self.pids(),
            "argv": {name: proc.argv for name, proc in processes.items()},
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
            apiserver_port=int(state["apiserver_port"]),
            address=str(state.get("address", LOOPBACK)),
            serves_nodes=bool(state.get("serves_nodes", False)),
        )
        pids, argvs = state.get("pids", {}), state.get("argv", {})
        etcd_endpoint = str(state["etcd_endpoint"]).removeprefix("http://")
        if pids.get("etcd") and argvs.get("etcd"):
            etcd = SupervisedProcess(
                name="etcd",
                argv=list(argvs["etcd"]),
                log=cp.etcd_log,
                die_with_parent=False,
                pid=int(pids["etcd"]),
            )
            cp.etcd = EtcdServer(endpoint=etcd_endpoint, process=etcd)
        else:
            cp.etcd = EtcdServer(endpoint=etcd_endpoint)
        if pids.get("kube-apiserver") and argvs.get("kube-apiserver"):
            cp._apiserver = cp._apiserver_process(
                list(argvs["kube-apiserver"]), pid=int(pids["kube-apiserver"])
            )
        return cp


def start_control_plane(
    state_dir: Path,
    *,
    apiserver_binary: Path | None = None,
    etcd_binary: Path | None = None,
    extra_apiserver_args: Sequence[str] = (),
    die_with_parent: bool = True,
    address: str = LOOPBACK,
    serves_nodes: bool = False,
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
        address=address,
        serves_nodes=serves_nodes,
    )
    cp.start()
    return cp


if __name__ == "__main__":  # python -m deploy.local.controlplane up|down|status|env
    from deploy.local.controlplane_cli import main

    sys.exit(main())


def _kubectl_timeout(args: tuple[str, ...]) -> float:
    """How long to let kubectl run: its own ``--timeout=`` (wait, rollout status, delete) with
    a margin, else KUBECTL_TIMEOUT_S."""
    for arg in args:
        match = re.fullmatch(r"--timeout=(\d+)(s|m)", arg)
        if match:
            seconds = int(match[1]) * (60 if match[2] == "m" else 1)
            return max(KUBECTL_TIMEOUT_S, seconds + 30.0)
    return KUBECTL_TIMEOUT_S
