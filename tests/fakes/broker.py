"""A broker that stops answering: a real TCP listener on 127.0.0.1 that accepts every connection and never answers
(a hung Redis: the kernel completes the handshake, nothing reads or replies), as the outage drills reproduce it.

With ``upstream`` it first relays every connection to a real Redis, byte for byte, until :meth:`freeze`: from then
on it relays nothing more in either direction and keeps every socket open, so a client whose pooled connection
worked a moment ago waits for an answer that never comes.

Example::

    with SilentBroker() as broker:
        CeleryQueue(broker.url(15), socket_timeout_s=1).send(...)  # fails within seconds
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from types import TracebackType


class SilentBroker:
    def __init__(self, upstream: tuple[str, int] | None = None) -> None:
        self.upstream = upstream
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.accepted = 0
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))  # a port the system assigns: never one another process chose
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])

    def url(self, db: int = 15) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def freeze(self) -> None:
        """From now on: relay nothing, answer nothing, close nothing."""
        self.frozen.set()

    def __enter__(self) -> SilentBroker:
        threading.Thread(target=self._accept, name="silent-broker", daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
            self._sockets.clear()

    def _keep(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._keep(client)
            if self.upstream is not None and not self.frozen.is_set():
                server = socket.create_connection(self.upstream, timeout=5)
                self._keep(server)
                threading.Thread(target=self._relay, args=(client, server), daemon=True).start()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        while not (self.closed.is_set() or self.frozen.is_set()):
            try:
                readable, _, _ = select.select([a, b], [], [], 0.05)
                for sock in readable:
                    if self.frozen.is_set():
                        return  # what arrived after the freeze is never delivered
                    data = sock.recv(65536)
                    if not data:
                        return
                    peer[sock].sendall(data)
            except (OSError, ValueError):
                return
