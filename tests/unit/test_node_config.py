"""plugin/node_config.py: the node's flat file and the kubeconfig of the agent's service account,
written once, kept in step with a rotating token, and removed by an uninstall."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from pyabouts.ipam.errors import CniError
from pyabouts.ipam.stores.flat_file import read_own_flat_file
from pyabouts.ipam.stores.kubeconfig import read_kubeconfig
from pyabouts.plugin.install import main as install_main
from pyabouts.plugin.node_config import NodeConfig, keep_node_config_current, write_file_atomically

CA = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
ENVIRON = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


@pytest.fixture
def account(tmp_path: Path) -> Path:
    directory = tmp_path / "serviceaccount"
    directory.mkdir()
    (directory / "token").write_text("token-one")
    (directory / "ca.crt").write_text(CA)
    (directory / "namespace").write_text("kube-system")
    return directory


@pytest.fixture
def config(tmp_path: Path) -> NodeConfig:
    return NodeConfig(tmp_path / "host" / "pyabouts.d", Path("/etc/cni/net.d/pyabouts.d"))


def token_in(config: NodeConfig) -> str | None:
    credentials = read_kubeconfig(str(config.kubeconfig))
    assert credentials.authorization is not None
    return credentials.authorization()


def test_the_kubeconfig_is_private_and_reaches_the_api_as_the_service_account(
    config: NodeConfig, account: Path
) -> None:
    assert config.write(ENVIRON, account)
    assert config.kubeconfig.stat().st_mode & 0o777 == 0o600
    credentials = read_kubeconfig(str(config.kubeconfig))  # the plugin's own reader
    assert credentials.server == "https://10.96.0.1:443"
    assert credentials.namespace == "kube-system"
    assert credentials.ca_pem == CA
    assert token_in(config) == "Bearer token-one"


def test_the_flat_file_names_the_kubeconfig_by_the_hosts_path(
    config: NodeConfig, account: Path
) -> None:
    config.write(ENVIRON, account)
    flat = read_own_flat_file(str(config.flat_file))
    assert flat.keys["datastore"] == "kubernetes"
    assert flat.keys["kubernetes"] == {
        "kubeconfig": "/etc/cni/net.d/pyabouts.d/pyabouts.kubeconfig"
    }


def test_writing_again_unchanged_touches_nothing(config: NodeConfig, account: Path) -> None:
    config.write(ENVIRON, account)
    before = config.kubeconfig.stat().st_ino, config.flat_file.stat().st_ino
    assert not config.write(ENVIRON, account)
    assert (config.kubeconfig.stat().st_ino, config.flat_file.stat().st_ino) == before


def test_a_widened_mode_is_put_back(config: NodeConfig, account: Path) -> None:
    config.write(ENVIRON, account)
    config.kubeconfig.chmod(0o644)
    assert config.write(ENVIRON, account)
    assert config.kubeconfig.stat().st_mode & 0o777 == 0o600


def test_a_rotated_token_is_written_within_an_interval(config: NodeConfig, account: Path) -> None:
    stop = threading.Event()
    keeper = threading.Thread(
        target=keep_node_config_current,
        args=(config, ENVIRON),
        kwargs={"interval": 0.05, "stop": stop, "account_dir": account},
    )
    keeper.start()
    try:
        deadline = time.monotonic() + 10
        while not config.kubeconfig.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert token_in(config) == "Bearer token-one"
        # kubelet writes the projected token into a new directory and swaps a symlink
        (account / "token.new").write_text("token-two")
        (account / "token.new").replace(account / "token")
        while token_in(config) != "Bearer token-two" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert token_in(config) == "Bearer token-two"
    finally:
        stop.set()
        keeper.join(timeout=5)
    assert not keeper.is_alive()


def test_outside_a_cluster_it_says_why_and_writes_nothing(
    config: NodeConfig, account: Path
) -> None:
    with pytest.raises(CniError, match="KUBERNETES_SERVICE_HOST"):
        config.write({}, account)
    assert not config.directory.exists()


def test_install_then_uninstall_leaves_nothing(
    tmp_path: Path, account: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENVIRON.items():
        monkeypatch.setenv(name, value)
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bin_dir.mkdir()
    (bin_dir / "macvlan").write_text("another plugin")
    common = [f"--cni-bin-dir={bin_dir}", f"--node-config-dir={conf_dir / 'pyabouts.d'}"]
    install_main([*common, "--no-fallback", f"--service-account-dir={account}"])
    assert (bin_dir / "pyabouts").stat().st_mode & 0o777 == 0o755
    assert json.loads((conf_dir / "pyabouts.d" / "pyabouts.conf").read_text())["datastore"]
    install_main([*common, "--uninstall"])
    assert sorted(p.name for p in bin_dir.iterdir()) == ["macvlan"]
    assert list(conf_dir.iterdir()) == []


def test_a_write_goes_through_no_file_or_link_someone_put_in_its_way(tmp_path: Path) -> None:
    # The temporary file's name is its own (O_EXCL): a link at a name that could be guessed
    # (the pid's, 1 in every container) is neither followed nor written.
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    target = tmp_path / "net.d" / "pyabouts.conf"
    target.parent.mkdir()
    (target.parent / f".{target.name}.{os.getpid()}.tmp").symlink_to(victim)
    assert write_file_atomically(target, "written", 0o600)
    assert victim.read_text() == "untouched"
    assert target.read_text() == "written" and (target.stat().st_mode & 0o777) == 0o600
    leftovers = {p.name for p in target.parent.iterdir()} - {target.name}
    assert leftovers == {f".{target.name}.{os.getpid()}.tmp"}  # the link alone, no temp file
