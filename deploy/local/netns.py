"""Network-namespace "pods" and real CNI plugin calls for integration tests.

Everything here shells out to iproute2 (``ip``), ``ping`` and the Python interpreter running the
tests. It needs root. Traffic only ever flows between namespaces created by the caller; nothing
sends packets from the host namespace. Use addresses from 198.51.100.0/24, 198.18.0.0/15 or
2001:db8::/32 for anything that carries packets. Never 203.0.113.0/24: on these machines the
package mirrors resolve into it, and a host route or bridge address there takes their route
away. ``refuse_overlapping_routes`` checks a range that will get host routes (a ptp pod network)
against the routes the host already has.

Typical use::

    with macvlan_master("pa") as master, pod_namespace("a") as a, pod_namespace("b") as b:
        conf = {"cniVersion": "0.4.0", "name": "n", "type": "macvlan", "master": master, ...}
        call = run_cni("/usr/lib/cni/macvlan", "ADD", conf, container_id="ca",
                       netns=a.netns_path, ifname="net1", cni_path=CNI_REFERENCE_DIR)
        result = call.expect_success()
"""

from __future__ import annotations

import contextlib
import ipaddress
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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CNI_REFERENCE_DIR = "/usr/lib/cni"
NETNS_RUN_DIR = "/var/run/netns"

_IFNAME_MAX = 15
_NAME_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# The package mirrors resolve into this range on these machines (see the environment notes):
# nothing may put it on the host side, although the host reaches it through its default route.
PACKAGE_MIRRORS = ipaddress.ip_network("203.0.113.0/24")
RESOLV_CONF = Path("/etc/resolv.conf")


class HarnessError(RuntimeError):
    """A harness step (not the code under test) failed."""


class RouteOverlapError(HarnessError):
    """A test network overlaps a route the host already has: it would shadow it or be shadowed."""


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
# the host's routes, which test networks must leave alone


@dataclass(frozen=True)
class HostRoute:
    """One route of the host namespace, from any table (``ip -j route show table all``)."""

    destination: IPNetwork
    kind: str = "unicast"  # "local" (the host's own addresses), "broadcast", "blackhole", ...
    device: str = ""  # empty for routes without one (blackhole, unreachable)
    table: str = "main"

    def __str__(self) -> str:
        """As ``ip route`` prints it: "192.0.2.0/24 dev eth0", "local 192.0.2.2/32 dev eth0 ..."."""
        words = [] if self.kind == "unicast" else [self.kind]
        words.append(str(self.destination))
        if self.device:
            words += ["dev", self.device]
        if self.table != "main":
            words += ["table", self.table]
        return " ".join(words)


def parse_routes(entries: Iterable[Mapping[str, Any]], version: int) -> list[HostRoute]:
    """HostRoutes from the JSON of ``ip -j -4|-6 route show table all``.

    ``ip`` writes host routes without a prefix length ("198.18.0.2") and the default route as
    "default"; both come back as networks (198.18.0.2/32, 0.0.0.0/0).
    """
    default = "0.0.0.0/0" if version == 4 else "::/0"
    routes = []
    for entry in entries:
        dst = str(entry.get("dst", "default"))
        destination = ipaddress.ip_network(default if dst == "default" else dst, strict=False)
        kind = str(entry.get("type", "unicast"))
        device, table = str(entry.get("dev", "")), str(entry.get("table", "main"))
        routes.append(HostRoute(destination, kind, device, table))
    return routes


def host_routes(version: int) -> list[HostRoute]:
    """Every route of the host namespace of that IP version, from all tables (main, local, ...)."""
    return parse_routes(_ip_json([f"-{version}", "route", "show", "table", "all"]), version)


def pod_veths(links: Iterable[Mapping[str, Any]]) -> set[str]:
    """Names of the veths whose other end lives in another namespace: the host ends of pods'
    links, such as ptp makes. ``links`` is the JSON of ``ip -j -d link show``."""
    return {
        str(link["ifname"])
        for link in links
        if link.get("linkinfo", {}).get("info_kind") == "veth" and "link_netnsid" in link
    }


def _is_pod_route(route: HostRoute, pods: set[str]) -> bool:
    # ptp gives each pod a host route to its address, and its gateway address as a local one.
    single_address = route.destination.prefixlen == route.destination.max_prefixlen
    return single_address and route.device in pods


def routes_in_the_way(
    network: IPNetwork, routes: Iterable[HostRoute], links: Iterable[Mapping[str, Any]]
) -> list[HostRoute]:
    """The routes among ``routes`` that a pod network on ``network`` would overlap.

    Not counted: default routes (they overlap everything), routes of a device that is no longer
    in ``links`` (they went with it), and routes to pods (a single address on a pod's veth, see
    ``pod_veths``), which another node of the pod harness sharing the range has made.
    """
    links = list(links)
    devices = {str(link["ifname"]) for link in links}
    pods = pod_veths(links)
    return [
        route
        for route in routes
        if route.destination.version == network.version
        and route.destination.prefixlen > 0
        and route.destination.overlaps(network)
        and (not route.device or route.device in devices)
        and not _is_pod_route(route, pods)
    ]


def nameservers(resolv_conf: Path = RESOLV_CONF) -> list[IPNetwork]:
    """The DNS servers the host uses, each as a one-address network."""
    if not resolv_conf.is_file():
        return []
    found: list[IPNetwork] = []
    for line in resolv_conf.read_text().splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):  # a malformed line: not the check's business
                found.append(ipaddress.ip_network(words[1]))
    return found


def destinations_kept_clear() -> dict[IPNetwork, str]:
    """Destinations the host reaches through its default route, which therefore no route of its
    own names, but which a test network there would take away: network -> why it matters."""
    kept = {server: "the host's DNS server" for server in nameservers()}
    kept[PACKAGE_MIRRORS] = "the package mirrors' addresses on these machines"
    return kept


def refuse_overlapping_routes(network: str, what: str = "pod network") -> None:
    """Raise RouteOverlapError, naming what is in the way, when ``network`` overlaps a route the
    host has (see ``routes_in_the_way`` for what does not count) or a destination it reaches
    through its default route (``destinations_kept_clear``).

    Call it before putting ``network`` on the host side (ptp's host routes, a bridge address):
    a more specific route there would take traffic away from the host's own (the package
    mirrors, the machine's LAN), and a range holding the host's own addresses would never reach
    its pods.
    """
    wanted = ipaddress.ip_network(network)
    routes = host_routes(wanted.version)
    # Links after routes: a device deleted in between (another test's pod going away) took its
    # routes along, and a device made in between has no routes in the list yet.
    links = _ip_json(["-d", "link", "show"])
    in_the_way = [f"the host route {route}" for route in routes_in_the_way(wanted, routes, links)]
    in_the_way += [
        f"{kept} ({why})"
        for kept, why in destinations_kept_clear().items()
        if kept.version == wanted.version and kept.overlaps(wanted)
    ]
    if in_the_way:
        raise RouteOverlapError(
            f"{what} {wanted} overlaps {' and '.join(in_the_way)}: pick another range"
        )


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
