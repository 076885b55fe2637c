"""Broker reachability for /readyz, without importing Celery (Redis ping, or the SQLAlchemy transport's database)."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.exc import SQLAlchemyError


def check_broker(url: str, timeout_s: float = 1.0) -> bool:
    try:
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
            try:
                return bool(client.ping())
            finally:
                client.close()
        if url.startswith("sqla+"):
            engine = create_engine(url[len("sqla+") :])
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return True
            finally:
                engine.dispose()
        if url.startswith(("memory://",)):
            return True
    except (OSError, SQLAlchemyError, Exception):
        return False
    return False
