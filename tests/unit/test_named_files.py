"""The in-process plugin follows a file a network config names only within the directories the
node keeps for its kind (plugin/named_files.py): a NAD's author cannot have root run a
kubeconfig's command, send a token to their server or append to a file of their choosing.
(tests/integration/test_named_files.py runs the plugin's executable on it.)"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from pyabouts.ipam.errors import INVALID_CONFIG, TRY_AGAIN_LATER, CniError
from pyabouts.plugin.backend import OneShotBackend
from pyabouts.plugin.handler import handle_request
from pyabouts.plugin.logs import configure_logging
from pyabouts.plugin.named_files import TRUSTED_DIRS_ENV, check_named_files, unkept_log_file
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
        ({"run_dir": "/etc/cron.d"}, "run_dir"),
        ({"run_dir": "/run/lock/pyabouts"}, "run_dir"),  # /run/lock: anyone may write it
    ],
)
def test_a_file_named_outside_the_directories_kept_for_it_is_refused(
    inline: dict[str, Any], key: str
) -> None:
    said = refusal(inline)
    assert key in said and ("outside the directories" in said or "not root's alone" in said)


def test_the_standard_places_are_followed() -> None:
    check_named_files(
        {
            "configuration_path": "/etc/cni/net.d/pyabouts.d/pyabouts.conf",
            "kubernetes": {"kubeconfig": "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig"},
            "etcd_ca_cert_file": "/etc/kubernetes/cni/net.d/pyabouts.d/etcd-ca.pem",
            "run_dir": "/var/run/pyabouts",  # /var/run is /run
        },
        NOTHING_MORE,
    )
    # As whereabouts' examples have it: /tmp is root's, and its sticky bit keeps others from
    # replacing root's files in it (and plugin/logs.py opens none through a link).
    assert unkept_log_file({"log_file": "/tmp/whereabouts.log"}, NOTHING_MORE) is None
    assert unkept_log_file({"log_file": "/var/log/pyabouts.log"}, NOTHING_MORE) is None


def test_a_log_file_elsewhere_is_left_out_not_refused() -> None:
    why = unkept_log_file({"log_file": "/etc/profile.d/pyabouts.sh"}, NOTHING_MORE)
    assert why is not None and "outside the directories this node keeps for it" in why
    check_named_files({"log_file": "/etc/profile.d/pyabouts.sh"}, NOTHING_MORE)  # no refusal


def test_a_directory_on_the_way_that_is_not_roots_alone_is_refused(tmp_path: Path) -> None:
    """Within a kept directory, one another user owns (or may write) could have its files
    swapped for links between this check and the open."""
    kept = tmp_path / "kept"
    theirs = kept / "theirs"
    theirs.mkdir(parents=True)
    os.chown(theirs, 65534, 65534)
    trusting = {TRUSTED_DIRS_ENV: str(kept)}
    said = refusal({"kubernetes": {"kubeconfig": str(theirs / "kc")}}, trusting)
    assert f"is in {theirs}, which is not root's alone" in said
    os.chown(theirs, 0, 0)
    theirs.chmod(0o777)
    assert "not root's alone" in refusal({"run_dir": str(theirs)}, trusting)
    theirs.chmod(0o755)
    check_named_files({"run_dir": str(theirs / "run")}, trusting)


def test_a_path_with_a_nul_byte_is_refused_as_config() -> None:
    assert "is no path" in refusal({"configuration_path": "/etc/cni/net.d/a\0b"})


def test_dot_dots_and_links_are_resolved_before_the_check(tmp_path: Path) -> None:
    assert "run_dir" in refusal({"run_dir": "/run/../etc/cron.d"})
    assert unkept_log_file({"log_file": "/var/log/../../etc/profile.d/x.sh"}, NOTHING_MORE)
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


@pytest.mark.parametrize("kind", ["link", "hard link", "pipe"])
def test_a_log_file_swapped_for_a_link_or_a_pipe_is_not_written(tmp_path: Path, kind: str) -> None:
    """In /tmp, another user may make the file root is about to open: root then logs to stderr,
    never through a link to a file of root's, and never waits on a pipe."""
    target = tmp_path / "root-script.sh"
    target.write_text("#!/bin/sh\n")
    log = tmp_path / "whereabouts.log"
    if kind == "link":
        log.symlink_to(target)
    elif kind == "hard link":
        os.link(target, log)
    else:
        os.mkfifo(log)
    try:
        configure_logging(str(log), "debug")
        logging.getLogger("pyabouts.test").error("injected line")
        assert target.read_text() == "#!/bin/sh\n"
        assert isinstance(logging.getLogger().handlers[0], logging.StreamHandler)
        assert not isinstance(logging.getLogger().handlers[0], logging.FileHandler)
    finally:
        configure_logging(None, None)


def test_a_log_file_of_its_own_is_written(tmp_path: Path) -> None:
    log = tmp_path / "pyabouts.log"
    try:
        configure_logging(str(log), "debug")
        logging.getLogger("pyabouts.test").error("a line")
        logging.getLogger().handlers[0].flush()
        assert "a line" in log.read_text()
    finally:
        configure_logging(None, None)
