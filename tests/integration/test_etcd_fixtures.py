"""The etcd fixtures give real servers: a client can write and read, and auth is enforced."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import etcd3
import pytest

from tests.integration.etcd_fixtures import EtcdServer

pytestmark = pytest.mark.integration


@contextmanager
def _client(server: EtcdServer, **overrides: Any) -> Iterator[Any]:
    kwargs: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "ca_cert": server.ca_cert,
        "cert_key": server.key,
        "cert_cert": server.cert,
        "user": server.username,
        "password": server.password,
        "timeout": 10,
    }
    kwargs.update(overrides)
    client = etcd3.client(**kwargs)
    try:
        yield client
    finally:
        client.close()


def _grpc_code(exc: BaseException) -> str:
    """The gRPC status name of an error from etcd3 (grpc.RpcError has ``code()``)."""
    code = getattr(exc, "code", None)
    return str(code().name) if callable(code) else type(exc).__name__


def _unique_key(prefix: str = "/pyabouts/") -> str:
    return f"{prefix}fixture-test/{secrets.token_hex(4)}"


def test_etcd_server_put_get(etcd_server: EtcdServer) -> None:
    assert etcd_server.endpoint.startswith("127.0.0.1:")
    assert etcd_server.ca_cert is None and etcd_server.username is None
    assert etcd_server.process is not None and etcd_server.process.alive()  # start_etcd's
    key = _unique_key()
    with _client(etcd_server) as client:
        client.put(key, "v1")
        value, meta = client.get(key)
        assert value == b"v1"
        assert meta.mod_revision > 0


def test_etcd_tls_auth_server_put_get(etcd_tls_auth_server: EtcdServer) -> None:
    server = etcd_tls_auth_server
    assert server.endpoint.startswith("127.0.0.1:")
    assert server.ca_cert and server.cert and server.key
    assert server.username == "pyabouts" and server.password
    assert server.process is not None and server.process.alive()  # start_etcd's
    key = _unique_key()
    with _client(server) as client:
        client.put(key, "v1")
        value, _ = client.get(key)
        assert value == b"v1"


def test_etcd_tls_auth_server_refuses_client_without_password(
    etcd_tls_auth_server: EtcdServer,
) -> None:
    # The client certificate alone is not enough: its CN is no etcd user.
    with _client(etcd_tls_auth_server, user=None, password=None) as client:
        with pytest.raises(Exception) as no_password:
            client.put(_unique_key(), "v")
        assert _grpc_code(no_password.value) == "PERMISSION_DENIED"
        with pytest.raises(Exception) as no_password_read:
            client.get(_unique_key())
        assert _grpc_code(no_password_read.value) == "PERMISSION_DENIED"

    # A wrong password fails authentication when the client is made.
    with (
        pytest.raises(Exception) as wrong_password,
        _client(etcd_tls_auth_server, password="not-the-password"),
    ):
        pass
    assert _grpc_code(wrong_password.value) == "INVALID_ARGUMENT"


def test_etcd_tls_auth_server_refuses_writes_outside_prefix(
    etcd_tls_auth_server: EtcdServer,
) -> None:
    with _client(etcd_tls_auth_server) as client:
        with pytest.raises(Exception) as outside:
            client.put(_unique_key("/elsewhere/"), "v")
        assert _grpc_code(outside.value) == "PERMISSION_DENIED"
        # "/pyabouts" without the trailing slash is outside the granted prefix too.
        with pytest.raises(Exception) as sibling:
            client.put("/pyabouts-other/x", "v")
        assert _grpc_code(sibling.value) == "PERMISSION_DENIED"


def test_etcd_tls_auth_server_refuses_plaintext(etcd_tls_auth_server: EtcdServer) -> None:
    # Without TLS and a client certificate, nothing gets through.
    plain = EtcdServer(endpoint=etcd_tls_auth_server.endpoint)
    with (
        pytest.raises(Exception) as refused,
        _client(plain, user="pyabouts", password=etcd_tls_auth_server.password, timeout=3),
    ):
        pass
    assert _grpc_code(refused.value) == "UNAVAILABLE"
