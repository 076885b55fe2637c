"""``serve --workers N`` listens on a socket whose accepted connections get TCP_NODELAY (no 40 ms delayed-ACK stalls)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from service.serving import tcp_listener


async def _nodelay_of_accepted(listener: socket.socket) -> int:
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
    try:
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(seen, 5)
        writer.close()
        return value
    finally:
        server.close()
        await server.wait_closed()


def test_connections_accepted_on_the_listener_have_nodelay() -> None:
    listener = tcp_listener("127.0.0.1", 0)
    assert listener.proto == socket.IPPROTO_TCP and listener.get_inheritable()
    assert asyncio.run(_nodelay_of_accepted(listener)) == 1


def test_a_plain_socket_would_not_get_nodelay() -> None:
    """The defect the listener avoids, so this test fails if asyncio ever changes and the workaround can go."""
    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    plain.bind(("127.0.0.1", 0))
    assert asyncio.run(_nodelay_of_accepted(plain)) == 0


def test_a_port_in_use_is_an_error() -> None:
    first = tcp_listener("127.0.0.1", 0)
    first.listen()
    with pytest.raises(OSError):
        tcp_listener("127.0.0.1", first.getsockname()[1])
    first.close()
