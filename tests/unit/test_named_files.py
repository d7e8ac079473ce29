"""The in-process plugin follows a file a network config names only within the directories the
node keeps for its kind (plugin/named_files.py): a NAD's author cannot have root run a
kubeconfig's command, send a token to their server or append to a file of their choosing.
(tests/integration/test_named_files.py runs the plugin's executable on it.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pyabouts.ipam.errors import INVALID_CONFIG, TRY_AGAIN_LATER, CniError
from pyabouts.plugin.backend import OneShotBackend
from pyabouts.plugin.handler import handle_request
from pyabouts.plugin.named_files import TRUSTED_DIRS_ENV, check_named_files
from tests.kubeconfig_files import write_kubeconfig_document

NOTHING_MORE: dict[str, str] = {}  # no TRUSTED_DIRS_ENV


def refusal(inline: dict[str, Any], environ: dict[str, str] = NOTHING_MORE) -> str:
    with pytest.raises(CniError) as refused:
        check_named_files(inline, environ)
    assert refused.value.code == INVALID_CONFIG
    return refused.value.msg


@pytest.mark.parametrize(
    ("inline", "key"),
    [
        ({"kubernetes": {"kubeconfig": "/var/lib/kubelet/pods/u/volumes/kc"}}, "kubeconfig"),
        ({"configuration_path": "/home/user/pyabouts.conf"}, "configuration_path"),
        ({"etcd_key_file": "/etc/kubernetes/pki/etcd/server.key"}, "etcd_key_file"),
        ({"etcd_cert_file": "/tmp/cert.pem"}, "etcd_cert_file"),  # /tmp: logs only
        ({"etcd_ca_cert_file": "/root/ca.pem"}, "etcd_ca_cert_file"),
        ({"log_file": "/etc/profile.d/pyabouts.sh"}, "log_file"),
        ({"run_dir": "/etc/cron.d"}, "run_dir"),
    ],
)
def test_a_file_named_outside_the_directories_kept_for_it_is_refused(
    inline: dict[str, Any], key: str
) -> None:
    said = refusal(inline)
    assert key in said and "outside the directories this node keeps for it" in said


def test_the_standard_places_are_followed() -> None:
    check_named_files(
        {
            "configuration_path": "/etc/cni/net.d/pyabouts.d/pyabouts.conf",
            "kubernetes": {"kubeconfig": "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig"},
            "etcd_ca_cert_file": "/etc/kubernetes/cni/net.d/pyabouts.d/etcd-ca.pem",
            "log_file": "/tmp/whereabouts.log",  # as whereabouts' examples have it
            "run_dir": "/var/run/pyabouts",  # /var/run is /run
        },
        NOTHING_MORE,
    )
    check_named_files({"log_file": "/var/log/pyabouts/pyabouts.log"}, NOTHING_MORE)


def test_dot_dots_and_links_are_resolved_before_the_check(tmp_path: Path) -> None:
    assert "log_file" in refusal({"log_file": "/var/log/../../etc/profile.d/x.sh"})
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "kubeconfig").symlink_to("/root/.kube/config")
    trusting = {TRUSTED_DIRS_ENV: str(kept)}
    check_named_files({"configuration_path": str(kept / "pyabouts.conf")}, trusting)
    said = refusal({"kubernetes": {"kubeconfig": str(kept / "kubeconfig")}}, trusting)
    assert "kubeconfig" in said


def test_the_runtime_s_environment_may_add_directories(tmp_path: Path) -> None:
    inline = {"kubernetes": {"kubeconfig": str(tmp_path / "kc")}, "run_dir": str(tmp_path)}
    refusal(inline)
    check_named_files(inline, {TRUSTED_DIRS_ENV: f"/nowhere:{tmp_path}"})


def netconf(ipam: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    raw = {"cniVersion": "1.0.0", "name": "blue", "ipam": {"type": "pyabouts", **ipam}}
    return raw, json.dumps(raw).encode()


def exec_kubeconfig(path: Path, marker: Path) -> Path:
    """A kubeconfig whose credentials come from a command: this one leaves `marker`."""
    command = {"apiVersion": "client.authentication.k8s.io/v1", "command": "/bin/sh"}
    command["args"] = ["-c", f"touch {marker}"]  # type: ignore[assignment]
    return write_kubeconfig_document(path, {"exec": command}, {"server": "https://10.0.0.1"})


def test_the_in_process_plugin_runs_no_command_a_network_config_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TRUSTED_DIRS_ENV, raising=False)
    marker = tmp_path / "ran-as-root"
    kubeconfig = exec_kubeconfig(tmp_path / "kc", marker)
    _, data = netconf({"range": "10.0.0.0/24", "kubernetes": {"kubeconfig": str(kubeconfig)}})
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/n", "CNI_IFNAME": "n1"}
    reply = handle_request(env, data, OneShotBackend())
    assert reply.exit_code == 1
    assert json.loads(reply.stdout)["code"] == INVALID_CONFIG
    assert not marker.exists()


def test_the_agent_s_fallback_leaves_such_a_call_to_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent follows none of them and serves the call once it is back: code 11 (try again),
    not 7 (the config is wrong)."""
    monkeypatch.delenv(TRUSTED_DIRS_ENV, raising=False)
    kubeconfig = str(tmp_path / "kc")
    raw, data = netconf({"range": "10.0.0.0/24", "kubernetes": {"kubeconfig": kubeconfig}})
    with pytest.raises(CniError) as refused:
        OneShotBackend("no agent answered at /run/pyabouts/agent.sock").config(raw, data)
    assert refused.value.code == TRY_AGAIN_LATER
    assert refused.value.msg.startswith("no agent answered at /run/pyabouts/agent.sock, and ")
    assert f"kubernetes.kubeconfig {kubeconfig!r} is outside" in refused.value.msg
