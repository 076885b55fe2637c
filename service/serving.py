"""The listening socket of ``serve``, one process or ``--workers N``.

Bound here rather than by uvicorn, for two reasons:
- a taken port is reported as one line with exit 2, like every other CLI error;
- the standard asyncio loop turns on ``TCP_NODELAY`` for an accepted connection only when the listener reports
  ``proto == IPPROTO_TCP``, and uvicorn binds with ``socket.socket(AF_INET)``, which reports 0. On that loop,
  every response on a keep-alive connection after the first would wait about 40 ms for the client's delayed ACK
  (Kludex/uvicorn#3149).

uvloop, the loop uvicorn picks wherever it is installed (a dependency except on Windows), sets ``TCP_NODELAY`` on
every connection whatever the listener reports.
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
