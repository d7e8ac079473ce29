"""ipam.stores.kubeconfig on files: what it takes from a kubeconfig, and how it refuses one.
(That each form reaches a real apiserver is tests/integration/test_kubeconfig_forms.py.)"""

import base64
from pathlib import Path
from typing import Any

import pytest

from pyabouts.ipam.errors import INVALID_CONFIG, CniError
from pyabouts.ipam.stores.kubeconfig import (
    credentials_from_configuration,
    in_cluster_credentials,
    load_kubeconfig,
    read_kubeconfig,
)
from tests.kubeconfig_files import write_kubeconfig_document


def write(path: Path, user: dict[str, Any], **cluster: Any) -> Path:
    keys = {"server": "https://10.0.0.1:6443", **cluster}
    return write_kubeconfig_document(path, user, keys, namespace="ipam")


def refusal(path: Path) -> str:
    with pytest.raises(CniError) as refused:
        read_kubeconfig(str(path))
    assert refused.value.code == INVALID_CONFIG
    assert str(path) in refused.value.msg
    return refused.value.msg


def test_server_namespace_and_embedded_keys(tmp_path: Path) -> None:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    user = {"client-certificate-data": b64("CERT"), "client-key-data": b64("KEY")}
    path = write(tmp_path / "kc", user, **{"certificate-authority-data": b64("CA")})
    got = read_kubeconfig(str(path))
    assert (got.server, got.namespace) == ("https://10.0.0.1:6443", "ipam")
    assert (got.ca_pem, got.client_cert_pem, got.client_key_pem) == ("CA", "CERT", "KEY")
    assert got.authorization() is None


def test_files_are_relative_to_the_kubeconfig(tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.crt").write_text("CA FILE")
    path = write(tmp_path / "kc", {"token": "abc"}, **{"certificate-authority": "pki/ca.crt"})
    got = read_kubeconfig(str(path))
    assert got.ca_pem == "CA FILE"
    assert got.authorization() == "Bearer abc"


def test_a_token_file_is_read_when_a_request_is_made(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("first\n")
    got = read_kubeconfig(str(write(tmp_path / "kc", {"tokenFile": "token"})))
    (tmp_path / "token").write_text("rotated\n")
    assert got.authorization() == "Bearer rotated"


def test_the_controllers_client_reads_a_token_file_again_too(tmp_path: Path) -> None:
    """The `kubernetes` library's loader reads a tokenFile once: the reconciler's pod and
    Lease client, and its store, would keep a token kubelet has replaced (and that expires)."""
    (tmp_path / "token").write_text("first\n")
    configuration, _ = load_kubeconfig(str(write(tmp_path / "kc", {"tokenFile": "token"})))
    store_credentials = credentials_from_configuration(configuration, "ipam")
    assert store_credentials.authorization() == "Bearer first"
    (tmp_path / "token").write_text("rotated\n")
    assert store_credentials.authorization() == "Bearer rotated"
    assert configuration.auth_settings()["BearerToken"]["value"] == "Bearer rotated"


def test_a_missing_token_file_is_refused_at_once(tmp_path: Path) -> None:
    assert "token" in refusal(write(tmp_path / "kc", {"tokenFile": "token"}))


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("{{{ not yaml", "not YAML"),
        ("- a list", "no mapping"),
        ('{"apiVersion": "v1", "kind": "Config"}', "no current-context"),
        ('{"current-context": "x", "contexts": [{"name": "y"}]}', "no context named 'x'"),
    ],
)
def test_what_is_not_a_usable_kubeconfig_is_code_7(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "kc"
    path.write_text(text)
    assert said in refusal(path)


def test_a_file_that_is_not_yaml_is_refused_without_quoting_it(tmp_path: Path) -> None:
    path = tmp_path / "shadow"
    path.write_text("root:$y$j9T$s3cr3t:19000:0:99999:7:::\nbin: *: [\n")
    said = refusal(path)
    assert "not YAML (line 2" in said
    assert "s3cr3t" not in said and "bin" not in said


def test_in_cluster_credentials_are_the_pods_service_account(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("first\n")
    (tmp_path / "ca.crt").write_text("CA PEM")
    (tmp_path / "namespace").write_text("pyabouts-system\n")
    environ = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    credentials = in_cluster_credentials(environ, tmp_path)
    assert (credentials.server, credentials.namespace) == (
        "https://[fd00::1]:443",
        "pyabouts-system",
    )
    assert credentials.ca_pem == "CA PEM"
    (tmp_path / "token").write_text("rotated\n")  # kubelet rewrites it in place
    assert credentials.authorization() == "Bearer rotated"


def test_outside_a_cluster_in_cluster_credentials_are_code_7(tmp_path: Path) -> None:
    with pytest.raises(CniError) as refused:
        in_cluster_credentials({}, tmp_path)
    assert refused.value.code == INVALID_CONFIG
    assert "KUBERNETES_SERVICE_HOST" in refused.value.msg


def test_bad_base64_is_code_7(tmp_path: Path) -> None:
    path = write(tmp_path / "kc", {}, **{"certificate-authority-data": "not base64!"})
    assert "base64" in refusal(path)


def test_a_cluster_without_a_server_is_code_7(tmp_path: Path) -> None:
    path = write(tmp_path / "kc", {"token": "t"}, server="")
    assert "no server" in refusal(path)


def test_an_inline_token_written_as_a_yaml_block_loses_its_line_break(tmp_path: Path) -> None:
    """`token: |` ends the token in a line break, which no header may carry."""
    got = read_kubeconfig(str(write(tmp_path / "kc", {"token": "abc\n"})))
    assert got.authorization() == "Bearer abc"


def test_base64_data_wrapped_in_lines_is_read_as_kubectl_reads_it(tmp_path: Path) -> None:
    pem = "-----BEGIN CERTIFICATE-----\n" + "A" * 300 + "\n-----END CERTIFICATE-----\n"
    encoded = base64.encodebytes(pem.encode()).decode()  # 76 columns a line, as `base64` writes
    assert "\n" in encoded.strip()
    path = write(tmp_path / "kc", {"token": "t"}, **{"certificate-authority-data": encoded})
    assert read_kubeconfig(str(path)).ca_pem == pem


@pytest.mark.parametrize(("given", "insecure"), [(True, True), (False, False), (None, False)])
def test_insecure_skip_tls_verify_is_a_boolean(tmp_path: Path, given: Any, insecure: bool) -> None:
    path = write(tmp_path / "kc", {"token": "t"}, **{"insecure-skip-tls-verify": given})
    assert read_kubeconfig(str(path)).insecure is insecure


@pytest.mark.parametrize("given", ["false", "true", "{{ .Values.insecure }}", 1])
def test_insecure_skip_tls_verify_that_is_not_a_boolean_is_refused(
    tmp_path: Path, given: Any
) -> None:
    """kubectl refuses such a file; taken as true, a templated "false" would turn TLS
    verification off and send the token to whoever answers."""
    path = write(tmp_path / "kc", {"token": "t"}, **{"insecure-skip-tls-verify": given})
    assert "insecure-skip-tls-verify" in refusal(path)


def test_insecure_skip_tls_verify_with_a_ca_is_refused(tmp_path: Path) -> None:
    """As kubectl refuses it: one of the two is a mistake, and which one decides whether the
    token goes to whoever answers."""
    keys = {"insecure-skip-tls-verify": True, "certificate-authority-data": "Q0E="}
    assert "choose one" in refusal(write(tmp_path / "kc", {"token": "t"}, **keys))


@pytest.mark.parametrize("given", ["client-certificate-data", "client-key-data"])
def test_a_client_certificate_without_its_key_or_the_reverse_is_refused(
    tmp_path: Path, given: str
) -> None:
    # Either alone proves nothing: the apiserver's 401 later would not say why.
    said = refusal(write(tmp_path / "kc", {given: "Q0VSVA=="}))
    assert "a client certificate needs its client key" in said
