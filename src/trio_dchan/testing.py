"""A conformance suite for channel pairs, in the spirit of ``trio.testing``'s stream checks.

:func:`check_channel_pair` runs every check against a maker of connected
``(send_channel, receive_channel)`` pairs. It holds for Trio's own memory
channels (which is how the suite itself is tested) and for the distributed
channels, whether both ends live on one node or on two. The checks are the
rules a Trio user relies on:

* values arrive once each, in order for one sender and one receiver;
* a receiver's ``buffer`` is exactly how many values can wait for it: that
  many ``send()`` calls complete with nobody receiving, the next one blocks
  until a ``receive()`` makes room (``send_nowait`` raises ``WouldBlock``);
* cancellation is atomic: a cancelled ``send()`` sent nothing, a cancelled
  ``receive()`` took nothing;
* ``clone()`` and close rules: closing one clone leaves the others working,
  using a closed channel raises :class:`trio.ClosedResourceError`, closing a
  channel wakes its own blocked tasks with it, closing twice is fine;
* many senders and many receivers over clones: every value exactly once;
* ``statistics()`` returns an immutable snapshot whose
  ``current_buffer_used`` counts what waits in the receiver's buffer.

Across a cluster "every sender closed" cannot be known, so ending the
receiver with :class:`trio.EndOfChannel` when all send clones close is
checked only when ``ends_when_senders_close`` is true.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio
import trio.testing

__all__ = ["ChannelPairMaker", "check_channel_pair"]

#: ``open_pair(buffer)``: an async context manager yielding a connected
#: ``(send_channel, receive_channel)`` whose receiver holds ``buffer`` values.
#: The receiver must be ready (registered) when it is yielded.
#: The channels are typed ``Any`` because the suite also uses the memory-channel
#: extras (``send_nowait``, ``receive_nowait``, ``clone``, ``statistics``).
ChannelPairMaker = Callable[[int], AbstractAsyncContextManager[tuple[Any, Any]]]

_STEP = 10.0  # seconds any single expected event may take; a failure, never a pass


class ConformanceError(AssertionError):
    """A channel pair broke one of the rules the suite checks."""


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ConformanceError(message)


async def _default_settle() -> None:
    await trio.testing.wait_all_tasks_blocked(cushion=0.001)


_settle_hook: list[Callable[[], Awaitable[None]]] = [_default_settle]


async def _settle() -> None:
    """Wait until nothing is in transit (so "still blocked" means blocked for good)."""
    with trio.fail_after(_STEP):
        await _settle_hook[0]()


async def _receive_n(rx: Any, n: int) -> list[Any]:
    out = []
    with trio.fail_after(_STEP):
        for _ in range(n):
            out.append(await rx.receive())
    return out


async def check_send_receive_order(open_pair: ChannelPairMaker) -> None:
    async with open_pair(0) as (tx, rx):
        got: list[Any] = []

        async def consume() -> None:
            got.extend(await _receive_n(rx, 50))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            with trio.fail_after(_STEP):
                for i in range(50):
                    await tx.send(i)
        _expect(got == list(range(50)), f"rendezvous pair reordered or lost values: {got}")
    async with open_pair(10) as (tx, rx):
        with trio.fail_after(_STEP):
            for i in range(10):
                await tx.send({"n": i})
        got = await _receive_n(rx, 10)
        _expect(got == [{"n": i} for i in range(10)], f"buffered values came back as {got}")


async def check_buffer_and_backpressure(open_pair: ChannelPairMaker) -> None:
    async with open_pair(2) as (tx, rx):
        try:
            rx.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            raise ConformanceError("receive_nowait() on an empty channel did not raise WouldBlock")
        with trio.fail_after(_STEP):
            await tx.send("a")
            await tx.send("b")
        done = trio.Event()

        async def third() -> None:
            await tx.send("c")
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await _settle()
            _expect(not done.is_set(), "send() completed although the receiver's buffer was full")
            try:
                tx.send_nowait("x")
            except trio.WouldBlock:
                pass
            else:
                raise ConformanceError("send_nowait() on a full channel did not raise WouldBlock")
            _expect(
                rx.statistics().current_buffer_used == 2,
                "statistics().current_buffer_used does not count the buffered values",
            )
            first = await _receive_n(rx, 1)
            with trio.fail_after(_STEP):
                await done.wait()
        rest = await _receive_n(rx, 2)
        _expect(first + rest == ["a", "b", "c"], f"values came back as {first + rest}")


async def check_cancel_atomic(open_pair: ChannelPairMaker) -> None:
    async with open_pair(1) as (tx, rx):
        with trio.fail_after(_STEP):
            await tx.send("kept")
        with trio.move_on_after(0) as scope:
            await tx.send("cancelled-at-once")
        _expect(scope.cancelled_caught, "send() into a full channel was not cancellable")
        async with trio.open_nursery() as nursery:

            async def blocked_send() -> None:
                with trio.CancelScope() as cs:
                    cancel_scopes.append(cs)
                    await tx.send("cancelled-while-blocked")

            cancel_scopes: list[trio.CancelScope] = []
            nursery.start_soon(blocked_send)
            await _settle()
            cancel_scopes[0].cancel()
        got = await _receive_n(rx, 1)
        with trio.fail_after(_STEP):
            await tx.send("after")
        got += await _receive_n(rx, 1)
        _expect(got == ["kept", "after"], f"a cancelled send() delivered its value: {got}")
        # A cancelled receive() takes nothing.
        async with trio.open_nursery() as nursery:
            scopes: list[trio.CancelScope] = []

            async def blocked_receive() -> None:
                with trio.CancelScope() as cs:
                    scopes.append(cs)
                    await rx.receive()
                    raise ConformanceError("receive() returned with nothing sent")

            nursery.start_soon(blocked_receive)
            await _settle()
            scopes[0].cancel()
        with trio.fail_after(_STEP):
            await tx.send("survivor")
        got = await _receive_n(rx, 1)
        _expect(got == ["survivor"], f"a cancelled receive() swallowed a value: {got}")


async def check_clone_and_close(open_pair: ChannelPairMaker) -> None:
    async with open_pair(4) as (tx, rx):
        tx2 = tx.clone()
        rx2 = rx.clone()
        await tx2.aclose()
        await tx2.aclose()  # closing twice is fine
        for call in (lambda: tx2.send_nowait(1), tx2.clone):
            try:
                call()
            except trio.ClosedResourceError:
                pass
            else:
                raise ConformanceError("a closed send channel accepted a call")
        try:
            await tx2.send(1)
        except trio.ClosedResourceError:
            pass
        else:
            raise ConformanceError("send() on a closed send channel did not raise")
        with trio.fail_after(_STEP):
            await tx.send("via original")  # the original still works
        got = await _receive_n(rx2, 1)
        _expect(got == ["via original"], f"a clone received {got}")
        # Closing a receive clone wakes its own blocked receive() with ClosedResourceError.
        outcome: list[BaseException] = []

        async def blocked_receive() -> None:
            try:
                await rx2.receive()
            except trio.ClosedResourceError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_receive)
            await _settle()
            with trio.fail_after(_STEP):
                await rx2.aclose()
        _expect(len(outcome) == 1, "closing a receive channel did not wake its blocked receive()")
        for rcall in (rx2.receive_nowait, rx2.clone):
            try:
                rcall()
            except trio.ClosedResourceError:
                pass
            else:
                raise ConformanceError("a closed receive channel accepted a call")
        try:
            await rx2.receive()
        except trio.ClosedResourceError:
            pass
        else:
            raise ConformanceError("receive() on a closed receive channel did not raise")
        with trio.fail_after(_STEP):
            await tx.send("still works")
        _expect(await _receive_n(rx, 1) == ["still works"], "the original receiver broke")
        # Closing a send clone wakes its own blocked send() with ClosedResourceError.
        tx3 = tx.clone()
        with trio.fail_after(_STEP):
            for i in range(4):
                await tx.send(i)
        send_outcome: list[BaseException] = []

        async def blocked_send() -> None:
            try:
                await tx3.send("never")
            except trio.ClosedResourceError as exc:
                send_outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_send)
            await _settle()
            with trio.fail_after(_STEP):
                await tx3.aclose()
        _expect(len(send_outcome) == 1, "closing a send channel did not wake its blocked send()")
        got = await _receive_n(rx, 4)
        _expect(got == [0, 1, 2, 3], f"values came back as {got}")
        try:
            rx.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            raise ConformanceError("the value of a send() woken by close was delivered")


async def check_many_to_many(open_pair: ChannelPairMaker) -> None:
    async with open_pair(8) as (tx, rx):
        senders = [tx.clone() for _ in range(3)]
        receivers = [rx.clone() for _ in range(2)]
        got: list[Any] = []
        total = 3 * 200

        async def produce(ch: trio.abc.SendChannel[Any], k: int) -> None:
            async with ch:
                for i in range(200):
                    await ch.send((k, i))

        all_in = trio.Event()

        async def consume(ch: trio.abc.ReceiveChannel[Any]) -> None:
            while True:
                got.append(await ch.receive())
                if len(got) == total:
                    all_in.set()

        with trio.fail_after(_STEP * 3):
            async with trio.open_nursery() as nursery:
                for ch in receivers:
                    nursery.start_soon(consume, ch)
                async with trio.open_nursery() as producers:
                    for k, ch in enumerate(senders):
                        producers.start_soon(produce, ch, k)
                await all_in.wait()
                await _settle()
                nursery.cancel_scope.cancel()
        _expect(len(got) == total, f"{len(got)} values received, {total} sent")
        _expect(
            sorted(got) == [(k, i) for k in range(3) for i in range(200)],
            "values were lost or duplicated",
        )
        for ch in receivers:
            await ch.aclose()


async def check_statistics(open_pair: ChannelPairMaker) -> None:
    async with open_pair(3) as (tx, rx):
        with trio.fail_after(_STEP):
            await tx.send(1)
        await _settle()  # across a network the value lands a moment after send() returns
        for stats in (tx.statistics(), rx.statistics()):
            field = next(iter(_fields(stats)))
            try:
                setattr(stats, field, 0)
            except (AttributeError, TypeError, dataclasses.FrozenInstanceError):
                pass
            else:
                raise ConformanceError(f"{type(stats).__name__} is not immutable")
        _expect(rx.statistics().current_buffer_used == 1, "current_buffer_used is wrong")
        await _receive_n(rx, 1)
        _expect(rx.statistics().current_buffer_used == 0, "current_buffer_used is wrong")


def _fields(stats: object) -> list[str]:
    if dataclasses.is_dataclass(stats):
        return [f.name for f in dataclasses.fields(stats)]
    attrs_fields = getattr(type(stats), "__attrs_attrs__", None)
    if attrs_fields is not None:
        return [a.name for a in attrs_fields]
    raise ConformanceError(f"statistics() returned a {type(stats).__name__}, not a record")


async def check_end_of_channel(open_pair: ChannelPairMaker) -> None:
    async with open_pair(2) as (tx, rx):
        tx2 = tx.clone()
        await tx.send("last")
        await tx.aclose()
        got = await _receive_n(rx, 1)
        _expect(got == ["last"], "the buffered value was lost")
        await tx2.aclose()
        with trio.fail_after(_STEP):
            try:
                await rx.receive()
            except trio.EndOfChannel:
                pass
            else:
                raise ConformanceError("receive() did not raise EndOfChannel")


async def check_channel_pair(
    open_pair: ChannelPairMaker,
    *,
    ends_when_senders_close: bool = True,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run every check of the suite against ``open_pair``; raise on the first failure.

    ``settle()`` must return once nothing is in transit between the two ends
    (every value a ``send()`` accepted is in the receiver's buffer or taken,
    and every grant of room has reached the sender). The default waits until
    every task is blocked, which is enough when the ends talk through memory;
    over a real network pass something that knows, e.g. waiting until the
    sending node has every message acknowledged.
    """
    _settle_hook[0] = settle if settle is not None else _default_settle
    try:
        await _run_checks(open_pair, ends_when_senders_close)
    finally:
        _settle_hook[0] = _default_settle


async def _run_checks(open_pair: ChannelPairMaker, ends_when_senders_close: bool) -> None:
    await check_send_receive_order(open_pair)
    await check_buffer_and_backpressure(open_pair)
    await check_cancel_atomic(open_pair)
    await check_clone_and_close(open_pair)
    await check_many_to_many(open_pair)
    await check_statistics(open_pair)
    if ends_when_senders_close:
        await check_end_of_channel(open_pair)
