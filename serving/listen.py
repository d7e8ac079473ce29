"""The --listen address of /metrics, /healthz and /readyz, and the limit of a unix socket's
path. Standard library only, so that command lines parse them without loading the servers."""

from __future__ import annotations

import argparse
import ipaddress
import os

UNIX_PATH_MAX = 108  # sun_path's size, its final NUL included (Linux)


def parse_listen(listen: str) -> tuple[str, int]:
    """The (host, port) of a --listen value: "host:port", "[ipv6]:port", or ":port" for every
    address, host "" (IPv6 too where the node has it, as Go's ":port"; "[::]:port" is every
    address and fails without IPv6, "0.0.0.0:port" every IPv4 address). An IPv6 address may
    also come without brackets, the port being what follows its last colon: what
    "$(HOST_IP):9646" makes of a node's IPv6 address in a DaemonSet."""
    host, colon, port = listen.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"--listen {listen!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = str(ipaddress.IPv6Address(host[1:-1]))
    elif ":" in host:
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"--listen {listen!r}: {host!r} is not an IPv6 address") from None
    return host, int(port)


def listen_argument(listen: str) -> str:
    """argparse type of --listen: the value as given, once parse_listen accepts it."""
    try:
        parse_listen(listen)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return listen


def check_unix_socket_path(path: str) -> None:
    """ValueError when `path` cannot name the agent's unix socket: not absolute (the agent and
    the plugins the runtime starts elsewhere would not meet; one beginning with "@" is an
    abstract socket to the Go shim, which no file mode protects), or too long for bind() and
    connect()."""
    if not os.path.isabs(path):
        raise ValueError(f"the unix socket {path!r} is not an absolute path")
    size = len(os.fsencode(path))
    if size >= UNIX_PATH_MAX:
        raise ValueError(
            f"the unix socket {path!r} is {size} bytes long: a unix socket's path has fewer "
            f"than {UNIX_PATH_MAX}"
        )


def unix_socket_argument(text: str) -> str:
    """argparse type of a unix socket's path: the value as given, once check_unix_socket_path
    accepts it."""
    try:
        check_unix_socket_path(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
