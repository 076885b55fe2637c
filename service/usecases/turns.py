"""Fair turns for CPU-bound work on the event loop.

A CDS Hooks call parses and evaluates synchronously on the event loop (a few milliseconds of Python; a thread
executor was tried and halved throughput, see docs/benchmarks.md). Left alone, asyncio runs every handler whose
request body completed in the same loop iteration back to back and reads the sockets only after the whole batch: a
call whose body finished arriving a moment too late waits for the current batch and then for its own. Under load
the 95th percentile was twice the median. And every parsed body waiting in a batch stays in memory at once, which
made each call's own work slower (cache misses).

:class:`CpuTurns` gives that work one turn at a time, first come first served (``asyncio.Lock`` wakes its waiters
in order), and lets the loop poll its sockets after each turn before the next one starts. A call then waits for the
work that arrived before it and no more. A turn is paused around network I/O (the FHIR fallback) so other calls can
go on meanwhile, and is taken again afterwards.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Turn:
    """A held turn; :meth:`paused` gives it up around awaited I/O and takes it back after (at the end of the line).
    When the paused block raises, the turn is not taken back: the call is ending, with no work left to queue for."""

    def __init__(self, lock: asyncio.Lock) -> None:
        self._lock = lock
        self.held = True

    @asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        self._lock.release()
        self.held = False
        yield
        await self._lock.acquire()  # cancelled while waiting: not held, and not released by turn()
        self.held = True


class CpuTurns:
    def __init__(self) -> None:
        # One lock per running loop (test clients and ``asyncio.run`` each make their own loop).
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[Turn]:
        """``async with turns.turn() as turn:`` CPU-bound work; the next caller starts only after the loop has
        polled I/O."""
        lock = self._lock()
        await lock.acquire()
        turn = Turn(lock)
        try:
            yield turn
            await asyncio.sleep(0)  # still holding the turn: the loop reads sockets before the next caller runs
        finally:
            if turn.held:
                lock.release()
