"""The listening socket for ``serve --workers N``.

asyncio turns on ``TCP_NODELAY`` for an accepted connection only when the listener reports
``proto == IPPROTO_TCP``. A socket made by ``socket.socket(AF_INET)`` reports 0, so a listener bound that way
(as uvicorn's multi-process supervisor does) leaves Nagle's algorithm on, and every response on a keep-alive
connection after the first waits for the client's delayed ACK: about 40 ms on Linux.
"""

from __future__ import annotations

import socket


def tcp_listener(host: str, port: int) -> socket.socket:
    """A bound, inheritable TCP listener (IPv6 when ``host`` is an IPv6 address) whose connections get TCP_NODELAY."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
