"""One write-back per patient at a time: the lease is taken by one run, taken over once expired, and carries the
demand to write every flag again to whoever takes it next."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from service.db.repositories import WritebackLeaseRepository
from service.db.session import session_scope

P = "Patient/p1"
MINUTE = timedelta(minutes=1)


def test_one_holder_per_patient_until_the_lease_expires(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        leases = WritebackLeaseRepository(session)
        assert leases.acquire(P, "run-a", 1, until=t0 + MINUTE, now=t0) == (True, False)
        assert leases.acquire(P, "run-b", 2, until=t0 + MINUTE, now=t0) == (False, False), "held"
        assert leases.acquire(P, "run-a2", 1, until=t0 + MINUTE, now=t0) == (False, False), "a second run of the same evaluation waits too"
        assert leases.acquire("Patient/other", "run-c", 3, until=t0 + MINUTE, now=t0) == (True, False), "per patient"
        assert leases.acquire(P, "run-b", 2, until=t0 + 3 * MINUTE, now=t0 + 2 * MINUTE) == (True, False), "expired: taken over"
        lease = leases.get(P)
        assert lease is not None and (lease.holder, lease.evaluation_id) == ("run-b", 2)
        assert leases.release(P, "run-a") is None, "run-a lost it"
        assert leases.release(P, "run-b") is False
        assert leases.get(P) is None
        assert leases.acquire(P, "run-d", 4, until=t0 + MINUTE, now=t0) == (True, False), "released: free"


def test_a_demanded_resend_goes_to_the_holder_or_to_the_next_taker_once(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        leases = WritebackLeaseRepository(session)
        assert leases.acquire(P, "run-a", 1, until=t0 + MINUTE, now=t0) == (True, False)
        leases.demand_resend(P)
        assert leases.acquire(P, "run-b", 2, until=t0 + MINUTE, now=t0) == (False, False), "the demand does not free a held lease"
        assert leases.release(P, "run-a") is True, "the holder learns of it when it ends"

        leases.demand_resend(P)  # with no holder: waits for the next taker
        assert leases.acquire(P, "run-c", 2, until=t0 + MINUTE, now=t0) == (True, True)
        assert leases.release(P, "run-c") is False, "taken over with the lease: not demanded twice"
        assert leases.acquire(P, "run-d", 2, until=t0 + MINUTE, now=t0) == (True, False)


def test_two_sessions_never_both_take_a_lease(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        assert WritebackLeaseRepository(session).acquire(P, "old", 1, until=t0, now=t0 - MINUTE) == (True, False)
    with session_scope(db_session_factory) as first:
        assert WritebackLeaseRepository(first).acquire(P, "run-a", 2, until=t0 + MINUTE, now=t0 + MINUTE) == (True, False)
    with session_scope(db_session_factory) as second:
        assert WritebackLeaseRepository(second).acquire(P, "run-b", 2, until=t0 + MINUTE, now=t0 + MINUTE) == (False, False)


def test_only_the_holder_renews_its_lease(db_session_factory: sessionmaker[Session], t0: datetime) -> None:
    with session_scope(db_session_factory) as session:
        leases = WritebackLeaseRepository(session)
        assert leases.acquire(P, "run-a", 1, until=t0 + MINUTE, now=t0) == (True, False)
        assert leases.renew(P, "run-a", until=t0 + 5 * MINUTE)
        assert leases.acquire(P, "run-b", 2, until=t0 + 6 * MINUTE, now=t0 + 2 * MINUTE) == (False, False), "renewed: still held"
        assert not leases.renew(P, "run-b", until=t0 + 9 * MINUTE)
        assert leases.acquire(P, "run-b", 2, until=t0 + 9 * MINUTE, now=t0 + 6 * MINUTE) == (True, False)
        assert not leases.renew(P, "run-a", until=t0 + 9 * MINUTE), "lost: may not write"
