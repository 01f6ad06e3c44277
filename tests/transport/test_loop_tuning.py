"""The trio-asyncio loop as the transport tunes it: socket callbacks keep asyncio's order."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio_asyncio

from trio_dchan.transport._grpc import tune_loop


@pytest.fixture
async def loop() -> AsyncIterator[Any]:
    async with trio_asyncio.open_loop() as loop:
        tune_loop(loop)
        yield loop


class _Log(list[Any]):
    """What callbacks did, in order; a test task can wait for entries."""

    def __init__(self) -> None:
        super().__init__()
        self._grew = trio.Event()

    def add(self, entry: Any) -> None:
        self.append(entry)
        self._grew.set()

    async def wait_len(self, n: int) -> None:
        with trio.fail_after(5):
            while len(self) < n:
                self._grew = trio.Event()
                await self._grew.wait()


async def test_callbacks_queued_by_a_read_run_before_the_next_read(loop: Any) -> None:
    a, b = socket.socketpair()
    events = _Log()
    count = 30

    def on_readable() -> None:
        i = a.recv(1)[0]
        events.add(f"read {i}")
        # Queued from a socket callback, as grpclib's futures are: it must
        # run before the callback of the next byte, which is readable at
        # once (without the wait, the two race and the read often wins).
        loop.call_soon(events.add, f"after {i}")
        if i + 1 < count:
            b.send(bytes([i + 1]))

    with a, b:
        a.setblocking(False)
        loop.add_reader(a.fileno(), on_readable)
        try:
            b.send(b"\x00")
            await events.wait_len(2 * count)
        finally:
            loop.remove_reader(a.fileno())
    assert events == [e for i in range(count) for e in (f"read {i}", f"after {i}")]


async def test_a_read_that_queues_nothing_costs_no_asyncio_round(
    loop: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = socket.socketpair()
    reads = _Log()
    rounds = 0
    synchronize = loop.synchronize

    async def counting_synchronize() -> None:
        nonlocal rounds
        rounds += 1
        await synchronize()

    monkeypatch.setattr(loop, "synchronize", counting_synchronize)
    with a, b:
        a.setblocking(False)
        loop.add_reader(a.fileno(), lambda: reads.add(a.recv(16)))
        try:
            for i in range(20):
                b.send(bytes([i]))
                await reads.wait_len(i + 1)
        finally:
            loop.remove_reader(a.fileno())
    assert b"".join(reads) == bytes(range(20))
    assert rounds == 0


async def test_a_failing_callback_is_reported_and_the_reader_goes_on(loop: Any) -> None:
    a, b = socket.socketpair()
    seen = _Log()
    reads = _Log()
    loop.set_exception_handler(lambda _loop, context: seen.add(context["exception"]))

    def on_readable() -> None:
        data = a.recv(1)
        reads.add(data)
        if data == b"x":
            raise ValueError("broken reader")

    with a, b:
        a.setblocking(False)
        loop.add_reader(a.fileno(), on_readable)
        try:
            b.send(b"x")
            await seen.wait_len(1)
            b.send(b"y")
            await reads.wait_len(2)
        finally:
            loop.remove_reader(a.fileno())
    assert isinstance(seen[0], ValueError)
    assert reads == [b"x", b"y"]
