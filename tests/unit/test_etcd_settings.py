"""etcd settings from the `ipam` keys (pure), the TLS files (read at the edge), and what a failed
TLS connection is reported as. Against real etcd: tests/integration/test_etcd_tls.py."""

from pathlib import Path
from typing import Any

import grpc
import pytest

from pyabouts.ipam.config import IpamConf
from pyabouts.ipam.errors import (
    INVALID_CONFIG,
    STORE_REFUSED,
    TRY_AGAIN_LATER,
    CniError,
    StoreBusyError,
    StoreUnavailableError,
)
from pyabouts.ipam.stores.etcd import read_pem_file, store_error, tls_failure
from pyabouts.ipam.stores.etcd_settings import EtcdSettings, parse_endpoints

# What grpc 1.85 said, word for word, against a TLS etcd 3.4 with client-certificate auth.
_PREFIX = "failed to connect to all addresses; last error: "
UNTRUSTED = (
    _PREFIX + "UNKNOWN: ipv4:127.0.0.1:23791: Tls handshake failed (TSI_PROTOCOL_FAILURE): "
    "SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: "
    "unable to get local issuer certificate: OK"
)
WRONG_NAME = (
    _PREFIX + "UNKNOWN: ipv4:127.0.0.1:23791: Custom verification check failed with error: "
    "UNAUTHENTICATED: Hostname Verification Check failed."
)
NO_CLIENT_CERT = _PREFIX + "UNAVAILABLE: ipv4:127.0.0.1:23791: Unwrap failed (TSI_DATA_CORRUPTED)"
BAD_KEY_PAIR = _PREFIX + "UNKNOWN: ipv4:127.0.0.1:23791: Failed to create security handshaker."
TLS_TO_PLAIN = _PREFIX + "UNAVAILABLE: ipv4:127.0.0.1:23792: Handshake read failed (Socket closed)"
PLAIN_TO_TLS = _PREFIX + "UNAVAILABLE: ipv4:127.0.0.1:23791: Socket closed"
REFUSED_PORT = (
    _PREFIX + "UNKNOWN: ipv4:127.0.0.1:23799: Failed to connect to remote host: Connection refused"
)


def settings(**ipam: Any) -> EtcdSettings:
    return EtcdSettings.from_config(IpamConf(type="pyabouts", datastore="etcd", **ipam), timeout=5)


def config_error(**ipam: Any) -> CniError:
    with pytest.raises(CniError) as excinfo:
        settings(**ipam)
    assert excinfo.value.code == INVALID_CONFIG, excinfo.value
    return excinfo.value


# --------------------------------------------------------------------------- TLS or not


def test_https_without_a_ca_is_tls_verified_against_the_system_roots() -> None:
    got = settings(etcd_host="https://etcd.example:2379")
    assert got.secure
    assert got.ca_cert is None  # grpc's default roots: verified, never skipped


def test_a_bare_endpoint_speaks_tls_when_any_tls_file_is_set() -> None:
    assert not settings(etcd_host="10.0.0.1:2379").secure
    assert settings(etcd_host="10.0.0.1:2379", etcd_ca_cert_file="/ca.crt").secure
    client_cert_only = settings(etcd_host="10.0.0.1", etcd_cert_file="/c", etcd_key_file="/k")
    assert client_cert_only.secure
    assert client_cert_only.ca_cert is None


def test_settings_are_built_without_reading_the_files() -> None:
    got = settings(
        etcd_host="https://a:1,https://[2001:db8::1]:2",
        etcd_ca_cert_file="/nonexistent/ca.crt",
        etcd_cert_file="/nonexistent/c.crt",
        etcd_key_file="/nonexistent/c.key",
    )
    assert got.endpoints == (("a", 1), ("2001:db8::1", 2))
    assert (got.ca_cert, got.cert, got.key) == (
        "/nonexistent/ca.crt",
        "/nonexistent/c.crt",
        "/nonexistent/c.key",
    )


def test_mixing_http_and_https_endpoints_is_refused() -> None:
    error = config_error(etcd_host="https://a:2379,http://b:2379")
    assert "mixes http:// and https://" in error.msg
    assert "https://a:2379,http://b:2379" in error.msg


def test_http_with_a_tls_file_is_refused_naming_the_file_key() -> None:
    error = config_error(etcd_host="http://a:2379", etcd_ca_cert_file="/ca.crt")
    assert "http://" in error.msg
    assert "etcd_ca_cert_file" in error.msg


def test_an_unknown_scheme_is_refused() -> None:
    assert "unix://" in config_error(etcd_host="unix:///run/etcd.sock").msg


def test_etcd_host_is_required() -> None:
    assert "ipam.etcd_host is required" in config_error().msg
    assert "no endpoint" in config_error(etcd_host=" , https:// ").msg


@pytest.mark.parametrize(
    ("text", "endpoints"),
    [
        ("a", [("a", 2379)]),
        ("a:1, https://b:2/", [("a", 1), ("b", 2)]),
        ("[2001:db8::1]:2379", [("2001:db8::1", 2379)]),
        ("https://[2001:db8::1]", [("2001:db8::1", 2379)]),
        ("http://[::1]:2380/, 10.0.0.1", [("::1", 2380), ("10.0.0.1", 2379)]),
    ],
)
def test_endpoints_are_host_port_with_a_default_port(
    text: str, endpoints: list[tuple[str, int]]
) -> None:
    assert parse_endpoints(text) == endpoints


@pytest.mark.parametrize("text", ["2001:db8::1", "2001:db8::1:2379", "a:1,https://fd00::1:2"])
def test_an_ipv6_address_without_brackets_is_refused(text: str) -> None:
    # Read as host:port it would dial another address ("2001:db8:" port 1).
    assert "write an IPv6 address in brackets" in config_error(etcd_host=text).msg


@pytest.mark.parametrize(
    "text", ["[::1]:", "[::1", "[2001:db8::1]2379", "host:", "[]:2379", "a:0", "a:99999", "[x]:1"]
)
def test_an_endpoint_that_is_no_host_port_is_refused_before_dialling(text: str) -> None:
    assert "is no host:port" in config_error(etcd_host=f"a:1,{text}").msg


def test_an_ipv6_endpoint_is_named_in_brackets() -> None:
    ipv6 = settings(etcd_host="[fd00::1]:2379,b:1")
    assert ipv6.describe() == "[fd00::1]:2379,b:1"
    refused = FakeRpcError(grpc.StatusCode.UNAVAILABLE, REFUSED_PORT)
    error = store_error(refused, ipv6.endpoints[0], ipv6)
    assert error.msg.startswith("etcd at [fd00::1]:2379 is unreachable")


# --------------------------------------------------------------------------- keys in pairs


@pytest.mark.parametrize(
    "given", [{"etcd_cert_file": "/c.crt"}, {"etcd_key_file": "/c.key"}], ids=["cert", "key"]
)
def test_a_client_certificate_and_its_key_go_together(given: dict[str, str]) -> None:
    error = config_error(etcd_host="https://a:2379", etcd_ca_cert_file="/ca.crt", **given)
    assert "ipam.etcd_cert_file" in error.msg
    assert "ipam.etcd_key_file" in error.msg
    assert f"ipam.{next(iter(given))} is set" in error.msg


@pytest.mark.parametrize(
    "given", [{"etcd_username": "u"}, {"etcd_password": "p"}], ids=["username", "password"]
)
def test_a_username_and_its_password_go_together(given: dict[str, str]) -> None:
    error = config_error(etcd_host="https://a:2379", **given)
    assert "ipam.etcd_username" in error.msg
    assert "ipam.etcd_password" in error.msg


# --------------------------------------------------------------------------- passwords


@pytest.mark.parametrize("host", ["http://a:2379", "a:2379"])
def test_a_password_without_tls_is_refused_unless_allowed(host: str) -> None:
    error = config_error(etcd_host=host, etcd_username="u", etcd_password="secret")
    assert "plaintext" in error.msg
    assert "etcd_allow_plaintext_password" in error.msg
    assert "secret" not in error.msg
    allowed = settings(
        etcd_host=host, etcd_username="u", etcd_password="p", etcd_allow_plaintext_password=True
    )
    assert (allowed.secure, allowed.username, allowed.password) == (False, "u", "p")


def test_a_password_over_tls_needs_no_permission() -> None:
    assert settings(etcd_host="https://a", etcd_username="u", etcd_password="p").secure
    assert settings(
        etcd_host="a", etcd_ca_cert_file="/ca", etcd_username="u", etcd_password="p"
    ).secure


def test_the_plaintext_permission_is_off_by_default() -> None:
    assert IpamConf(type="pyabouts").etcd_allow_plaintext_password is False


# --------------------------------------------------------------------------- the TLS files


def test_a_missing_tls_file_names_the_key_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(CniError) as missing:
        read_pem_file("etcd_ca_cert_file", str(tmp_path / "ca.crt"))
    assert missing.value.code == INVALID_CONFIG
    assert f"ipam.etcd_ca_cert_file='{tmp_path / 'ca.crt'}'" in missing.value.msg
    assert "No such file" in missing.value.msg


def test_an_unreadable_tls_file_names_the_key_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(CniError) as unreadable:
        read_pem_file("etcd_key_file", str(tmp_path))  # a directory: root can't read it either
    assert unreadable.value.code == INVALID_CONFIG
    assert f"ipam.etcd_key_file='{tmp_path}'" in unreadable.value.msg


def test_a_tls_file_that_is_not_pem_is_refused_without_echoing_it(tmp_path: Path) -> None:
    path = tmp_path / "client.key"
    path.write_text("secret-key-material\n")
    with pytest.raises(CniError) as not_pem:
        read_pem_file("etcd_key_file", str(path))
    assert not_pem.value.code == INVALID_CONFIG
    assert "not a PEM file" in not_pem.value.msg
    assert str(path) in not_pem.value.msg
    assert "secret" not in not_pem.value.msg


def test_a_pem_file_is_read_and_an_unset_one_is_none(tmp_path: Path) -> None:
    path = tmp_path / "ca.crt"
    path.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    assert read_pem_file("etcd_ca_cert_file", str(path)) == path.read_bytes()
    assert read_pem_file("etcd_ca_cert_file", None) is None


# --------------------------------------------------------------------------- failed connections

WHERE = "etcd at 127.0.0.1:23791"


def tls(details: str, **ipam: Any) -> CniError | None:
    return tls_failure(details, WHERE, "127.0.0.1", settings(**ipam))


def test_an_untrusted_server_certificate_is_a_config_error_naming_the_ca_key() -> None:
    with_ca = tls(UNTRUSTED, etcd_host="https://127.0.0.1:23791", etcd_ca_cert_file="/ca")
    assert with_ca is not None
    assert with_ca.code == INVALID_CONFIG
    assert with_ca.msg.startswith(f"{WHERE}: TLS handshake failed: etcd's server certificate")
    assert "certificate verify failed: unable to get local issuer certificate)" in with_ca.msg
    assert "is etcd_ca_cert_file the CA that signed etcd's certificate?" in with_ca.msg
    system_roots = tls(UNTRUSTED, etcd_host="https://127.0.0.1:23791")
    assert system_roots is not None
    assert system_roots.code == INVALID_CONFIG
    assert "no etcd_ca_cert_file is set" in system_roots.msg
    assert "system's trusted roots" in system_roots.msg


def test_a_certificate_for_another_name_is_a_config_error() -> None:
    error = tls(WRONG_NAME, etcd_host="https://127.0.0.1:23791")
    assert error is not None
    assert error.code == INVALID_CONFIG
    assert "not valid for '127.0.0.1'" in error.msg


def test_unusable_client_certificate_files_are_a_config_error() -> None:
    error = tls(BAD_KEY_PAIR, etcd_host="https://a", etcd_cert_file="/c", etcd_key_file="/k")
    assert error is not None
    assert error.code == INVALID_CONFIG
    assert "etcd_cert_file" in error.msg and "etcd_key_file" in error.msg


def test_a_connection_closed_after_the_handshake_is_a_refused_client_certificate() -> None:
    without = tls(NO_CLIENT_CERT, etcd_host="https://a")
    assert without is not None
    assert without.code == STORE_REFUSED
    assert "set etcd_cert_file and etcd_key_file" in without.msg
    refused = tls(NO_CLIENT_CERT, etcd_host="https://a", etcd_cert_file="/c", etcd_key_file="/k")
    assert refused is not None
    assert refused.code == STORE_REFUSED
    assert "the client certificate (etcd_cert_file)" in refused.msg


def test_handshakes_that_break_off_may_pass_and_say_what_to_check() -> None:
    error = tls(TLS_TO_PLAIN, etcd_host="https://a")
    assert error is not None
    assert error.code == TRY_AGAIN_LATER
    assert "does etcd serve TLS there?" in error.msg
    plain = tls(PLAIN_TO_TLS, etcd_host="a")
    assert plain is not None
    assert plain.code == TRY_AGAIN_LATER
    assert "use https://" in plain.msg


def test_other_failures_are_no_tls_failure() -> None:
    assert tls(REFUSED_PORT, etcd_host="https://a") is None
    assert tls(REFUSED_PORT, etcd_host="a") is None


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_store_errors_name_the_endpoint_and_keep_grpcs_last_error() -> None:
    secure = settings(etcd_host="https://127.0.0.1:23791")
    endpoint = ("127.0.0.1", 23791)
    down = store_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, REFUSED_PORT), endpoint, secure)
    assert down.code == TRY_AGAIN_LATER
    assert down.msg == (
        f"{WHERE} is unreachable: UNKNOWN: ipv4:127.0.0.1:23799: Failed to connect to remote "
        "host: Connection refused"
    )
    untrusted = store_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, UNTRUSTED), endpoint, secure)
    assert untrusted.code == INVALID_CONFIG
    refused = store_error(
        FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: authentication failed"),
        endpoint,
        secure,
    )
    assert refused.code == STORE_REFUSED
    assert "authentication failed" in refused.msg


def test_a_call_etcd_took_but_did_not_answer_in_time_is_busy_not_down() -> None:
    endpoint, plain = ("127.0.0.1", 23791), settings(etcd_host="127.0.0.1:23791")
    for code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        busy = store_error(FakeRpcError(code, "Deadline Exceeded"), endpoint, plain)
        assert isinstance(busy, StoreBusyError) and busy.code == TRY_AGAIN_LATER, code
    down = store_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, REFUSED_PORT), endpoint, plain)
    assert isinstance(down, StoreUnavailableError) and not isinstance(down, StoreBusyError)


def test_an_etcd3_error_is_read_through_to_the_grpc_error_it_wraps() -> None:
    from etcd3 import exceptions  # noqa: PLC0415 - only this test needs it

    try:
        try:
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, UNTRUSTED)
        except grpc.RpcError:
            raise exceptions.ConnectionFailedError()  # noqa: B904 - as etcd3 raises it
    except exceptions.ConnectionFailedError as wrapped:
        error = store_error(wrapped, ("127.0.0.1", 23791), settings(etcd_host="https://a"))
    assert error.code == INVALID_CONFIG
