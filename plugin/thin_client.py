"""The thin `pyabouts` plugin: hand the CNI request to the node agent, print its answer.

This file is also the installed executable: plugin.install copies its source behind a
`#!python3 -IS` line, setting AGENT_SOCKET and FALLBACK_PATH, and puts the text of plugin.wire
(the wire format the agent speaks) where this file imports it. So on the hot path it imports
nothing but `_socket`, beside the built-in `posix`, `sys` and `time` that the interpreter has
already loaded (any host python3 can run it, and interpreter start stays near the bare 7 ms;
`os` would add five modules and `from __future__` one), and nothing of the package until the
agent is missing.
"""

import _socket
import posix
import sys
import time

from pyabouts.plugin.wire import (  # wire.py's text
    DEADLINE_KEY,
    JOURNAL_LOCK,
    PENDING_JOURNAL,
    WireError,
    decode_reply,
    encode_request,
)

TYPE_CHECKING = False  # typing costs 12 ms of import: its names are for the type checker only
if TYPE_CHECKING:
    from typing import NoReturn

AGENT_SOCKET = "/run/pyabouts/agent.sock"
# Quoted: a module's annotations are evaluated, and list[str] needs Python 3.9.
FALLBACK_PATH: "list[str]" = []
VERSION_REPLY = b""  # plugin.cni.render_version(), set by the installer: VERSION needs no agent
REPLY_TIMEOUT = 90.0  # seconds; the agent answers within its 60 s command deadline
INVALID_ENVIRONMENT = 4
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50  # what STATUS answers when the plugin cannot serve ADD (CNI 1.1)
# A reply up to this size reaches the socket in one copy (its buffer holds more), so an agent
# that dies while sending it sends none of it; a larger one may be cut short, and is printed
# only once it parses as JSON, as the agent writes it (not every reply: importing json, with
# re, doubles this plugin's start).
ATOMIC_REPLY_BYTES = 64 << 10
# serving.listen.check_unix_socket_path's rule, repeated here: that module needs `os`, which
# this plugin's start does without (see the module's docstring).
UNIX_PATH_MAX = 108  # bytes of a unix socket's path, its ending NUL included


def main() -> None:
    environ = posix.environ  # bytes to bytes, as the kernel gave it
    if VERSION_REPLY and environ.get(b"CNI_COMMAND") == b"VERSION":
        sys.stdout.buffer.write(VERSION_REPLY)
        sys.stdout.buffer.flush()
        return
    stdin = sys.stdin.buffer.read()
    socket_path = _agent_socket(stdin)
    # When it stops waiting (the agent starts nothing after): see wire.DEADLINE_KEY.
    gives_up = b"%d" % ((time.time() + REPLY_TIMEOUT) * 1000)
    entries = [(k, v) for k, v in environ.items() if k.startswith(b"CNI_")]
    request = encode_request([*entries, (DEADLINE_KEY.encode(), gives_up)], stdin)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    # Before connecting: an agent whose backlog is full refuses at once (EAGAIN), never blocks.
    sock.settimeout(REPLY_TIMEOUT)
    try:
        sock.connect(socket_path)
    except BlockingIOError:  # an agent, every place of its backlog taken: busy, not gone
        sock.close()
        _fail(stdin, f"the pyabouts agent at {socket_path} is busy (its backlog is full)")
    except OSError as exc:
        sock.close()
        _serve_without_agent(socket_path, exc, stdin)
    chunks = []
    try:
        try:
            sock.sendall(request)
            sock.shutdown(_socket.SHUT_WR)
        except _socket.timeout:
            raise
        except OSError:
            pass  # the agent answered without reading it (refused, busy): read its answer
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except _socket.timeout:  # what arrived may be cut short: none of it is printed
        _fail(stdin, f"the pyabouts agent at {socket_path} did not answer whole (timed out)")
    except OSError:
        pass  # reset after an answer that did not wait for the whole request: judged by it
    finally:
        sock.close()
    try:
        code, out = decode_reply(b"".join(chunks))
    except WireError:
        _fail(stdin, f"the pyabouts agent at {socket_path} ended the connection before answering")
    if len(out) > ATOMIC_REPLY_BYTES and not _whole_json(out):
        _fail(stdin, f"the pyabouts agent at {socket_path} ended the connection in its answer")
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    sys.exit(code)


def _agent_socket(stdin: bytes) -> str:
    """PYABOUTS_AGENT_SOCKET, else the installed path. One that cannot name the agent's socket
    is refused (code 4) before any connect, or a fallback that would create its directory, as
    the node shim and the installer refuse it: not absolute (resolved against the runtime's
    working directory), or too long for connect()."""
    path = posix.environ.get(b"PYABOUTS_AGENT_SOCKET", b"").decode(errors="surrogateescape")
    if not path:
        return AGENT_SOCKET
    size = len(path.encode(errors="surrogateescape"))
    if not path.startswith("/"):
        _fail(stdin, f"PYABOUTS_AGENT_SOCKET={path!r} is not an absolute path", INVALID_ENVIRONMENT)
    if size >= UNIX_PATH_MAX:
        why = f"is {size} bytes long: a unix socket's path has fewer than {UNIX_PATH_MAX}"
        _fail(stdin, f"PYABOUTS_AGENT_SOCKET={path!r} {why}", INVALID_ENVIRONMENT)
    return path


def _serve_without_agent(socket_path: str, why: OSError, stdin: bytes) -> "NoReturn":
    """No agent answers: serve in this process (config `agent_fallback`, default in-process)."""
    import os  # noqa: PLC0415 - the fallback only

    directory = os.path.dirname(socket_path)
    try:  # held until this process exits: no agent starts to serve beside it meanwhile
        os.makedirs(directory, mode=0o700, exist_ok=True)  # /run is empty after a reboot
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        held = os.open(os.path.join(directory, JOURNAL_LOCK), flags, 0o600)
    except OSError:
        held = -1  # not here (a read-only directory): nothing to coordinate with
    if held >= 0:
        import fcntl  # noqa: PLC0415 - the fallback only

        try:
            fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: plugins side by side
        except OSError:
            _fail(stdin, f"the pyabouts agent at {socket_path} is starting or stopping ({why})")
    journal = os.path.join(directory, PENDING_JOURNAL)
    try:
        with open(journal, "rb") as lines:
            unstored = sum(1 for _ in lines) - 1  # after its head line
    except OSError:
        unstored = 0
    if unstored > 0:
        _fail(
            stdin,
            f"no pyabouts agent at {socket_path} ({why.strerror or why}), and it left address "
            f"changes it answered but had not stored in {journal}: start it again, it stores "
            "them first (served here, one of those addresses could be given twice)",
        )
    sys.path[:0] = FALLBACK_PATH
    try:
        from pyabouts.plugin.backend import OneShotBackend  # noqa: PLC0415 - only without an agent
        from pyabouts.plugin.handler import handle_request  # noqa: PLC0415
    except ImportError as exc:
        _fail(stdin, f"no pyabouts agent at {socket_path} ({why}), and no pyabouts here ({exc})")
    reason = f"no pyabouts agent at {socket_path} ({why.strerror or why})"
    reply = handle_request(os.environ, stdin, OneShotBackend(agent_unreachable=reason))
    sys.stdout.buffer.write(reply.stdout)
    sys.stdout.buffer.flush()
    sys.exit(reply.exit_code)


def _whole_json(data: bytes) -> bool:
    import json  # noqa: PLC0415 - large replies only

    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return False
    return True


def _fail(stdin: bytes, message: str, code: int = TRY_AGAIN_LATER) -> "NoReturn":
    """Print CNI error `code` (for STATUS, TRY_AGAIN_LATER is NOT_AVAILABLE) and exit 1."""
    import json  # noqa: PLC0415 - the error path only

    try:
        version = json.loads(stdin).get("cniVersion") or "1.0.0"
    except (ValueError, AttributeError, RecursionError):
        version = "1.0.0"
    if code == TRY_AGAIN_LATER and posix.environ.get(b"CNI_COMMAND") == b"STATUS":
        code = NOT_AVAILABLE
    error = {"cniVersion": version, "code": code}
    error["msg"] = message
    sys.stdout.write(json.dumps(error))
    sys.stdout.flush()
    sys.exit(1)


if __name__ == "__main__":
    main()
