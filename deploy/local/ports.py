"""Free loopback ports, for the local servers, agents and controllers that run side by side."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    They are held together while chosen, so they differ; someone else may still take one
    before its server binds it (starters retry on "address already in use").
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """One TCP port on 127.0.0.1 that is free right now."""
    return free_ports(1)[0]
