"""Network-namespace "pods" and real CNI plugin calls for integration tests.

Everything here shells out to iproute2 (``ip``), ``ping`` and the Python interpreter running the
tests. It needs root. Traffic only ever flows between namespaces created by the caller; nothing
sends packets from the host namespace. Use addresses from 198.51.100.0/24, 203.0.113.0/24 or
2001:db8::/32 for anything that carries packets.

Typical use::

    with macvlan_master("pa") as master, pod_namespace("a") as a, pod_namespace("b") as b:
        conf = {"cniVersion": "0.4.0", "name": "n", "type": "macvlan", "master": master, ...}
        call = run_cni("/usr/lib/cni/macvlan", "ADD", conf, container_id="ca",
                       netns=a.netns_path, ifname="net1", cni_path=CNI_REFERENCE_DIR)
        result = call.expect_success()
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CNI_REFERENCE_DIR = "/usr/lib/cni"
NETNS_RUN_DIR = "/var/run/netns"

_IFNAME_MAX = 15
_NAME_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class HarnessError(RuntimeError):
    """A harness step (not the code under test) failed."""


@dataclass(frozen=True)
class Pod:
    """A network namespace standing in for a pod."""

    name: str
    netns_path: str


@dataclass(frozen=True)
class CniCall:
    """Outcome of one CNI plugin invocation."""

    command: str
    returncode: int
    result: Any
    """stdout parsed as JSON, or None when stdout was empty (e.g. a successful DEL)."""
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def expect_success(self) -> Any:
        """Return the parsed result, or raise AssertionError with the plugin's output."""
        if self.returncode != 0:
            raise AssertionError(
                f"CNI {self.command} failed with exit code {self.returncode}\n"
                f"stdout: {self.stdout}\nstderr: {self.stderr}"
            )
        return self.result


# --------------------------------------------------------------------------------------------
# small process helpers


def _run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise HarnessError(
            f"{' '.join(argv)!r} exited with {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc


def _ip_json(argv: Sequence[str]) -> list[dict[str, Any]]:
    out = _run(["ip", "-j", *argv]).stdout.strip()
    if not out:
        return []
    data = json.loads(out)
    if not isinstance(data, list):
        raise HarnessError(f"unexpected output of ip -j {' '.join(argv)}: {out}")
    return data


def _check_prefix(prefix: str) -> None:
    if not _NAME_PREFIX_RE.match(prefix):
        raise ValueError(f"name prefix must match {_NAME_PREFIX_RE.pattern}: {prefix!r}")


def netns_names() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    return [str(entry["name"]) for entry in _ip_json(["netns", "list"])]


def host_link_exists(ifname: str) -> bool:
    """Whether an interface of that name exists in the host (current) namespace."""
    return _run(["ip", "link", "show", "dev", ifname], check=False).returncode == 0


def _netns_exec(pod: Pod) -> list[str]:
    return ["ip", "netns", "exec", pod.name]


def exec_in(
    pod: Pod, argv: Sequence[str], *, timeout: float = 30, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command inside the pod's namespace (``ip netns exec``) and capture its output."""
    return _run([*_netns_exec(pod), *argv], check=check, timeout=timeout)


# --------------------------------------------------------------------------------------------
# links and namespaces


@contextlib.contextmanager
def macvlan_master(prefix: str) -> Iterator[str]:
    """Create a veth pair in the host namespace, both ends up, and yield one end's name.

    The yielded end serves as the ``master`` of macvlan links. Deleting it on exit deletes the
    peer and any macvlan children still attached (even ones moved into other namespaces).
    """
    _check_prefix(prefix)
    base = f"{prefix[:7]}{secrets.token_hex(3)}"
    master, peer = f"{base}m", f"{base}p"
    assert len(master) <= _IFNAME_MAX and len(peer) <= _IFNAME_MAX
    _run(["ip", "link", "add", master, "type", "veth", "peer", "name", peer])
    try:
        _run(["ip", "link", "set", peer, "up"])
        _run(["ip", "link", "set", master, "up"])
        yield master
    finally:
        if host_link_exists(master):
            _run(["ip", "link", "del", master])
        if host_link_exists(peer):  # normally gone with its pair
            _run(["ip", "link", "del", peer])


@contextlib.contextmanager
def pod_namespace(name_prefix: str) -> Iterator[Pod]:
    """Create a uniquely named network namespace with ``lo`` up and yield it as a Pod.

    The namespace is deleted on exit, also when the body raises. Processes that the test started
    inside it must be stopped first (``serve_http`` does that itself); otherwise the kernel keeps
    the namespace alive after its name is gone.
    """
    _check_prefix(name_prefix)
    name = f"{name_prefix}-{secrets.token_hex(4)}"
    _run(["ip", "netns", "add", name])
    try:
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield Pod(name=name, netns_path=f"{NETNS_RUN_DIR}/{name}")
    finally:
        proc = _run(["ip", "netns", "del", name], check=False)
        if proc.returncode != 0 and name in netns_names():
            raise HarnessError(f"could not delete netns {name}: {proc.stderr.strip()}")


def pids_in(pod: Pod) -> list[int]:
    """Processes running inside the pod's namespace (``ip netns pids``)."""
    return [int(pid) for pid in _run(["ip", "netns", "pids", pod.name]).stdout.split()]


def link_exists(pod: Pod, ifname: str) -> bool:
    """Whether the interface exists inside the pod's namespace."""
    return any(link.get("ifname") == ifname for link in _ip_json(["-n", pod.name, "link", "show"]))


def addresses_in(pod: Pod, ifname: str, *, include_tentative: bool = True) -> list[str]:
    """Global-scope addresses on ``ifname`` inside the pod, as CIDR strings ("198.51.100.7/24").

    Raises HarnessError when the interface does not exist. IPv6 addresses are "tentative" for
    about a second after being added (duplicate address detection) and cannot be used as a
    source or bound to until then; pass ``include_tentative=False`` to leave them out.
    """
    links = _ip_json(["-n", pod.name, "addr", "show", "dev", ifname])
    found: list[str] = []
    for link in links:
        for info in link.get("addr_info", []):
            if info.get("scope") != "global":
                continue
            if not include_tentative and info.get("tentative"):
                continue
            found.append(f"{info['local']}/{info['prefixlen']}")
    return found


def wait_for_addresses(
    pod: Pod, ifname: str, expected: int = 1, *, timeout: float = 10
) -> list[str]:
    """Wait until ``ifname`` has at least ``expected`` usable (non-tentative) global addresses."""
    deadline = time.monotonic() + timeout
    while True:
        addrs = addresses_in(pod, ifname, include_tentative=False)
        if len(addrs) >= expected:
            return addrs
        if time.monotonic() > deadline:
            raise HarnessError(
                f"{pod.name}/{ifname}: {len(addrs)} usable addresses after {timeout}s "
                f"(all: {addresses_in(pod, ifname)})"
            )
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# CNI


def run_cni(
    plugin_path: str,
    command: str,
    conf: Mapping[str, Any],
    *,
    container_id: str,
    netns: str,
    ifname: str,
    cni_path: str,
    cni_args: str = "",
    timeout: float = 60,
    extra_env: Mapping[str, str] | None = None,
) -> CniCall:
    """Run a CNI plugin executable the way a runtime does: CNI_* env, network config on stdin.

    The plugin inherits this process's environment minus any CNI_* variables, plus
    ``extra_env``. A non-empty stdout that is not JSON raises HarnessError (plugins must always
    print JSON, errors included). A plugin running longer than ``timeout`` raises
    subprocess.TimeoutExpired.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(
        {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_PATH": cni_path,
            "CNI_ARGS": cni_args,
        }
    )
    if extra_env:
        env.update(extra_env)
    proc = subprocess.run(
        [plugin_path],
        input=json.dumps(dict(conf)),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    result: Any = None
    if proc.stdout.strip():
        try:
            result = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise HarnessError(
                f"{plugin_path} {command} printed non-JSON (exit {proc.returncode}): "
                f"{proc.stdout!r}; stderr: {proc.stderr!r}"
            ) from exc
    return CniCall(
        command=command,
        returncode=proc.returncode,
        result=result,
        stdout=proc.stdout,
        stderr=proc.stderr,
    )


def plugin_bin_dir(tmp_path: Path, pyabouts_exe: str) -> str:
    """Make ``tmp_path/cni-bin/pyabouts`` -> ``pyabouts_exe``; return a CNI_PATH string.

    The result is "<that dir>:/usr/lib/cni", so a delegating plugin (macvlan, ...) finds
    pyabouts first and the reference plugins after it. ``pyabouts_exe`` may be a path or a
    command name on PATH.
    """
    found = pyabouts_exe if os.sep in pyabouts_exe else shutil.which(pyabouts_exe)
    if found is None:
        raise HarnessError(f"executable not found: {pyabouts_exe}")
    exe = Path(found).absolute()
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise HarnessError(f"not an executable file: {exe}")
    bin_dir = Path(tmp_path) / "cni-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    link = bin_dir / "pyabouts"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(exe)
    return f"{bin_dir}:{CNI_REFERENCE_DIR}"


# --------------------------------------------------------------------------------------------
# traffic between pods


def ping(src: Pod, dst_ip: str, count: int = 2, *, deadline: int | None = None) -> bool:
    """Ping ``dst_ip`` (v4 or v6) from inside ``src``; True when all ``count`` replies came back.

    ``deadline`` (seconds, default ``count + 3``) bounds the whole run; lower it when the ping is
    expected to fail.
    """
    if deadline is None:
        deadline = count + 3
    proc = exec_in(
        src,
        ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "1", "-w", str(deadline), dst_ip],
        timeout=deadline + 10,
        check=False,
    )
    return proc.returncode == 0


# A tiny HTTP server: answers every GET with BODY, prints READY once it is bound.
_SERVER_SCRIPT = """
import http.server, socket, socketserver, sys
bind_ip, port, body = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

# Not http.server.HTTPServer: its bind looks the host name up (getfqdn), which waits for a DNS
# server that a pod with a default route but no real network never reaches.
class Server(socketserver.TCPServer):
    address_family = socket.AF_INET6 if ":" in bind_ip else socket.AF_INET
    allow_reuse_address = True

server = Server((bind_ip, port), Handler)
print("READY", flush=True)
server.serve_forever()
"""


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@contextlib.contextmanager
def serve_http(
    pod: Pod, bind_ip: str, port: int, body: str, *, startup_timeout: float = 10
) -> Iterator[str]:
    """Serve ``body`` over HTTP on ``bind_ip:port`` inside ``pod``; yield the URL.

    Returns once the socket is bound and listening. The server is killed on exit. An IPv6
    ``bind_ip`` must not be tentative any more (see ``wait_for_addresses``).
    """
    proc = subprocess.Popen(
        [*_netns_exec(pod), sys.executable, "-I", "-c", _SERVER_SCRIPT, bind_ip, str(port), body],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready, _, _ = select.select([proc.stdout], [], [], startup_timeout)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "READY":
            _stop(proc)
            raise HarnessError(
                f"HTTP server in {pod.name} on {bind_ip}:{port} did not start "
                f"(exit {proc.returncode}): {proc.stderr.read().strip()}"
            )
        host = f"[{bind_ip}]" if ":" in bind_ip else bind_ip
        yield f"http://{host}:{port}/"
    finally:
        _stop(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


# Fetch a URL without any proxy from the environment; print the body to stdout.
_GET_SCRIPT = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=float(sys.argv[2])) as response:
    sys.stdout.write(response.read().decode())
"""


def http_get(src: Pod, url: str, *, timeout: float = 5) -> str:
    """GET ``url`` from inside ``src`` and return the body; raise HarnessError on failure."""
    proc = exec_in(
        src,
        [sys.executable, "-I", "-c", _GET_SCRIPT, url, str(timeout)],
        timeout=timeout + 10,
        check=False,
    )
    if proc.returncode != 0:
        raise HarnessError(f"GET {url} from {src.name} failed: {proc.stderr.strip()}")
    return proc.stdout
