"""pytest fixtures that run a real etcd server.

pyabouts keeps its IP allocations in etcd, and what matters there (revisions, compare-and-swap
transactions, TLS, client certificates, users and role permissions on a key prefix) is exactly
what a fake would get subtly wrong. So these fixtures start Debian's etcd 3.4 for real, as a
process on free 127.0.0.1 ports, with the local tooling's one launcher,
:func:`deploy.local.etcd_server.start_etcd` (``deploy/local/setup.sh`` installs the binary;
``$PYABOUTS_ETCD_BINARY`` may name another). Its data lives in ``/dev/shm`` where there is one:
on a disk busy with a test session, etcd's fsyncs can stall for seconds, past the plugin's
request timeout. The server is described with the one etcd type,
:class:`deploy.local.etcd_server.EtcdServer`, and stopped at the session's end.

A server that does not come up makes the fixture raise (an error in the test run), never skip:
a missing etcd must not look like a green run.

Registered from ``tests/conftest.py``. Fixtures (session-scoped, one server per xdist worker):

- ``etcd_server``: plain HTTP, no auth.
- ``etcd_tls_auth_server``: TLS with client-certificate auth and etcd user auth enabled; the
  returned credentials are a non-root user ``pyabouts`` that may only read and write keys under
  ``/pyabouts/``.
- ``etcd_plaintext_auth_server``: plain HTTP with etcd user auth enabled, the same user.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from deploy.local.commands import run_command
from deploy.local.etcd_server import EtcdServer, EtcdTls, memory_dir, start_etcd
from deploy.local.pki import CLIENT_USAGE, SERVER_AND_CLIENT_USAGE, issue_certificate, make_ca

#: EtcdServer is re-exported: the tests take it from here, with the fixtures that make one.
__all__ = ["EtcdServer", "etcd_plaintext_auth_server", "etcd_server", "etcd_tls_auth_server"]

ETCDCTL_TIMEOUT_S = 30.0

#: The key prefix the non-root user of ``etcd_tls_auth_server`` may read and write.
PYABOUTS_PREFIX = "/pyabouts/"
PYABOUTS_USER = "pyabouts"
PYABOUTS_ROLE = "pyabouts-rw"
AUTH_TOKEN_TTL_S = 2


# --------------------------------------------------------------------------- servers


@contextmanager
def _session_etcd(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    tls: EtcdTls | None = None,
    extra_args: Sequence[str] = (),
) -> Iterator[EtcdServer]:
    """An etcd started with start_etcd, its log under the session's temporary directory and its
    data in memory; stopped, and its data removed, on the way out."""
    logs = tmp_path_factory.mktemp(name)
    data = Path(tempfile.mkdtemp(prefix=f"pyabouts-test-{name}-", dir=memory_dir() or logs))
    try:
        server = start_etcd(data / "data", logs / "etcd.log", tls=tls, extra_args=extra_args)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(data, ignore_errors=True)


# --------------------------------------------------------------------------- certificates


def _make_certs(directory: Path) -> EtcdTls:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl).

    The server's certificate is good for client auth too: see :class:`EtcdTls`.

    The client certificate's CN is deliberately not an etcd user: with ``--client-cert-auth``
    etcd takes the CN as the user name when a request carries no password token, so a CN of
    ``root`` would let any holder of the certificate in without a password.
    """
    directory.mkdir(parents=True, exist_ok=True)
    make_ca(directory, "pyabouts-test-ca", days=3)
    issue_certificate(
        directory,
        "server",
        "/CN=localhost",
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n" + SERVER_AND_CLIENT_USAGE,
        days=3,
    )
    issue_certificate(directory, "client", "/CN=pyabouts-test-client", CLIENT_USAGE, days=3)
    return EtcdTls(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )


# --------------------------------------------------------------------------- etcdctl


def _etcdctl(server: EtcdServer, *args: str, user: str | None = None) -> str:
    etcdctl = shutil.which("etcdctl")
    if etcdctl is None:
        raise RuntimeError(
            "etcdctl not found (Debian package etcd-client): run `bash deploy/local/setup.sh`"
        )
    cmd = [etcdctl, f"--endpoints={server.url}", "--dial-timeout=5s", "--command-timeout=10s"]
    if server.ca_cert is not None:
        cmd.append(f"--cacert={server.ca_cert}")
    if server.cert is not None and server.key is not None:
        cmd += [f"--cert={server.cert}", f"--key={server.key}"]
    if user is not None:
        cmd.append(f"--user={user}")
    return run_command([*cmd, *args], timeout=ETCDCTL_TIMEOUT_S)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A plain etcd (HTTP, no auth) as a process of ours, for the whole session."""
    with _session_etcd(tmp_path_factory, "etcd") as server:
        yield server


@pytest.fixture(scope="session")
def etcd_tls_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """etcd with TLS, client-certificate auth and user auth, as a process of ours, for the whole
    session.

    The returned credentials are those of the non-root user ``pyabouts``, who holds a role that
    may read and write keys under ``/pyabouts/`` only, plus the client certificate's paths.
    """
    tls = _make_certs(tmp_path_factory.mktemp("etcd-tls"))
    # Its login tokens expire after AUTH_TOKEN_TTL_S unused, as etcd's (300 s by default) do
    # on a quiet node: every client of this server outlives its login.
    ttl = [f"--auth-token-ttl={AUTH_TOKEN_TTL_S}"]
    with _session_etcd(tmp_path_factory, "etcd-tls-auth", tls, ttl) as admin:
        yield _with_auth(admin)


@pytest.fixture(scope="session")
def etcd_plaintext_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """etcd over plain HTTP with user auth: the credentials of the user ``pyabouts``, as
    ``etcd_tls_auth_server``'s (a cluster-internal etcd some operators run so)."""
    with _session_etcd(tmp_path_factory, "etcd-plaintext-auth") as admin:
        yield _with_auth(admin)


def _with_auth(admin: EtcdServer) -> EtcdServer:
    """Enable user auth on `admin`'s etcd, with root and the non-root user ``pyabouts``, who
    may read and write keys under PYABOUTS_PREFIX only; the server with pyabouts' credentials."""
    root_password = secrets.token_urlsafe(16)
    password = secrets.token_urlsafe(16)
    _etcdctl(admin, "user", "add", f"root:{root_password}")
    _etcdctl(admin, "user", "grant-role", "root", "root")
    _etcdctl(admin, "user", "add", f"{PYABOUTS_USER}:{password}")
    _etcdctl(admin, "role", "add", PYABOUTS_ROLE)
    _etcdctl(
        admin,
        "role",
        "grant-permission",
        PYABOUTS_ROLE,
        "--prefix=true",
        "readwrite",
        PYABOUTS_PREFIX,
    )
    _etcdctl(admin, "user", "grant-role", PYABOUTS_USER, PYABOUTS_ROLE)
    _etcdctl(admin, "auth", "enable")
    # Auth is on now: root's password must work (etcdctl 3.4 has no `auth status`).
    _etcdctl(admin, "user", "get", PYABOUTS_USER, user=f"root:{root_password}")
    return replace(admin, username=PYABOUTS_USER, password=password)
