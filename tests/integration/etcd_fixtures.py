"""pytest fixtures that run a real etcd server in a container.

pyabouts keeps its IP allocations in etcd, and what matters there (revisions, compare-and-swap
transactions, TLS, client certificates, users and role permissions on a key prefix) is exactly
what a fake would get subtly wrong. So these fixtures start Debian's etcd 3.4 for real, in a
container started through testcontainers. On our machines there is no Docker engine:
testcontainers talks to podman's Docker-compatible API, and the image is built locally from
Debian's etcd binary (``deploy/local/setup.sh`` does both, ``deploy/local/testenv.sh`` sets the
environment). Elsewhere, ``PYABOUTS_ETCD_IMAGE`` can name any etcd 3.4+ image whose entrypoint
is the etcd binary.

The fixtures describe the server with the local tooling's one etcd type,
:class:`deploy.local.etcd_server.EtcdServer` (endpoint, TLS files, user; no process of ours:
the container is stopped at the session's end).

A server that does not come up makes the fixture raise (an error in the test run), never skip:
a missing etcd must not look like a green run.

Registered from ``tests/conftest.py``. Fixtures (session-scoped, one server per xdist worker):

- ``etcd_server``: plain HTTP, no auth.
- ``etcd_tls_auth_server``: TLS with client-certificate auth and etcd user auth enabled; the
  returned credentials are a non-root user ``pyabouts`` that may only read and write keys under
  ``/pyabouts/``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from deploy.local.commands import run_command
from deploy.local.etcd_server import EtcdServer, etcd_health
from deploy.local.pki import CLIENT_USAGE, SERVER_USAGE, issue_certificate, make_ca

if TYPE_CHECKING:  # imported where a container is made: unit tests load this module too
    from testcontainers.core.container import DockerContainer

#: EtcdServer is re-exported: the tests take it from here, with the fixtures that make one.
__all__ = ["EtcdServer", "etcd_image", "etcd_server", "etcd_tls_auth_server"]

DEFAULT_ETCD_IMAGE = "localhost/pyabouts-etcd:3.4"
ETCD_CLIENT_PORT = 2379
ETCD_DATA_DIR = "/var/lib/etcd-test"
STARTUP_TIMEOUT_S = 30.0
ETCDCTL_TIMEOUT_S = 30.0

#: The key prefix the non-root user of ``etcd_tls_auth_server`` may read and write.
PYABOUTS_PREFIX = "/pyabouts/"
PYABOUTS_USER = "pyabouts"
PYABOUTS_ROLE = "pyabouts-rw"

_CERTS_IN_CONTAINER = "/etc/etcd-certs"


def etcd_image() -> str:
    return os.environ.get("PYABOUTS_ETCD_IMAGE") or DEFAULT_ETCD_IMAGE


# --------------------------------------------------------------------------- containers


def _container_logs(container: DockerContainer) -> str:
    try:
        out, err = container.get_logs()
    except Exception as exc:  # the container may be gone already
        return f"<no logs: {exc}>"
    text = (out + err).decode(errors="replace")
    return text[-4000:]


def _start(container: DockerContainer) -> str:
    """Start the container; return the ``127.0.0.1:PORT`` its client port is published on."""
    container.start()
    host = container.get_container_host_ip()
    port = container.get_exposed_port(ETCD_CLIENT_PORT)
    return f"{host}:{port}"


def _wait_healthy(
    container: DockerContainer, url: str, context: ssl.SSLContext | None = None
) -> None:
    """Poll etcd's ``/health`` until it reports healthy; raise if it never does."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        status = container.get_wrapped_container()
        status.reload()
        if status.status not in ("created", "running"):
            raise RuntimeError(
                f"etcd container exited ({status.status}) before it became healthy; logs:\n"
                + _container_logs(container)
            )
        try:
            answer = etcd_health(url, context)
        except (OSError, ValueError) as exc:  # URLError, connection reset, bad JSON
            answer = repr(exc)
        if answer is None:
            return
        last_error = answer
        time.sleep(0.1)
    raise RuntimeError(
        f"etcd at {url} not healthy after {STARTUP_TIMEOUT_S:.0f} s ({last_error}); logs:\n"
        + _container_logs(container)
    )


def _etcd_container(args: Sequence[str]) -> DockerContainer:
    # The data dir is a tmpfs: on a disk busy with a test session, etcd's fsyncs can stall for
    # seconds, past the plugin's request timeout. These stores live for one session anyway.
    from testcontainers.core.container import DockerContainer  # noqa: PLC0415 - see above

    return (
        DockerContainer(etcd_image())
        .with_command(["--data-dir", ETCD_DATA_DIR, *args])
        .with_exposed_ports(ETCD_CLIENT_PORT)
        .with_tmpfs_mount(ETCD_DATA_DIR, "size=512m")
    )


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class _Certs:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _make_certs(directory: Path) -> _Certs:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl).

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
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n" + SERVER_USAGE,
        days=3,
    )
    issue_certificate(directory, "client", "/CN=pyabouts-test-client", CLIENT_USAGE, days=3)
    return _Certs(
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
def etcd_server() -> Iterator[EtcdServer]:
    """A plain etcd (HTTP, no auth) in a container, for the whole session."""
    container = _etcd_container(
        [
            "--listen-client-urls",
            f"http://0.0.0.0:{ETCD_CLIENT_PORT}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{ETCD_CLIENT_PORT}",
        ]
    )
    try:
        server = EtcdServer(endpoint=_start(container))
        _wait_healthy(container, server.url)
        yield server
    finally:
        container.stop()


@pytest.fixture(scope="session")
def etcd_tls_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """etcd with TLS, client-certificate auth and user auth, for the whole session.

    The returned credentials are those of the non-root user ``pyabouts``, who holds a role that
    may read and write keys under ``/pyabouts/`` only, plus the client certificate's paths.
    """
    certs = _make_certs(tmp_path_factory.mktemp("etcd-tls"))
    c = _CERTS_IN_CONTAINER
    container = _etcd_container(
        [
            "--listen-client-urls",
            f"https://0.0.0.0:{ETCD_CLIENT_PORT}",
            "--advertise-client-urls",
            f"https://127.0.0.1:{ETCD_CLIENT_PORT}",
            "--cert-file",
            f"{c}/server.crt",
            "--key-file",
            f"{c}/server.key",
            "--client-cert-auth",
            "--trusted-ca-file",
            f"{c}/ca.crt",
        ]
    ).with_volume_mapping(certs.ca_cert.parent, c, mode="ro")
    try:
        endpoint = _start(container)
        admin = EtcdServer(
            endpoint=endpoint,
            ca_cert=str(certs.ca_cert),
            cert=str(certs.client_cert),
            key=str(certs.client_key),
        )
        context = ssl.create_default_context(cafile=admin.ca_cert)
        context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        _wait_healthy(container, admin.url, context)

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

        yield EtcdServer(
            endpoint=endpoint,
            ca_cert=admin.ca_cert,
            cert=admin.cert,
            key=admin.key,
            username=PYABOUTS_USER,
            password=password,
        )
    finally:
        container.stop()
