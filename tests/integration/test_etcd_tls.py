"""etcd TLS fails closed and says why: EtcdStore against real etcd servers (the fixtures' TLS one
has a private CA, which no system trusts). The pure rules: tests/unit/test_etcd_settings.py."""

import time
from pathlib import Path
from typing import Any

import pytest

from deploy.local.pki import make_ca
from pyabouts.ipam.config import IpamConf
from pyabouts.ipam.errors import INVALID_CONFIG, STORE_REFUSED, TRY_AGAIN_LATER, CniError
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId
from pyabouts.ipam.stores.etcd import EtcdStore
from tests.integration.etcd_fixtures import AUTH_TOKEN_TTL_S, EtcdServer

pytestmark = pytest.mark.integration


def tls_ipam(server: EtcdServer, **override: Any) -> dict[str, Any]:
    """Everything `server` needs (https://, CA, client certificate, password), then `override`."""
    return {
        "etcd_host": f"https://{server.endpoint}",
        "etcd_ca_cert_file": server.ca_cert,
        "etcd_cert_file": server.cert,
        "etcd_key_file": server.key,
        "etcd_username": server.username,
        "etcd_password": server.password,
        **override,
    }


def read_with(**ipam: Any) -> None:
    """One read through an EtcdStore made from these `ipam` keys."""
    store = EtcdStore.from_config(IpamConf(type="pyabouts", datastore="etcd", **ipam), timeout=5)
    try:
        store.read_blocks(PoolId("tls-probe", 4), 0, 255)
    finally:
        store.close()


def error_of(**ipam: Any) -> CniError:
    with pytest.raises(CniError) as excinfo:
        read_with(**ipam)
    return excinfo.value


def test_https_without_a_ca_verifies_against_the_system_roots_and_fails_closed(
    etcd_tls_auth_server: EtcdServer,
) -> None:
    server = etcd_tls_auth_server
    read_with(**tls_ipam(server))  # with the CA that signed etcd's certificate: fine

    error = error_of(**tls_ipam(server, etcd_ca_cert_file=None))
    assert error.code == INVALID_CONFIG
    assert error.msg.startswith(f"etcd at {server.endpoint}: TLS handshake failed: ")
    assert "etcd's server certificate is not trusted (certificate verify failed" in error.msg
    assert "no etcd_ca_cert_file is set" in error.msg
    assert "system's trusted roots" in error.msg


def test_a_ca_that_did_not_sign_etcds_certificate_is_named(
    etcd_tls_auth_server: EtcdServer, tmp_path: Path
) -> None:
    make_ca(tmp_path, "another-ca", days=1)
    error = error_of(**tls_ipam(etcd_tls_auth_server, etcd_ca_cert_file=str(tmp_path / "ca.crt")))
    assert error.code == INVALID_CONFIG
    assert "server certificate is not trusted" in error.msg
    assert "is etcd_ca_cert_file the CA that signed etcd's certificate?" in error.msg


def test_a_client_without_the_certificate_etcd_requires_is_refused(
    etcd_tls_auth_server: EtcdServer,
) -> None:
    error = error_of(**tls_ipam(etcd_tls_auth_server, etcd_cert_file=None, etcd_key_file=None))
    assert error.code == STORE_REFUSED
    assert etcd_tls_auth_server.endpoint in error.msg
    assert "set etcd_cert_file and etcd_key_file" in error.msg


def test_a_client_certificate_without_its_key_fails_before_connecting(
    etcd_tls_auth_server: EtcdServer,
) -> None:
    with pytest.raises(CniError) as excinfo:
        EtcdStore.from_config(
            IpamConf(type="pyabouts", **tls_ipam(etcd_tls_auth_server, etcd_key_file=None)),
            timeout=5,
        )
    assert excinfo.value.code == INVALID_CONFIG
    assert "ipam.etcd_cert_file" in excinfo.value.msg
    assert "ipam.etcd_key_file" in excinfo.value.msg


def test_a_missing_ca_file_names_the_key_and_the_path(etcd_tls_auth_server: EtcdServer) -> None:
    error = error_of(**tls_ipam(etcd_tls_auth_server, etcd_ca_cert_file="/nonexistent/ca.pem"))
    assert error.code == INVALID_CONFIG
    assert "ipam.etcd_ca_cert_file='/nonexistent/ca.pem'" in error.msg


def test_plaintext_to_a_tls_etcd_suggests_https(etcd_tls_auth_server: EtcdServer) -> None:
    error = error_of(etcd_host=etcd_tls_auth_server.endpoint)
    assert error.code == TRY_AGAIN_LATER
    assert "if etcd serves TLS there, use https://" in error.msg


def test_tls_to_a_plaintext_etcd_asks_whether_it_serves_tls(etcd_server: EtcdServer) -> None:
    error = error_of(etcd_host=f"https://{etcd_server.endpoint}")
    assert error.code == TRY_AGAIN_LATER
    assert "TLS handshake failed" in error.msg
    assert "does etcd serve TLS there?" in error.msg


def test_a_password_over_plaintext_needs_the_explicit_permission(etcd_server: EtcdServer) -> None:
    plaintext = {"etcd_host": etcd_server.endpoint, "etcd_username": "u", "etcd_password": "p"}
    refused = error_of(**plaintext)
    assert refused.code == INVALID_CONFIG
    assert "etcd_allow_plaintext_password" in refused.msg
    # Allowed, the password reaches etcd, which has no auth enabled and says so.
    answered = error_of(**plaintext, etcd_allow_plaintext_password=True)
    assert answered.code == STORE_REFUSED
    assert "authentication is not enabled" in answered.msg


def test_a_login_over_plaintext_serves_calls_when_the_config_accepts_it(
    etcd_plaintext_auth_server: EtcdServer,
) -> None:
    """etcd_allow_plaintext_password against an etcd with user auth and no TLS: the calls after
    the login carry its token. (grpc refuses call credentials on a channel without TLS: every
    call after the login was refused, code 102.)"""
    server = etcd_plaintext_auth_server
    plaintext = {
        "etcd_host": server.endpoint,
        "etcd_username": server.username,
        "etcd_allow_plaintext_password": True,
    }
    ipam = IpamConf(type="pyabouts", datastore="etcd", etcd_password=server.password, **plaintext)
    store = EtcdStore.from_config(ipam, timeout=5)
    key = BlockKey(PoolId("plaintext-login", 4), 0x0A000000)
    try:
        block = Block(key, {key.base + 1: Owner("c1", "net1")})
        assert store.write_blocks([block]).conflicts == []
        [read] = store.read_blocks(key.pool, key.base, key.base)
        assert read.entries == block.entries
    finally:
        store.close()
    assert error_of(**plaintext, etcd_password="wrong").code == STORE_REFUSED


def test_a_client_whose_login_token_expired_logs_in_again(
    etcd_tls_auth_server: EtcdServer,
) -> None:
    """A client logs in when it is made, and etcd drops an unused token (300 s by default; this
    server's after AUTH_TOKEN_TTL_S): a quiet node's next call was refused as code 102, "check
    the credentials", though nothing was wrong with them."""
    ipam = IpamConf(type="pyabouts", datastore="etcd", **tls_ipam(etcd_tls_auth_server))
    store = EtcdStore.from_config(ipam, timeout=5)
    try:
        store.read_blocks(PoolId("token-probe", 4), 0, 255)
        time.sleep(AUTH_TOKEN_TTL_S + 2)  # etcd checks its tokens' age every second
        store.read_blocks(PoolId("token-probe", 4), 0, 255)
    finally:
        store.close()
    # A wrong password is still refused at once.
    assert error_of(**tls_ipam(etcd_tls_auth_server, etcd_password="wrong")).code == STORE_REFUSED
