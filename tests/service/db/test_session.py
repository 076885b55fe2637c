"""Engines, the transaction boundary, the readiness check and the UTC timestamp type."""

from __future__ import annotations

import multiprocessing
import socket
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.models import InboundEvent
from service.db.repositories import InboundEventRepository
from service.db.session import check_database, engine_for, is_sqlite, make_engine, make_session_factory, normalize_url, session_scope


def test_normalize_url_selects_psycopg3_for_bare_postgres_urls() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.sqlite").drivername == "sqlite"
    assert is_sqlite("sqlite:///x.sqlite")
    with pytest.raises(ValueError):
        normalize_url("mysql://u@h/db")


def test_sqlite_engine_enables_wal_and_busy_timeout_and_creates_the_directory(tmp_path: Path) -> None:
    db = tmp_path / "nested" / "dir" / "cds.sqlite"
    engine = make_engine(f"sqlite:///{db}", pool_size=2)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert int(conn.execute(text("PRAGMA busy_timeout")).scalar_one()) >= 5000
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert db.exists()
    finally:
        engine.dispose()


def test_postgres_engine_pre_pings_and_sizes_its_pool() -> None:
    engine = make_engine("postgresql://nobody@127.0.0.1:1/none", pool_size=7)
    try:
        assert engine.pool._pre_ping
        assert engine.pool.size() == 7  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def test_a_postgres_server_that_accepts_but_never_answers_fails_the_connect_within_its_timeout() -> None:
    """Before, the receiver waited for good on such a server (no connect_timeout by default)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the TCP handshake; nothing ever answers the startup message
    port = silent.getsockname()[1]
    settings = Settings(database_url=f"postgresql://nobody@127.0.0.1:{port}/none", db_connect_timeout_s=1)
    engine = engine_for(settings)
    started = time.monotonic()
    try:
        assert check_database(engine) is False
        assert time.monotonic() - started < 10
    finally:
        engine.dispose()
        silent.close()


def test_postgres_statements_are_bounded_and_the_url_keeps_the_last_word(pg_database: str) -> None:
    engine = engine_for(Settings(database_url=pg_database, db_statement_timeout_s=1))
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "1s"
            params = connection.connection.dbapi_connection.info.get_parameters()  # type: ignore[union-attr]
            assert (params["keepalives"], params["keepalives_idle"], params["connect_timeout"]) == ("1", "30", "5")
            with pytest.raises(OperationalError, match=r"QueryCanceled|statement timeout"):
                connection.execute(text("SELECT pg_sleep(5)"))
    finally:
        engine.dispose()
    separator = "&" if "?" in pg_database else "?"
    own = f"{pg_database}{separator}options=-c%20statement_timeout%3D7000"
    engine = engine_for(Settings(database_url=own, db_statement_timeout_s=1))
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "7s"
    finally:
        engine.dispose()
    engine = make_engine(pg_database, pool_size=1)  # migrations: unlimited
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "0"
    finally:
        engine.dispose()


def test_check_database(db_engine: Engine) -> None:
    assert check_database(db_engine) is True


def test_check_database_is_false_when_unreachable() -> None:
    unreachable = make_engine("postgresql://nobody@127.0.0.1:1/none", pool_size=1)
    try:
        assert check_database(unreachable) is False
    finally:
        unreachable.dispose()


def test_session_scope_commits_on_success(db_session_factory: sessionmaker[Session]) -> None:
    with session_scope(db_session_factory) as session:
        InboundEventRepository(session).create_if_absent(dedup_key="k1", kind="resource")
    with session_scope(db_session_factory) as session:
        assert InboundEventRepository(session).get_by_dedup_key("k1") is not None


def test_session_scope_rolls_back_on_error(db_session_factory: sessionmaker[Session]) -> None:
    with pytest.raises(RuntimeError), session_scope(db_session_factory) as session:
        InboundEventRepository(session).create_if_absent(dedup_key="k2", kind="resource")
        raise RuntimeError("boom")
    with session_scope(db_session_factory) as session:
        assert InboundEventRepository(session).get_by_dedup_key("k2") is None


def test_timestamps_round_trip_as_aware_utc(db_session_factory: sessionmaker[Session]) -> None:
    plus_two = timezone(timedelta(hours=2))
    local = datetime(2025, 1, 1, 14, 30, 15, 123456, tzinfo=plus_two)
    with session_scope(db_session_factory) as session:
        InboundEventRepository(session).create_if_absent(dedup_key="tz", kind="resource", now=local)
    with session_scope(db_session_factory) as session:
        event = session.scalars(select(InboundEvent).where(InboundEvent.dedup_key == "tz")).one()
        assert event.received_at == local
        assert event.received_at.tzinfo is not None
        assert event.received_at.utcoffset() == timedelta(0)
        assert event.received_at == datetime(2025, 1, 1, 12, 30, 15, 123456, tzinfo=UTC)


def test_naive_timestamps_are_refused(db_session_factory: sessionmaker[Session]) -> None:
    with pytest.raises(StatementError), session_scope(db_session_factory) as session:
        InboundEventRepository(session).create_if_absent(dedup_key="naive", kind="resource", now=datetime(2025, 1, 1))


def test_database_errors_do_not_echo_patient_data(db_session_factory: sessionmaker[Session]) -> None:
    secret = {"resourceType": "Patient", "name": [{"family": "Secretname"}]}
    with pytest.raises(IntegrityError) as caught, session_scope(db_session_factory) as session:
        InboundEventRepository(session).create_if_absent(dedup_key="phi", kind=None, payload=secret)  # type: ignore[arg-type]
    assert "Secretname" not in str(caught.value)
    assert "Secretname" not in str(caught.value.orig)
    assert "hidden" in str(caught.value)
    assert "kind" in str(caught.value)  # the column is still named
    with pytest.raises(IntegrityError) as unique, session_scope(db_session_factory) as session:
        session.add(InboundEvent(dedup_key="Secretname-key", kind="resource", status="received", attempts=0))
        session.add(InboundEvent(dedup_key="Secretname-key", kind="resource", status="received", attempts=0))
    assert "Secretname" not in str(unique.value)
    assert "Secretname" not in str(unique.value.orig)


def _write_events(url: str, worker: int, count: int) -> int:
    """Runs in a separate process: like the API and a worker sharing one database."""
    engine = make_engine(url, pool_size=1)
    created = 0
    try:
        factory = make_session_factory(engine)
        for i in range(count):
            with session_scope(factory) as session:
                ledger = InboundEventRepository(session)
                created += ledger.create_if_absent(dedup_key=f"shared-{i}", kind="resource")[1]
                created += ledger.create_if_absent(dedup_key=f"own-{worker}-{i}", kind="resource")[1]
                ledger.claim_for_processing(1)
    finally:
        engine.dispose()
    return created


def test_several_processes_share_one_database(db_url: str) -> None:
    processes, count = 3, 15
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        created = list(pool.map(_write_events, [db_url] * processes, range(processes), [count] * processes))
    assert sum(created) == count + processes * count
    engine = make_engine(db_url, pool_size=1)
    try:
        with session_scope(make_session_factory(engine)) as session:
            counts = InboundEventRepository(session).counts_by_status()
        assert sum(counts.values()) == count + processes * count
        assert counts["processing"] == 1
    finally:
        engine.dispose()
