"""Free loopback ports, for the local servers, agents and controllers that run side by side."""

from __future__ import annotations

import socket


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports on ``host`` (an IPv4 or IPv6 address) that were free a
    moment ago.

    They are held together while chosen, so they differ; someone else may still take one
    before its server binds it (starters retry on "address already in use").
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = [socket.socket(family, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """One TCP port on 127.0.0.1 that is free right now."""
    return free_ports(1)[0]
