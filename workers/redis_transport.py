"""kombu's Redis transport, with one guard that keeps a worker alive when Redis goes away.

On a lost broker connection, Celery 5.7's consumer detaches the transport from the connection (``collect``)
and then closes the connection's channel. Closing a channel that still holds unacknowledged messages (a task
running with ``acks_late``, or a countdown task waiting for its time: every coalesced evaluation) makes kombu
restore them over that detached transport, which raises ``AttributeError`` ("'NoneType' object has no
attribute 'hostname'"): the consumer treats it as unrecoverable and the worker process exits.

Nothing can be restored without a connection anyway. Skipping the restore there is safe: the messages are still
in Redis's unacked index (restored after ``visibility_timeout``) if Redis kept them, and if it did not (a restart
without persistence) the ledger sweeper re-enqueues the unfinished events and dirty patients.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class QoS(kombu_redis.QoS):
    def restore_unacked(self, client: Any = None) -> None:
        if client is None and getattr(self.channel.connection, "client", None) is None:
            delivered: Any = self._delivered  # detached from its connection: see the module docstring
            delivered.clear()
            return
        super().restore_unacked(client)


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel
