"""The IPPool store reads kubeconfigs itself (ipam.stores.kubeconfig): each form a node's or an
admin's kubeconfig takes reaches the real apiserver as the identity it names, and TLS is
verified against the CA it names."""

from __future__ import annotations

import base64
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from deploy.local.controlplane import ControlPlane
from pyabouts.ipam.errors import StoreRefusedError
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId
from pyabouts.ipam.stores import http_connections
from pyabouts.ipam.stores.kubernetes import KubernetesStore
from tests.integration.kube_fixtures import exec_kubeconfig, kubeconfig, pyabouts_token
from tests.integration.stored_state import kubernetes_store
from tests.local_http import ProxyLog, connect_proxy

pytestmark = pytest.mark.integration


def write_and_read_back(store: KubernetesStore) -> None:
    """A block written through `store` is read back through it, as stored."""
    pool = PoolId(f"kc-{uuid.uuid4().hex[:8]}", 4)
    key = BlockKey.of(pool, int.from_bytes(bytes([10, 91, 0, 0])))
    block = Block(key, {key.base + 1: Owner("c1", "net1")}, range_text="10.91.0.0/24")
    assert store.write_blocks([block]).conflicts == []
    [read] = store.read_blocks(pool, key.base, key.base + 255)
    assert read.entries == block.entries


def test_a_bearer_token(pyabouts_cluster: ControlPlane, tmp_path: Path) -> None:
    path = kubeconfig(
        tmp_path / "kc", pyabouts_cluster, {"token": pyabouts_token(pyabouts_cluster)}
    )
    write_and_read_back(kubernetes_store(path))


def test_a_client_certificate_embedded(pyabouts_cluster: ControlPlane) -> None:
    admin = str(pyabouts_cluster.kubeconfig)  # the admin's: client-certificate-data
    write_and_read_back(kubernetes_store(admin))


def test_files_named_relative_to_the_kubeconfig(
    pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    (tmp_path / "pki").mkdir()
    shutil.copy(pyabouts_cluster.admin_cert, tmp_path / "pki" / "admin.crt")
    shutil.copy(pyabouts_cluster.admin_key, tmp_path / "pki" / "admin.key")
    shutil.copy(pyabouts_cluster.ca_cert, tmp_path / "pki" / "ca.crt")
    user = {"client-certificate": "pki/admin.crt", "client-key": "pki/admin.key"}
    path = kubeconfig(
        tmp_path / "kc", pyabouts_cluster, user, {"certificate-authority": "pki/ca.crt"}
    )
    write_and_read_back(kubernetes_store(path))


def test_a_token_file_is_read_on_every_request(
    pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    # The kubelet rotates projected service-account tokens in place: a long-lived store (the
    # agent's) must send the file's current token, not the one it started with.
    token_file = tmp_path / "token"
    token_file.write_text("not-a-token\n")
    store = kubernetes_store(kubeconfig(tmp_path / "kc", pyabouts_cluster, {"tokenFile": "token"}))
    with pytest.raises(StoreRefusedError, match="Unauthorized"):
        write_and_read_back(store)
    token_file.write_text(pyabouts_token(pyabouts_cluster) + "\n")
    write_and_read_back(store)


def test_an_exec_plugin_goes_through_the_kubernetes_client(
    pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    write_and_read_back(kubernetes_store(exec_kubeconfig(tmp_path / "kc", pyabouts_cluster)))


def test_a_server_certificate_no_trusted_ca_signed_is_refused(
    pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    # No certificate-authority: the system's CAs, which did not sign the local apiserver's.
    user = {"token": pyabouts_token(pyabouts_cluster)}
    store = kubernetes_store(kubeconfig(tmp_path / "kc", pyabouts_cluster, user, trust={}))
    # Refused (code 102) at once, not retried as an outage: trying again changes nothing.
    with pytest.raises(StoreRefusedError, match="its certificate cannot be verified"):
        write_and_read_back(store)


def test_insecure_skip_tls_verify_connects_without_a_ca(
    pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    user = {"token": pyabouts_token(pyabouts_cluster)}
    path = kubeconfig(tmp_path / "kc", pyabouts_cluster, user, {"insecure-skip-tls-verify": True})
    write_and_read_back(kubernetes_store(path))


@pytest.mark.parametrize(("name", "connects"), [("kubernetes.default", True), ("elsewhere", False)])
def test_tls_server_name_is_the_name_the_certificate_must_carry(
    pyabouts_cluster: ControlPlane, tmp_path: Path, name: str, connects: bool
) -> None:
    ca = base64.b64encode(pyabouts_cluster.ca_cert.read_bytes()).decode()
    trust = {"certificate-authority-data": ca, "tls-server-name": name}
    user = {"token": pyabouts_token(pyabouts_cluster)}
    store = kubernetes_store(kubeconfig(tmp_path / "kc", pyabouts_cluster, user, trust))
    if connects:
        write_and_read_back(store)
    else:
        with pytest.raises(StoreRefusedError, match="not valid for 'elsewhere'"):
            write_and_read_back(store)


def test_a_proxy_url_tunnels_to_the_apiserver_with_tls_end_to_end(
    pyabouts_cluster: ControlPlane, tmp_path: Path
) -> None:
    ca = base64.b64encode(pyabouts_cluster.ca_cert.read_bytes()).decode()
    log = ProxyLog()
    with connect_proxy(log) as proxy:
        trust = {"certificate-authority-data": ca, "proxy-url": proxy}
        user = {"token": pyabouts_token(pyabouts_cluster)}
        write_and_read_back(
            kubernetes_store(kubeconfig(tmp_path / "kc", pyabouts_cluster, user, trust))
        )
    server = pyabouts_cluster.server.removeprefix("https://")
    assert log.tunnels and {target for target, _ in log.tunnels} == {server}


def test_requests_share_one_kept_alive_tls_connection(
    pyabouts_cluster: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the agent's speed rests on: no TLS handshake per request to the real apiserver."""
    opened: list[object] = []
    connect = http_connections.Connections._connected

    def counted(self: http_connections.Connections, deadline: float) -> Any:
        opened.append(connection := connect(self, deadline))
        return connection

    monkeypatch.setattr(http_connections.Connections, "_connected", counted)
    store = kubernetes_store(str(pyabouts_cluster.kubeconfig))
    for _ in range(3):
        write_and_read_back(store)
    assert len(opened) == 1
