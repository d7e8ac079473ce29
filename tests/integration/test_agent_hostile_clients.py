"""A real `pyabouts-agent` against clients that are broken or hostile: garbage, a truncated
frame, 10 MiB, silence, a trickle, a uid it does not serve, more connections than it serves at
once, 500 idle HTTP connections and fuzzed frames. Each is answered with a CNI error or a closed
connection (the tests say which), and meanwhile real ADDs through the node shim are served.

The agents here have their own datastore (`--config`), so a request, fuzzed or not, cannot make
them connect anywhere but the test's etcd on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.local.agent_process import AgentProcess, running_agent
from deploy.local.node_shim import built_shim
from pyabouts.plugin.agent.server import MAX_REQUEST_BYTES, PLUGIN_WAIT_MARGIN_SECONDS
from pyabouts.plugin.install import install_shim
from pyabouts.plugin.wire import DEADLINE_KEY, MAGIC
from tests.integration.etcd_fixtures import EtcdServer
from tests.integration.plugin_fixtures import etcd_ipam
from tests.integration.plugin_processes import Node, make_nodes, metric, run_plugins
from tests.integration.stored_state import etcd_store, owners_in
from tests.local_http import closed_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DEADLINE = 2.0  # the agents' --request-deadline here, so that slow clients are cut off soon
WAIT = 30.0  # seconds a test waits for any one answer at most (a bound, not a speed check)
NOBODY = 65534
AGENT_MEMORY_LIMIT_MIB = 256  # deploy/agent/daemonset.yaml's
CLOSED = None  # what read_reply gives for a connection closed without a reply


# -- the wire format, from the client's side -----------------------------------------------


def frame(env: dict[str, str], conf: dict[str, Any]) -> bytes:
    entries = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
    return MAGIC + entries + b"\0" + json.dumps(conf).encode()


def add_env(container: str) -> dict[str, str]:
    return {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": container,
        "CNI_IFNAME": "net1",
        "CNI_NETNS": f"/var/run/netns/{container}",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=hostile;K8S_POD_NAME={container}",
    }


def conf_of(ipam: dict[str, Any]) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": "hostile", "type": "macvlan", "ipam": ipam}


def read_reply(sock: socket.socket, seconds: float = WAIT) -> bytes | None:
    """What the agent sends until it closes (a reset after its reply included); CLOSED when
    it closed without a byte. Fails the test if the agent neither answers nor closes in time."""
    deadline = time.monotonic() + seconds
    chunks: list[bytes] = []
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        except TimeoutError:
            pytest.fail(f"no answer and no close in {seconds:g} s")
        if not chunk:
            return b"".join(chunks) or CLOSED
        chunks.append(chunk)


def pad(request: bytes, size: int) -> bytes:
    """`request` made `size` bytes long with spaces after its JSON."""
    assert len(request) <= size
    return request + b" " * (size - len(request))


def parse_reply(raw: bytes) -> tuple[int, Any]:
    """(exit code, JSON) of a reply, asserting it is `<digits>\\0<json>`."""
    code, nul, body = raw.partition(b"\0")
    assert nul and code.isdigit(), raw[:200]
    return int(code), json.loads(body) if body else None


def assert_cni_error(raw: bytes | None, code: int, *, says: str = "") -> dict[str, Any]:
    assert raw is not CLOSED, "closed without a reply"
    exit_code, error = parse_reply(raw)
    assert exit_code == 1 and isinstance(error, dict)
    assert error["code"] == code and isinstance(error["msg"], str), error
    assert says in error["msg"]
    return error


def ask(path: Path, request: bytes) -> bytes | None:
    """Send `request` whole, as the node's plugin does, and read the reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (refused) without being read: the answer is there to read
        return read_reply(sock)


# -- the bad clients ------------------------------------------------------------------------


def send_garbage(path: Path) -> bytes | None:
    return ask(path, b"\x00\xffGET / HTTP/1.1\r\n\r\n" * 50)


def send_truncated_frame(path: Path) -> bytes | None:
    whole = frame(add_env("truncated"), {})
    return ask(path, whole[: len(MAGIC) + 20])  # MAGIC and half an environment


def send_an_unknown_command(path: Path) -> bytes | None:
    return ask(path, frame(add_env("evil") | {"CNI_COMMAND": "EVIL-LABEL"}, {}))


def send_ten_mebibytes(path: Path) -> bytes | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))

        def flood() -> None:
            chunk = MAGIC + b"x" * (1 << 20)
            try:
                for _ in range(10):
                    sock.sendall(chunk)
            except OSError:
                pass  # the agent stopped reading: expected

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        reply = read_reply(sock)
        sender.join(WAIT)
        return reply


def send_nothing(path: Path) -> bytes | None:
    """Connect and stay silent, write end open, past the deadline."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        return read_reply(sock, DEADLINE + WAIT)


def trickle(path: Path) -> bytes | None:
    """A byte every half second, each well within any per-read timeout, for longer than the
    deadline; stops when the agent answers or closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(MAGIC)
        until = time.monotonic() + DEADLINE + WAIT
        while time.monotonic() < until and not select.select([sock], [], [], 0.5)[0]:
            try:
                sock.sendall(b"x")
            except OSError:
                break
        return read_reply(sock)


def idle_http_connections(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(count)]


def all_closed_by_the_server(conns: list[socket.socket]) -> bool:
    return all(read_reply(conn, WAIT) is CLOSED for conn in conns)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def agent_config(etcd_server: EtcdServer, tmp_path: Path) -> Path:
    """The agents' own flat file: their datastore, whatever requests name."""
    path = tmp_path / "agent.conf"
    path.write_text(json.dumps({"datastore": "etcd", "etcd_host": etcd_server.endpoint}))
    return path


@pytest.fixture
def start_agent(agent_config: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Starts agents on the test's etcd, with extra flags; each stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda directory, *flags: stack.enter_context(
            running_agent(directory, config=agent_config, extra_args=flags)
        )


@pytest.fixture
def shim(tmp_path: Path) -> str:
    """The node shim: every call must be the agent's."""
    exe = install_shim(tmp_path / "bin", built_shim(), socket_path="/nonexistent")
    return str(exe)


def network() -> str:
    return f"hostile-{uuid.uuid4().hex[:6]}"


def allocated(server: EtcdServer, network_name: str) -> dict[str, Any]:
    """address -> owner of what `server` holds of `network_name`."""
    store = etcd_store(server)
    try:
        return dict(owners_in(store, network_name))
    finally:
        store.close()


def adds_through(
    shim: str, node: Node, ipam: dict[str, Any], pods: list[str]
) -> list[tuple[int, Any]]:
    return run_plugins(shim, "ADD", ipam, [node], pods, in_flight=10)


# -- the tests --------------------------------------------------------------------------------


def test_bad_clients_are_answered_or_dropped_while_real_adds_are_served(
    start_agent: Callable[..., AgentProcess],
    shim: str,
    etcd_server: EtcdServer,
    tmp_path: Path,
) -> None:
    agent = start_agent(tmp_path / "node-0", "--request-deadline", str(DEADLINE))
    store = {"datastore": "etcd", "etcd_host": etcd_server.endpoint}
    [node] = make_nodes(tmp_path, 1, store, lambda directory: agent)
    ipam = etcd_ipam(etcd_server, range="10.77.0.0/24", network_name=network())
    idle = idle_http_connections(agent.metrics_port, 500)
    bad_clients = [
        send_garbage,
        send_truncated_frame,
        send_an_unknown_command,
        send_ten_mebibytes,
        send_nothing,
        trickle,
    ]
    try:
        with ThreadPoolExecutor(len(bad_clients)) as pool:
            answers: dict[str, Future[bytes | None]] = {
                client.__name__: pool.submit(client, agent.socket) for client in bad_clients
            }
            # While they are at it, and 500 HTTP connections are open and idle:
            assert agent.endpoint("/healthz") == "ok"
            assert "pyabouts_agent_requests_in_flight" in agent.metrics()
            pods = [f"pod-{i:02d}" for i in range(20)]
            outcomes = adds_through(shim, node, ipam, pods)
            assert [code for code, _ in outcomes] == [0] * 20, outcomes
            given = {result["ips"][0]["address"] for _, result in outcomes}
            assert len(given) == 20
            replies = {name: future.result(timeout=2 * WAIT) for name, future in answers.items()}

        assert_cni_error(replies["send_garbage"], 6, says="not a pyabouts request")
        assert_cni_error(replies["send_truncated_frame"], 6, says="inside its environment")
        assert_cni_error(replies["send_an_unknown_command"], 4, says="EVIL-LABEL")
        assert_cni_error(replies["send_ten_mebibytes"], 6, says="request over")
        assert_cni_error(replies["send_nothing"], 11, says="did not arrive whole")
        assert_cni_error(replies["trickle"], 11, says="did not arrive whole")
        assert all_closed_by_the_server(idle)  # dropped once idle long enough
    finally:
        for conn in idle:
            conn.close()

    assert agent.endpoint("/healthz") == "ok"
    [(code, _)] = adds_through(shim, node, ipam, ["after"])
    assert code == 0
    for reason, count in {"malformed": 2, "too-large": 1, "deadline": 2}.items():
        assert metric(agent, "pyabouts_agent_rejected_total", reason=reason) == count, reason
    exposed = agent.metrics()
    assert "EVIL" not in exposed  # a client cannot mint a label value
    assert metric(agent, "pyabouts_agent_requests_total", command="unknown", result="4") == 1
    assert metric(agent, "pyabouts_agent_requests_total", command="ADD", result="ok") == 21


def test_a_uid_not_allowed_is_refused_with_code_105_logged_and_counted(
    start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    """Root itself is refused by an agent that serves only uid 4242."""
    agent = start_agent(tmp_path / "node-0", "--allow-uid", "4242", "--allow-uid", "4243")
    reply = ask(agent.socket, frame(add_env("root"), {}))
    assert_cni_error(reply, 105, says="serves uid 4242, 4243 only; this client runs as uid 0")
    # The readiness probes (root too) are counted as well, and a loaded agent may count them
    # late; but connections are accepted in order, so all are counted once this one was.
    counted = metric(agent, "pyabouts_agent_rejected_total", reason="peer")
    assert counted >= 1
    assert_cni_error(ask(agent.socket, frame(add_env("root"), {})), 105, says="uid 0")
    assert metric(agent, "pyabouts_agent_rejected_total", reason="peer") == counted + 1
    assert "refused a client running as uid 0" in agent.log.read_text()
    assert agent.endpoint("/healthz") == "ok"


def test_the_socket_directory_is_made_private_and_other_uids_are_refused_behind_it(
    start_agent: Callable[..., AgentProcess],
    shim: str,
    etcd_server: EtcdServer,
) -> None:
    """The directory is 0700 once the agent runs, whoever made it and how; and a process of
    another uid that gets past the file modes (loosened here on purpose) is refused all the same.
    In a directory of /tmp: nobody cannot enter pytest's tmp_path."""
    top = Path(tempfile.mkdtemp(prefix="pyabouts-uid-"))
    try:
        directory = top / "node-0"
        directory.mkdir()
        for path in (top, directory):
            path.chmod(0o755)
        agent = start_agent(directory)
        assert directory.stat().st_mode & 0o777 == 0o700
        assert agent.socket.stat().st_mode & 0o777 == 0o600

        request = frame(add_env("nobody"), conf_of(etcd_ipam(etcd_server, range="10.79.0.0/24")))
        assert as_nobody(agent.socket, request) == "PermissionError"  # the directory's mode

        directory.chmod(0o711)
        agent.socket.chmod(0o666)
        reply = as_nobody(agent.socket, request).encode("latin-1")
        assert_cni_error(reply, 105, says=f"this client runs as uid {NOBODY}")
        assert metric(agent, "pyabouts_agent_rejected_total", reason="peer") == 1

        [node] = make_nodes(top, 1, {"datastore": "etcd", "etcd_host": etcd_server.endpoint})
        node = Node(node.flat_file, agent)
        ipam = etcd_ipam(etcd_server, range="10.79.0.0/24", network_name=network())
        [(code, _)] = adds_through(shim, node, ipam, ["root"])
        assert code == 0  # root still served
    finally:
        shutil.rmtree(top, ignore_errors=True)


NOBODY_CLIENT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    sys.stdout.write(type(exc).__name__)
    sys.exit(0)
try:
    sock.sendall(sys.stdin.buffer.read())
    sock.shutdown(socket.SHUT_WR)
except OSError:
    pass  # answered without being read
sock.settimeout(30)
try:
    while chunk := sock.recv(65536):
        sys.stdout.buffer.write(chunk)
except ConnectionResetError:
    pass
"""


def as_nobody(path: Path, request: bytes) -> str:
    """What a process of uid nobody gets sending `request` to `path`: the reply (latin-1), or
    the name of the error connect() raised. The system python: nobody cannot read /root."""
    done = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", NOBODY_CLIENT, str(path)],
        input=request,
        capture_output=True,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        timeout=WAIT,
        check=True,
    )
    return done.stdout.decode("latin-1")


def test_beyond_the_workers_and_the_queue_a_request_gets_code_11_at_once(
    start_agent: Callable[..., AgentProcess],
    shim: str,
    etcd_server: EtcdServer,
    tmp_path: Path,
) -> None:
    agent = start_agent(
        tmp_path / "node-0",
        *("--max-requests", "1", "--max-waiting", "1", "--request-deadline", str(DEADLINE)),
    )
    # Three silent clients for one worker and one place in the queue. Which of them is refused
    # depends on whether the worker took the first before the second arrived, but one is, at
    # once: its reply comes first, while the others are only cut off at their deadline.
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for conn in silent:
            conn.connect(str(agent.socket))
        ready, _, _ = select.select(silent, [], [], WAIT)
        assert ready, "no reply at all"
        first = assert_cni_error(read_reply(ready[0]), 11)
        assert "is busy" in first["msg"], f"the first reply was not a refusal: {first}"
        replies = [read_reply(conn) for conn in silent if conn is not ready[0]]
    finally:
        for conn in silent:
            conn.close()
    for reply in replies:  # cut off at its deadline, or refused too
        msg = assert_cni_error(reply, 11)["msg"]
        assert "did not arrive whole" in msg or "is busy" in msg, msg
    assert metric(agent, "pyabouts_agent_rejected_total", reason="busy") in (1, 2)

    [node] = make_nodes(tmp_path, 1, {"datastore": "etcd", "etcd_host": etcd_server.endpoint})
    ipam = etcd_ipam(etcd_server, range="10.80.0.0/24", network_name=network())
    [(code, _)] = adds_through(shim, Node(node.flat_file, agent), ipam, ["after"])
    assert code == 0


def test_a_request_queued_past_its_command_deadline_is_refused_not_served(
    start_agent: Callable[..., AgentProcess],
    shim: str,
    etcd_server: EtcdServer,
    tmp_path: Path,
) -> None:
    # Its caller may have given up and the runtime sent its DEL: an ADD served now would hold
    # an address for nobody. One worker, held by a silent client until its request deadline.
    command_deadline = DEADLINE / 4  # the ADD below comes well within the silent one's time
    agent = start_agent(
        tmp_path / "node-0",
        *("--max-requests", "1", "--request-deadline", str(DEADLINE)),
        *("--command-deadline", str(command_deadline)),
    )
    [node] = make_nodes(tmp_path, 1, {"datastore": "etcd", "etcd_host": etcd_server.endpoint})
    ipam = etcd_ipam(etcd_server, range="10.81.0.0/24", network_name=network())
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        silent.connect(str(agent.socket))
        taken = time.monotonic() + WAIT  # until the worker has taken it, and waits for its bytes
        while metric(agent, "pyabouts_agent_requests_in_flight") != 1:
            assert time.monotonic() < taken, "the silent client was never served"
            time.sleep(0.05)
        [(code, late)] = adds_through(shim, Node(node.flat_file, agent), ipam, ["queued"])
        assert_cni_error(read_reply(silent), 11, says="did not arrive whole")
    finally:
        silent.close()
    assert code == 1 and late["code"] == 11, late
    assert "waited" in late["msg"] and "for a worker" in late["msg"], late
    assert metric(agent, "pyabouts_agent_rejected_total", reason="late") == 1
    assert allocated(etcd_server, ipam["network_name"]) == {}  # nothing was allocated

    [(code, _)] = adds_through(shim, Node(node.flat_file, agent), ipam, ["after"])
    assert code == 0


def test_a_request_its_plugin_gave_up_on_while_the_agent_stalled_is_not_served(
    start_agent: Callable[..., AgentProcess], etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """The agent stalls (stopped, starved); an ADD waits in its socket's backlog until its
    plugin gives up (code 11 to the runtime, which moves on). Taken up after that, the
    request is answered code 11 and carries nothing out: its command's deadline came from the
    plugin's (PYABOUTS_DEADLINE, less the agent's margin), not from the late accept."""
    agent = start_agent(tmp_path / "node-0")
    ipam = etcd_ipam(etcd_server, range="10.82.0.0/24", network_name=network())
    margin = PLUGIN_WAIT_MARGIN_SECONDS

    def request(container: str, waits: float) -> bytes:
        gives_up = int((time.time() + waits) * 1000)
        return frame(add_env(container) | {DEADLINE_KEY: str(gives_up)}, conf_of(ipam))

    pid = agent.process.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
            stalled.connect(str(agent.socket))  # into the backlog: the agent takes nothing
            stalled.sendall(request("given-up", margin + 1))
            stalled.shutdown(socket.SHUT_WR)
            time.sleep(1.5)  # past what the plugin left the agent
            os.kill(pid, signal.SIGCONT)
            assert_cni_error(read_reply(stalled), 11, says="stopped waiting")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert metric(agent, "pyabouts_agent_rejected_total", reason="plugin-gave-up") == 1
    assert allocated(etcd_server, ipam["network_name"]) == {}  # nothing was allocated
    code, result = parse_reply(ask(agent.socket, request("in-time", margin + 30)) or b"")
    assert code == 0 and result["ips"], result


def test_on_sigterm_a_request_in_flight_is_served_and_a_queued_one_gets_code_11(
    start_agent: Callable[..., AgentProcess], etcd_server: EtcdServer, tmp_path: Path
) -> None:
    agent = start_agent(tmp_path / "node-0", *("--max-requests", "1", "--max-waiting", "2"))
    ipam = etcd_ipam(etcd_server, range="10.81.0.0/24", network_name=network())
    request = frame(add_env("in-flight"), conf_of(ipam))
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as in_flight,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as queued,
    ):
        in_flight.connect(str(agent.socket))
        in_flight.sendall(request[:30])  # to be read by the only worker, until it ends
        queued.connect(str(agent.socket))
        assert eventually(lambda: one_in_flight_and_one_waiting(agent))
        stopping = threading.Thread(target=agent.stop)  # SIGTERM, then waits for the exit
        stopping.start()
        assert_cni_error(read_reply(queued), 11, says="stopped before serving it")
        in_flight.sendall(request[30:])
        in_flight.shutdown(socket.SHUT_WR)
        reply = read_reply(in_flight)
        stopping.join(WAIT)
    assert reply is not CLOSED
    code, result = parse_reply(reply)
    assert code == 0 and result["ips"][0]["address"] == "10.81.0.1/24"


def one_in_flight_and_one_waiting(agent: AgentProcess) -> bool:
    """The agent reads the first connection and has queued the second (and has finished with
    its readiness probe, a connection too)."""
    probed = metric(agent, "pyabouts_agent_request_seconds_count") >= 1
    in_flight = metric(agent, "pyabouts_agent_requests_in_flight")
    return probed and in_flight == 1 and metric(agent, "pyabouts_agent_requests_waiting") == 1


def eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- fuzzing the wire format -------------------------------------------------------------------

FUZZ_IPAM = {"type": "pyabouts", "datastore": "etcd", "range": "10.82.0.0/24"}
VALID_FRAME = frame(add_env("fuzz"), conf_of(FUZZ_IPAM | {"network_name": "hostile-fuzz"}))


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid ADD frame with a few bytes flipped, inserted, deleted or cut off."""
    data = bytearray(VALID_FRAME)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if kind == "flip":
            data[at : at + 1] = draw(st.binary(min_size=1, max_size=1))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


def assert_well_formed(raw: bytes | None) -> None:
    """A closed connection, a CNI error, or (for a mutation that is still a valid request) a
    success with a JSON object or nothing to print."""
    if raw is CLOSED:
        return
    code, body = parse_reply(raw)
    if code == 0:
        assert body is None or isinstance(body, dict)
        return
    assert code == 1 and isinstance(body, dict), body
    assert isinstance(body["code"], int) and isinstance(body["msg"], str), body


def test_fuzzed_frames_get_a_well_formed_answer_and_the_agent_serves_on(
    start_agent: Callable[..., AgentProcess],
    shim: str,
    etcd_server: EtcdServer,
    tmp_path: Path,
) -> None:
    agent = start_agent(tmp_path / "node-0")
    assert parse_reply(ask(agent.socket, VALID_FRAME) or b"")[0] == 0  # unmutated: served

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(st.one_of(st.binary(max_size=2048), mutated_frames()))
    def answered(request: bytes) -> None:
        assert_well_formed(ask(agent.socket, request))

    answered()
    assert agent.endpoint("/healthz") == "ok"
    [node] = make_nodes(tmp_path, 1, {"datastore": "etcd", "etcd_host": etcd_server.endpoint})
    ipam = etcd_ipam(etcd_server, range="10.83.0.0/24", network_name=network())
    [(code, result)] = adds_through(shim, Node(node.flat_file, agent), ipam, ["after"])
    assert code == 0, result


def test_requests_a_nad_made_huge_cannot_take_the_agent_past_its_memory_limit(
    tmp_path: Path,
) -> None:
    """A NAD's writer chooses its size: 16 pods at once on one node, each with a network config
    of nearly 1 MiB that decodes to ~25 times that ("[{},{},...]", extra keys are ignored),
    with the datastore out of reach so that each request is held until its deadline. Every one
    is answered code 11, and the agent's peak memory stays under the DaemonSet's limit (256Mi;
    over 290 MiB with 4 MiB of requests in flight and what they decoded left to the
    collector)."""
    config = tmp_path / "agent.conf"
    config.write_text(json.dumps({"datastore": "etcd", "etcd_host": f"127.0.0.1:{closed_port()}"}))
    padding = (MAX_REQUEST_BYTES - 4096) // 4  # "{}, " each, for just under the limit
    conf = conf_of({"type": "pyabouts", "range": "10.78.0.0/24"}) | {"x": [{}] * padding}
    # Each exactly the largest taken (JSON allows trailing spaces): two leave no room at all.
    requests = [pad(frame(add_env(f"huge-{i}"), conf), MAX_REQUEST_BYTES) for i in range(16)]
    # A small request with a config refused at once (no store needed to answer it).
    small = frame(add_env("small"), conf_of({"type": "pyabouts", "range": "10.78.0.0/33"}))
    answered: dict[str, float] = {}

    def timed(name: str, request: bytes) -> bytes | None:
        try:
            return ask(agent.socket, request)
        finally:
            answered[name] = time.monotonic()

    with running_agent(
        tmp_path / "node-0", config=config, extra_args=["--command-deadline", "4"]
    ) as agent:
        with ThreadPoolExecutor(len(requests) + 1) as pool:
            huge = [pool.submit(timed, f"huge-{i}", r) for i, r in enumerate(requests)]
            time.sleep(0.5)  # the budget taken by the first of them
            small_reply = pool.submit(timed, "small", small).result()
            replies = [future.result() for future in huge]
        peak = agent.peak_rss_mib()
    for reply in replies:
        assert_cni_error(reply, 11)
    assert peak < AGENT_MEMORY_LIMIT_MIB, peak
    # It never waits for the large ones' memory: answered before any of them is.
    assert_cni_error(small_reply, 7, says="10.78.0.0/33")
    assert answered.pop("small") < min(answered.values()), answered
