"""The installed thin plugin: what it imports on the hot path, and its wire format.

A stand-in agent (a socket that answers one canned reply) is enough here: the real agent is
exercised by every plugin test in tests/integration (see plugin_fixtures.pyabouts_exe).
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyabouts.plugin import install, wire
from pyabouts.plugin.agent.server import encode_reply
from pyabouts.plugin.cni import render_version
from pyabouts.plugin.handler import Reply
from pyabouts.plugin.install import install_thin_plugin
from pyabouts.plugin.thin_client import ATOMIC_REPLY_BYTES, REPLY_TIMEOUT
from pyabouts.plugin.wire import decode_request

CONF = json.dumps({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "pyabouts"}}).encode()
HOT_PATH_MODULES = {"_socket"}  # beside what the bare interpreter loads (posix, sys, io...)
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "net1", "CNI_ARGS": "A=1"}


class OneReplyAgent:
    """Accepts one request, keeps what it got, answers `reply`."""

    def __init__(self, path: Path, reply: Reply) -> None:
        self.received = b""
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._reply = reply
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            while chunk := conn.recv(65536):
                self.received += chunk
            conn.sendall(encode_reply(self._reply))

    def close(self) -> None:
        self._thread.join(timeout=10)
        self._listener.close()


@pytest.fixture
def installed(tmp_path: Path) -> Path:
    return install_thin_plugin(tmp_path / "bin", socket_path=str(tmp_path / "agent.sock"))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[OneReplyAgent]:
    server = OneReplyAgent(tmp_path / "agent.sock", Reply(0, b'{"ips": []}'))
    yield server
    server.close()


def run(exe: Path | list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    argv = [str(exe)] if isinstance(exe, Path) else exe
    return subprocess.run(argv, input=CONF, env=env, capture_output=True, timeout=30, check=False)


def test_the_request_reaches_the_agent_whole_and_its_answer_is_printed(
    installed: Path, agent: OneReplyAgent
) -> None:
    started = time.time()
    done = run(installed, ENV | {"OTHER": "not sent"})
    agent.close()
    assert (done.returncode, done.stdout, done.stderr) == (0, b'{"ips": []}', b"")
    env, stdin = decode_request(agent.received)
    gives_up = int(env.pop(wire.DEADLINE_KEY)) / 1000  # when it stops waiting for the reply
    assert started + REPLY_TIMEOUT <= gives_up <= time.time() + REPLY_TIMEOUT
    assert env == ENV  # the CNI_* variables, and nothing else of the environment
    assert stdin == CONF


def test_the_hot_path_imports_nothing_but_socket_and_os(
    installed: Path, agent: OneReplyAgent
) -> None:
    def imported(argv: list[str]) -> set[str]:
        done = run([sys.executable, "-I", "-S", "-X", "importtime", *argv], ENV)
        return set(re.findall(r"\|\s+([\w.]+)\s*$", done.stderr.decode(), re.MULTILINE))

    bare = imported(["-c", "pass"])
    added = imported([str(installed)]) - bare
    agent.close()
    assert added <= HOT_PATH_MODULES, added
    assert "_socket" in added  # the check sees what the client imports


def test_the_installed_plugin_carries_the_wire_format_the_agent_speaks(installed: Path) -> None:
    text = installed.read_text()
    assert Path(wire.__file__).read_text() in text  # the module's own text, byte for byte
    assert "from pyabouts.plugin.wire" not in text  # the hot path imports nothing of the package
    namespace: dict[str, Any] = {"__name__": "installed"}  # not "__main__": load, do not run
    exec(compile(text, str(installed), "exec"), namespace)
    environ = [(b"CNI_COMMAND", b"ADD"), (b"CNI_ARGS", b"A=1;B=\xff")]
    assert namespace["encode_request"](environ, CONF) == wire.encode_request(environ, CONF)
    reply = wire.encode_reply(1, b'{"code": 11}')
    assert namespace["decode_reply"](reply) == wire.decode_reply(reply) == (1, b'{"code": 11}')


def test_a_reply_cut_short_by_the_timeout_is_not_printed(installed: Path, tmp_path: Path) -> None:
    # An agent that sent its exit code and part of a result, then stalled past the timeout.
    text = installed.read_text()
    installed.write_text(text.replace("REPLY_TIMEOUT = 90.0", "REPLY_TIMEOUT = 1.0"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "agent.sock"))
    listener.listen(1)
    stalled: list[socket.socket] = []

    def answer_half() -> None:
        conn, _ = listener.accept()
        stalled.append(conn)
        while conn.recv(65536):
            pass
        conn.sendall(b'0\0{"cniVersion": "1.0.0", "ips": [{"addr')

    server = threading.Thread(target=answer_half, daemon=True)
    server.start()
    try:
        done = run(installed, ENV)
    finally:
        server.join(timeout=10)
        for conn in [*stalled, listener]:
            conn.close()
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["code"] == 11 and "did not answer whole (timed out)" in error["msg"], error


@pytest.mark.parametrize("whole", [True, False])
def test_a_large_reply_the_agent_died_in_is_not_printed(
    installed: Path, tmp_path: Path, whole: bool
) -> None:
    # A result past ATOMIC_REPLY_BYTES (a NAD with thousands of routes), of which an agent
    # killed while it sent it delivered part: the connection ends as cleanly as after a whole one.
    routes = [{"dst": f"10.{i // 256}.{i % 256}.0/24"} for i in range(5000)]
    result = json.dumps({"cniVersion": "1.0.0", "ips": [], "routes": routes}).encode()
    assert len(result) > ATOMIC_REPLY_BYTES
    agent = OneReplyAgent(tmp_path / "agent.sock", Reply(0, result if whole else result[:-3]))
    try:
        done = run(installed, ENV)
    finally:
        agent.close()
    if whole:
        assert (done.returncode, done.stdout) == (0, result)
        return
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["code"] == 11 and "ended the connection in its answer" in error["msg"], error


def test_an_error_for_a_config_nested_past_the_parser_is_still_cni_json(
    installed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    namespace: dict[str, Any] = {"__name__": "installed"}  # loaded, not run
    exec(compile(installed.read_text(), str(installed), "exec"), namespace)
    with pytest.raises(SystemExit):
        namespace["_fail"](b"[" * 100_000, "the agent is busy")
    error = json.loads(capsys.readouterr().out)
    assert (error["code"], error["msg"], error["cniVersion"]) == (11, "the agent is busy", "1.0.0")


def test_version_is_answered_without_an_agent(installed: Path) -> None:
    done = run(installed, {"CNI_COMMAND": "VERSION"})
    assert done.returncode == 0 and json.loads(done.stdout) == render_version()


def test_without_an_agent_the_baked_paths_import_the_package(installed: Path) -> None:
    # FALLBACK_PATH (plugin.install.this_installation) leads `python3 -IS` to pyabouts: the
    # invalid config is pyabouts' own answer (code 7), not "no pyabouts here" (code 11).
    done = run(installed, {k: v for k, v in ENV.items() if k != "CNI_ARGS"})
    assert json.loads(done.stdout)["code"] == 7, done.stdout


def oldest_python_promised() -> str:
    """The README promises the thin plugin any host python3 from 3.8 on; the machine image's
    pyenv holds a 3.8 (a real interpreter, not pyenv's shim)."""
    found = sorted(Path.home().glob(".pyenv/versions/3.8.*/bin/python3.8"))
    assert found, "no Python 3.8 under ~/.pyenv/versions: the machine image has one"
    return str(found[-1])


def test_the_thin_plugin_runs_on_the_oldest_python_it_promises(tmp_path: Path) -> None:
    python = oldest_python_promised()
    installed = install_thin_plugin(
        tmp_path / "bin", socket_path=str(tmp_path / "agent.sock"), python=python, fallback=False
    )
    version = run(installed, {"CNI_COMMAND": "VERSION"})
    assert version.returncode == 0 and json.loads(version.stdout) == render_version()
    absent = run(installed, ENV)  # no agent, no fallback: code 11 as CNI JSON
    assert absent.returncode == 1 and json.loads(absent.stdout)["code"] == 11, absent
    agent = OneReplyAgent(tmp_path / "agent.sock", Reply(0, b'{"ips": []}'))
    served = run(installed, ENV)
    agent.close()
    assert (served.returncode, served.stdout, served.stderr) == (0, b'{"ips": []}', b"")
    env, stdin = decode_request(agent.received)
    assert stdin == CONF and env["CNI_COMMAND"] == "ADD"


@pytest.mark.parametrize(
    ("mode", "owner", "said"),
    [(0o775, 0, "is writable by others (mode 775)"), (0o755, 65534, "belongs to uid 65534")],
)
def test_a_fallback_others_could_change_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int, owner: int, said: str
) -> None:
    """The plugin runs as root and imports the installation it was installed from: one its
    user could change would make that user root on the node."""
    user_owned = tmp_path / "venv" / "site-packages"
    user_owned.mkdir(parents=True)
    os.chown(user_owned.parent, owner, owner)
    user_owned.parent.chmod(mode)
    monkeypatch.setattr(install, "this_installation", lambda: [str(user_owned)])
    with pytest.raises(ValueError, match=re.escape(f"{user_owned.parent} {said}")):
        install_thin_plugin(tmp_path / "bin", socket_path=str(tmp_path / "agent.sock"))
    assert not (tmp_path / "bin" / "pyabouts").exists()


def test_a_link_to_the_interpreter_that_another_user_owns_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolved, it is root's /usr/bin/python3; but the link's own directory is another user's,
    who could point it anywhere."""
    theirs = tmp_path / "venv" / "bin"
    theirs.mkdir(parents=True)
    (theirs / "python").symlink_to(sys.executable)
    os.chown(theirs, 65534, 65534)
    monkeypatch.setattr(install, "this_installation", lambda: [])
    with pytest.raises(ValueError, match=re.escape(f"{theirs} belongs to uid 65534")):
        install_thin_plugin(tmp_path / "bin", python=str(theirs / "python"))
    with pytest.raises(ValueError, match="is not an absolute path"):
        install_thin_plugin(tmp_path / "bin", python="python3")


@pytest.mark.parametrize(
    ("socket_path", "why"),
    [
        ("agent.sock", "is not an absolute path"),
        ("@pyabouts", "is not an absolute path"),  # not abstract to Python, but as to the shim
        ("/run/" + "p" * 103, "is 108 bytes long"),
    ],
)
def test_an_agent_socket_from_the_environment_that_cannot_be_one_is_refused(
    installed: Path, tmp_path: Path, socket_path: str, why: str
) -> None:
    # Refused before anything is connected or created (the fallback would make the path's
    # directory, relative to the runtime's working directory): CNI code 4, as the shim does.
    done = subprocess.run(
        [str(installed)],
        input=CONF,
        env=ENV | {"PYABOUTS_AGENT_SOCKET": socket_path},
        capture_output=True,
        timeout=30,
        check=False,
        cwd=tmp_path,
    )
    error = json.loads(done.stdout)
    assert (done.returncode, error["code"]) == (1, 4), done
    assert error["msg"].startswith(f"PYABOUTS_AGENT_SOCKET={socket_path!r}"), error
    assert why in error["msg"], error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]  # nothing made here
