"""The node shim (plugin/shim/, Go) as pyabouts-install puts it on a node: its own Go tests, a
static binary, the wire format the agent speaks, and a whole macvlan chain on a host where
Python cannot run. (Every agent-mode plugin test also calls through it: plugin_fixtures.)"""

from __future__ import annotations

import json
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.local.agent_process import running_agent
from deploy.local.netns import (
    CNI_REFERENCE_DIR,
    CniCall,
    addresses_in,
    macvlan_master,
    pod_namespace,
    run_cni,
)
from deploy.local.node_shim import built_shim, run_go_tests
from pyabouts.plugin import wire
from pyabouts.plugin.cni import render_version
from pyabouts.plugin.install import install_shim, install_thin_plugin
from tests.integration.etcd_fixtures import EtcdServer
from tests.integration.plugin_fixtures import etcd_ipam
from tests.integration.stored_state import stored_allocations

pytestmark = pytest.mark.integration

CONF = json.dumps({"cniVersion": "0.4.0", "name": "n", "ipam": {"type": "pyabouts"}}).encode()
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "net1", "CNI_ARGS": "A=1"}
PT_INTERP = 3
#: Runs its arguments in a mount namespace of their own where no Python can start: every
#: interpreter on PATH or in /usr is /dev/null there, and its standard library an empty
#: directory. It checks that before it runs them.
WITHOUT_PYTHON = r"""
set -eu
for exe in /usr/bin/python* /usr/local/bin/python* $(which -a python3 python || true); do
    real="$(readlink -f "$exe")"
    if [ -f "$real" ]; then
        mount --bind /dev/null "$real"
        for lib in "$(dirname "$(dirname "$real")")"/lib/python3*; do
            if [ -d "$lib" ]; then mount -t tmpfs -o ro none "$lib"; fi
        done
    fi
done
for exe in /usr/bin/python3 $(which -a python3 python || true); do
    if "$exe" -c pass 2>/dev/null; then
        echo "$exe still runs" >&2
        exit 99
    fi
done
exec "$@"
"""


class OneRequestAgent:
    """Reads one request whole, keeps it, and answers with `reply` (the wire format's bytes)."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.request = b""
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, args=(reply,), daemon=True)
        self._thread.start()

    def _serve(self, reply: bytes) -> None:
        conn, _ = self._listener.accept()
        with conn:
            while chunk := conn.recv(65536):
                self.request += chunk
            conn.sendall(reply)

    def close(self) -> None:
        self._thread.join(timeout=10)
        self._listener.close()


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """The shim as `pyabouts-install --shim --agent-socket <tmp>/agent.sock` installs it."""
    return install_shim(tmp_path / "bin", built_shim(), socket_path=str(tmp_path / "agent.sock"))


def run(exe: Path, env: dict[str, str], stdin: bytes = CONF) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([exe], input=stdin, env=env, capture_output=True, timeout=30, check=False)


def test_the_go_tests_pass() -> None:
    output = run_go_tests()  # raises with the output if one fails
    assert output.count("--- PASS") >= 15 and "FAIL" not in output, output


def test_the_shim_is_a_static_executable(installed: Path) -> None:
    with installed.open("rb") as elf:
        header = elf.read(64)
        assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit
        phoff, phentsize, phnum = (
            struct.unpack_from("<Q", header, 32)[0],
            *struct.unpack_from("<HH", header, 54),
        )
        elf.seek(phoff)
        table = elf.read(phentsize * phnum)
    kinds = [struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum)]
    assert kinds and PT_INTERP not in kinds  # no dynamic loader: it runs on any Linux of its arch


def test_version_is_answered_without_an_agent_as_the_python_plugin_does(installed: Path) -> None:
    done = run(installed, {"CNI_COMMAND": "VERSION"}, b"")
    assert done.returncode == 0 and json.loads(done.stdout) == render_version()


def test_the_installed_socket_gets_the_request_in_the_agents_wire_format(
    installed: Path, tmp_path: Path
) -> None:
    agent = OneRequestAgent(tmp_path / "agent.sock", wire.encode_reply(0, b'{"ips": []}'))
    started = time.time()
    done = run(installed, ENV | {"OTHER": "not sent", "CNI_ARGS": "A=1;B=\u00e9"})
    agent.close()
    assert (done.returncode, done.stdout, done.stderr) == (0, b'{"ips": []}', b"")
    environ, stdin = wire.decode_request(agent.request)
    gives_up = int(environ.pop(wire.DEADLINE_KEY)) / 1000  # when it stops waiting: after 90 s
    assert started + 90 <= gives_up <= time.time() + 90
    assert environ == ENV | {"CNI_ARGS": "A=1;B=\u00e9"}  # the CNI_* variables, nothing else
    assert stdin == CONF


@pytest.mark.parametrize("exit_code", [0, 1, 7])
def test_the_agents_exit_code_and_output_are_passed_on(
    installed: Path, tmp_path: Path, exit_code: int
) -> None:
    out = json.dumps({"cniVersion": "0.4.0", "code": exit_code}).encode()
    agent = OneRequestAgent(tmp_path / "agent.sock", wire.encode_reply(exit_code, out))
    done = run(installed, ENV)
    agent.close()
    assert (done.returncode, done.stdout) == (exit_code, out)


def test_an_agent_that_answers_half_a_reply_gives_code_11(installed: Path, tmp_path: Path) -> None:
    agent = OneRequestAgent(tmp_path / "agent.sock", b"0")  # the exit code, then it died
    done = run(installed, ENV)
    agent.close()
    error = json.loads(done.stdout)
    assert done.returncode == 1 and error["code"] == 11 and error["cniVersion"] == "0.4.0"
    assert "ended the connection before answering" in error["msg"]
    assert str(tmp_path / "agent.sock") in error["msg"]


@pytest.fixture
def without_python(tmp_path: Path) -> Path:
    """An executable that runs its arguments where Python cannot start (WITHOUT_PYTHON)."""
    script = tmp_path / "without-python"
    script.write_text(
        "#!/bin/sh\n"
        f"exec unshare --mount --propagation private sh -c '{WITHOUT_PYTHON}' sh \"$@\"\n"
    )
    script.chmod(0o755)
    return script


def test_without_python_the_python_plugin_cannot_start_and_the_shim_can(
    without_python: Path, installed: Path, tmp_path: Path
) -> None:
    thin = install_thin_plugin(tmp_path / "thin", fallback=False)
    for plugin in (thin, installed):
        done = subprocess.run(
            [without_python, plugin],
            env={"CNI_COMMAND": "VERSION"},
            capture_output=True,
            timeout=30,
            check=False,
        )
        if plugin == thin:
            assert done.returncode not in (0, 99), done  # 99: python3 was not hidden
        else:
            assert done.returncode == 0 and json.loads(done.stdout) == render_version(), done


@pytest.fixture
def master() -> Iterator[str]:
    with macvlan_master("shim") as name:
        yield name


def test_a_macvlan_pod_gets_its_address_through_the_shim_on_a_host_without_python(
    etcd_server: EtcdServer, master: str, without_python: Path, tmp_path: Path
) -> None:
    network = f"nopython-{secrets.token_hex(4)}"
    flat_file = tmp_path / "node" / "pyabouts.conf"
    flat_file.parent.mkdir()
    flat_file.write_text(json.dumps(etcd_ipam(etcd_server)))
    macvlan = tmp_path / "macvlan-without-python"
    macvlan.write_text(f"#!/bin/sh\nexec {without_python} {CNI_REFERENCE_DIR}/macvlan\n")
    macvlan.chmod(0o755)
    conf = {
        "cniVersion": "1.0.0",
        "name": "macvlan-conf",
        "type": "macvlan",
        "master": master,
        "ipam": {"type": "pyabouts", "range": "198.51.100.0/28", "network_name": network},
    }
    with (
        running_agent(tmp_path / "node", config=flat_file) as agent,
        pod_namespace("shim") as pod,
    ):
        shim = install_shim(tmp_path / "bin", built_shim(), socket_path=str(agent.socket))

        def chain(command: str) -> CniCall:
            return run_cni(
                str(macvlan),
                command,
                conf,
                container_id="c-nopython",
                netns=pod.netns_path,
                ifname="net1",
                cni_path=f"{shim.parent}:{CNI_REFERENCE_DIR}",
            )

        result = chain("ADD").expect_success()
        assert [ip["address"] for ip in result["ips"]] == ["198.51.100.1/28"]
        assert addresses_in(pod, "net1") == ["198.51.100.1/28"]
        [owner] = stored_allocations(etcd_server, network).values()
        assert owner["containerID"] == "c-nopython"

        chain("DEL").expect_success()
        assert stored_allocations(etcd_server, network) == {}
