"""Credit goes where it can be used, and one bad message fails alone.

Credit a sender does not use must come back to the receiver's node: after
the sender was idle, and also while it keeps sending to the same node for
another namespace. Otherwise a sender blocks while a receiver has room.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import trio
import trio.testing
from _dp_harness import FAST, all_registered, open_cluster, settle

from trio_dchan.dataplane import Outcome

IDLE = FAST.credit_idle_return
# The first two tests need the consumer to free room before the sender's
# idle timer fires, so they run on the real clock (a virtual clock would
# jump to the timer whenever every task waits) with a longer idle time.
SLOW_IDLE = dataclasses.replace(FAST, credit_idle_return=0.3)


async def _wait_credit(tx: object, want: int) -> None:
    """Wait until the sending node holds ``want`` credit (its idle return)."""
    with trio.fail_after(10):
        while tx.statistics().credit != want:  # type: ignore[attr-defined]  # noqa: ASYNC110 - a statistic, no event
            await trio.sleep(0.01)


async def _granted(tx: object, want: int) -> None:
    """Wait until the receiver's node granted the sender ``want`` credit."""
    with trio.fail_after(5):
        while tx.statistics().credit < want:  # type: ignore[attr-defined]  # noqa: ASYNC110 - a statistic, no event
            await trio.sleep(0.001)


async def test_credit_not_yet_told_comes_back_with_an_idle_return() -> None:
    # A receiver with a buffer far larger than the credit window: credit
    # freed by the consumer waits on the receiving node for the next ack
    # while the sender still holds some. When the sender then goes idle
    # and returns what it holds, the waiting credit must be taken back too;
    # otherwise it stays counted as granted and the next WANT gets nothing.
    settings = dataclasses.replace(SLOW_IDLE, credit_window=40)
    async with open_cluster(2, settings=settings) as cluster:
        rx = cluster.planes["n1"].receive("ns", buffer=1000)
        await all_registered(rx)
        tx = cluster.planes["n0"].send("ns")
        with trio.fail_after(5):
            for i in range(30):  # of the 40 credits granted
                await tx.send(i)
            await settle()
            for i in range(10):  # frees a quarter of the window
                assert rx.receive_nowait() == i
            await settle()
        await _wait_credit(tx, 0)  # idle: the sender gave its credit back
        with trio.fail_after(5):
            for i in range(30, 30 + 40):
                await tx.send(i)
            await tx.aclose()
            received = [rx.receive_nowait() for _ in range(60)]
        assert received == list(range(10, 70))
        assert rx.statistics().current_buffer_used == 0


async def test_credit_waiting_for_an_ack_reaches_a_sender_that_asks() -> None:
    # The default window and a large buffer, with a consumer waiting in
    # receive(): the sender must get credit again after its idle return.
    async with open_cluster(2, settings=SLOW_IDLE) as cluster:
        rx = cluster.planes["n1"].receive("ns", buffer=4096)
        await all_registered(rx)
        tx = cluster.planes["n0"].send("ns")
        with trio.fail_after(5):
            for i in range(700):
                await tx.send(i)
            await settle()
            for i in range(256):
                assert rx.receive_nowait() == i
            await settle()
        await _wait_credit(tx, 0)
        got: list[int] = []
        all_in = trio.Event()

        async def consume() -> None:
            async for value in rx:
                got.append(value)
                if len(got) == 700 + 1024 - 256:
                    all_in.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            with trio.fail_after(5):
                for i in range(700, 700 + 1024):
                    await tx.send(i)
                await tx.aclose()
                await all_in.wait()
            nursery.cancel_scope.cancel()
        assert got == list(range(256, 700 + 1024))


async def test_credit_unused_for_one_namespace_returns_while_another_keeps_sending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # n0 sent into "x" once and keeps sending into "y" to the same node:
    # its "x" credit must still come back, so that n2 can send into "x".
    async with open_cluster(3) as cluster:
        rx_x = cluster.planes["n1"].receive("x", buffer=8)
        rx_y = cluster.planes["n1"].receive("y", buffer=8)
        await all_registered(rx_x, rx_y)
        a_x = cluster.planes["n0"].send("x")
        a_y = cluster.planes["n0"].send("y")
        await a_x.send("from n0")
        with trio.fail_after(5):
            assert await rx_x.receive() == "from n0"
        await settle()
        c_x = cluster.planes["n2"].send("x")
        got_x: list[str] = []
        arrived = trio.Event()
        async with trio.open_nursery() as nursery:

            async def keep_sending_y() -> None:
                i = 0
                while True:
                    await a_y.send(i)
                    i += 1
                    await trio.sleep(IDLE / 5)

            async def drain_y() -> None:
                async for _ in rx_y:
                    pass

            async def drain_x() -> None:
                async for value in rx_x:
                    got_x.append(value)
                    arrived.set()

            nursery.start_soon(keep_sending_y)
            nursery.start_soon(drain_y)
            nursery.start_soon(drain_x)
            # Within two sweeps of n0's pump (one idle interval each), n0
            # gives its "x" credit back and n1 grants it to n2.
            with trio.fail_after(3 * IDLE):
                await c_x.send("from n2")
                await arrived.wait()
            nursery.cancel_scope.cancel()
        assert got_x == ["from n2"]
        assert a_x.statistics().credit == 0


async def test_two_tasks_closing_one_send_channel_both_return() -> None:
    async with open_cluster(2) as cluster:
        rx = cluster.planes["n1"].receive("ns", buffer=4)
        await all_registered(rx)
        tx = cluster.planes["n0"].send("ns")
        for i in range(4):
            await tx.send(i)  # accepted, not yet acknowledged
        closed: list[int] = []

        async def close(k: int) -> None:
            await tx.aclose()
            closed.append(k)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(close, 1)
                nursery.start_soon(close, 2)
        assert sorted(closed) == [1, 2]
        assert tx.statistics().delivered == 4
        assert [rx.receive_nowait() for _ in range(4)] == [0, 1, 2, 3]


def _nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth - 1):
        value = [value]
    return value


async def test_a_message_the_receiver_cannot_decode_fails_alone() -> None:
    # Nested deeper than the decoder's limit: it encodes, but the receiving
    # node refuses it. It travels in one batch with good messages, which
    # must be delivered all the same, in order.
    too_deep = _nested(100)
    async with open_cluster(2) as cluster:
        rx = cluster.planes["n1"].receive("ns", buffer=64)
        await all_registered(rx)
        tx = cluster.planes["n0"].send("ns")
        await _granted(tx, 13)
        with trio.fail_after(5):
            for i in range(10):
                tx.send_nowait(i)  # no checkpoint: one batch
            bad = await tx.send_tracked(too_deep)
            tx.send_nowait("after")
            tracked = await tx.send_tracked("last")
            assert not await bad.delivered()
            assert await tracked.delivered()
            await tx.aclose()
        assert bad.outcome is Outcome.REFUSED
        assert [rx.receive_nowait() for _ in range(12)] == [*range(10), "after", "last"]
        stats = tx.statistics()
        assert (stats.delivered, stats.failed) == (12, 1)
        # Its credit was not lost: the buffer's room is whole again.
        assert rx.statistics().current_buffer_used == 0


async def test_item_dense_messages_are_delivered_in_one_batch() -> None:
    # Each message holds 2,001 CBOR items (a list of 2,000 ids); 600 of
    # them in one frame exceed the per-buffer item limit, which applies to
    # each message of a batch instead.
    value = [1000] * 2000
    async with open_cluster(2) as cluster:
        rx = cluster.planes["n1"].receive("ns", buffer=1024)
        await all_registered(rx)
        tx = cluster.planes["n0"].send("ns")
        await _granted(tx, 601)
        with trio.fail_after(20):
            for _ in range(600):
                tx.send_nowait(value)
            receipt = await tx.send_tracked(value)
            assert await receipt.delivered()
            await tx.aclose()
        stats = tx.statistics()
        assert (stats.delivered, stats.failed) == (601, 0)
        assert [rx.receive_nowait() for _ in range(601)] == [value] * 601


class _LaggingRegistry:
    """The Registry as a node sees it, with routing a few scheduler passes late."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry

    @property
    def version(self) -> int:
        return int(self._registry.version)

    def receivers(self, namespace: str) -> Any:
        return self._registry.receivers(namespace)

    async def wait_changed(self, since_version: int) -> int:
        version = int(await self._registry.wait_changed(since_version))
        for _ in range(5):
            await trio.lowlevel.checkpoint()
        return version


async def test_a_hand_off_is_not_routed_back_and_keeps_its_deadline() -> None:
    # A closing receiver's buffered messages go to other receivers, or fail
    # after handoff_timeout. While this node's routing still lists the
    # closing receiver (with credit), they must not be sent back to it:
    # refused there, they would wait undeliverable_timeout instead.
    settings = dataclasses.replace(FAST, handoff_timeout=0.2, undeliverable_timeout=30.0)
    async with open_cluster(1, settings=settings) as cluster:
        plane = cluster.planes["n0"]
        rx = plane.receive("h", buffer=8)
        await all_registered(rx)
        plane.registry = _LaggingRegistry(cluster.registry)
        # One more change, so that routing waits through the lagging view.
        await all_registered(plane.receive("unrelated"))
        tx = plane.send("h")
        with trio.fail_after(5):
            for i in range(4):
                await tx.send(i)  # the node keeps 4 more credits for rx
            await settle()
        assert rx.statistics().current_buffer_used == 4
        start = trio.current_time()
        with trio.fail_after(5):
            await rx.aclose()
        assert trio.current_time() - start < 5 * settings.handoff_timeout
        stats = rx.statistics()
        assert (stats.handed_off, stats.dropped) == (0, 4)
        assert tx.statistics().retried == 0
        await tx.aclose()
