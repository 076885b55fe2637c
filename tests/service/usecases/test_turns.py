"""CpuTurns: CPU-bound steps one at a time, first come first served, with socket reads in between."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest

from service.usecases.turns import CpuTurns

T = TypeVar("T")


def _run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` with a deadline: a turn that leaked its lock fails the test instead of hanging the run."""
    return asyncio.run(asyncio.wait_for(main, 5))


@contextmanager
def _watched_socket(events: list[str]) -> Iterator[socket.socket]:
    """A socket pair whose reading end the running loop watches: each read is logged in ``events``."""
    loop = asyncio.get_running_loop()
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    loop.add_reader(reader.fileno(), lambda: events.append(f"read {reader.recv(16).decode()}"))
    try:
        yield writer
    finally:
        loop.remove_reader(reader.fileno())
        reader.close()
        writer.close()


def test_the_loop_reads_sockets_between_turns_and_callers_go_in_arrival_order() -> None:
    """Three calls ready at once: a socket that becomes readable during the first turn is read before the second
    turn starts (without turns, asyncio would run all three back to back and read the socket after them)."""
    events: list[str] = []

    async def main() -> None:
        turns = CpuTurns()
        with _watched_socket(events) as writer:

            async def call(name: str) -> None:
                async with turns.turn():
                    events.append(f"{name} start")
                    if name == "a":
                        writer.send(b"x")  # data arrives while the first call holds the CPU
                    events.append(f"{name} end")

            await asyncio.gather(call("a"), call("b"), call("c"))

    _run(main())
    assert events == ["a start", "a end", "read x", "b start", "b end", "c start", "c end"]


def test_without_turns_the_same_calls_run_back_to_back() -> None:
    """The behaviour the turns exist to change (so the test above can fail)."""
    events: list[str] = []

    async def main() -> None:
        with _watched_socket(events) as writer:

            async def call(name: str) -> None:
                events.append(f"{name} start")
                if name == "a":
                    writer.send(b"x")
                events.append(f"{name} end")

            await asyncio.gather(call("a"), call("b"), call("c"))
            await asyncio.sleep(0.01)

    _run(main())
    assert events.index("read x") > events.index("c end")


def test_a_paused_turn_lets_others_work_and_queues_again_behind_them() -> None:
    events: list[str] = []

    async def main() -> None:
        turns = CpuTurns()
        fetched = asyncio.Event()

        async def fallback() -> None:
            async with turns.turn() as turn:
                events.append("fallback parse")
                async with turn.paused():
                    await fetched.wait()  # the FHIR fetch
                events.append("fallback evaluate")

        async def prefetch(name: str) -> None:
            await asyncio.sleep(0)
            async with turns.turn():
                events.append(f"{name} evaluate")
                if name == "p1":
                    fetched.set()

        await asyncio.gather(fallback(), prefetch("p1"), prefetch("p2"))

    _run(main())
    # p2 was waiting before the fetch finished, so the fallback call queues behind it.
    assert events == ["fallback parse", "p1 evaluate", "p2 evaluate", "fallback evaluate"]


def test_errors_and_cancellation_leave_the_turns_usable() -> None:
    async def main() -> list[str]:
        turns = CpuTurns()
        with pytest.raises(ValueError):
            async with turns.turn():
                raise ValueError("evaluation failed")

        holder_in = asyncio.Event()
        release = asyncio.Event()

        async def holder() -> None:
            async with turns.turn():
                holder_in.set()
                await release.wait()

        async def paused_then_cancelled() -> None:
            async with turns.turn() as turn, turn.paused():
                await asyncio.sleep(0.05)  # the holder takes the turn meanwhile; cancelled while taking it back

        first = asyncio.create_task(paused_then_cancelled())
        await asyncio.sleep(0)
        second = asyncio.create_task(holder())
        await holder_in.wait()
        await asyncio.sleep(0.1)  # `first` is now waiting to take its turn back
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        release.set()
        await second
        done: list[str] = []
        async with turns.turn():
            done.append("still works")
        return done

    assert _run(main()) == ["still works"]


def test_an_error_while_paused_ends_the_call_without_waiting_for_the_turn() -> None:
    """A fallback fetch that fails (a 412) is answered at once, not after every call queued meanwhile."""

    async def main() -> list[str]:
        turns = CpuTurns()
        events: list[str] = []
        holder_in, release = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with turns.turn():
                holder_in.set()
                await release.wait()
                events.append("holder done")

        async def failing_fetch() -> None:
            async with turns.turn() as turn, turn.paused():
                await holder_in.wait()  # another call has the turn now
                raise LookupError("fhirServer unreachable")

        fetch = asyncio.create_task(failing_fetch())
        await asyncio.sleep(0)  # the fetch takes the turn and gives it up while it waits
        second = asyncio.create_task(holder())
        with pytest.raises(LookupError):
            await fetch
        events.append("failure answered")
        release.set()
        await second
        return events

    assert _run(main()) == ["failure answered", "holder done"]
