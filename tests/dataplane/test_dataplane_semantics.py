"""Delivery semantics of distributed channels: routing, backpressure, closing, receipts."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from _dp_harness import FAST, all_registered, open_cluster, settle

from trio_dchan.codec import EncodeError
from trio_dchan.dataplane import (
    DataPlaneSettings,
    DistributedReceiveChannel,
    MessageTooLargeError,
    Outcome,
)


async def test_many_to_many_exactly_once_with_fair_shares() -> None:
    total = 10_000
    async with open_cluster(3, seed=7) as cluster:
        receivers = [cluster.planes[f"n{i}"].receive("orders", buffer=32) for i in range(3)]
        await all_registered(*receivers)
        senders = [cluster.planes[n].send("orders") for n in ("n0", "n1")]
        got: dict[str, list[Any]] = {r.receiver_id: [] for r in receivers}
        receipts: list[Any] = []
        received = 0
        all_in = trio.Event()

        async def consume(rx: DistributedReceiveChannel) -> None:
            nonlocal received
            async for value in rx:
                got[rx.receiver_id].append(value)
                received += 1
                if received == total:
                    all_in.set()

        async def produce(k: int) -> None:
            tx = senders[k]
            async with tx:
                for i in range(total // 2):
                    if i % 10 == 0:
                        receipts.append(await tx.send_tracked((k, i), timeout=30))
                    else:
                        await tx.send((k, i))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for rx in receivers:
                    nursery.start_soon(consume, rx)
                async with trio.open_nursery() as producers:
                    producers.start_soon(produce, 0)
                    producers.start_soon(produce, 1)
                await all_in.wait()
                nursery.cancel_scope.cancel()

        everything = [v for values in got.values() for v in values]
        assert len(everything) == total
        assert set(everything) == {(k, i) for k in range(2) for i in range(total // 2)}
        for values in got.values():
            # Round-robin among receivers with credit: equal consumers get equal shares.
            assert 0.25 * total <= len(values) <= 0.42 * total, [len(v) for v in got.values()]
            # Per (sending node, receiving node) the order of one send channel is kept.
            for k in range(2):
                mine = [i for kk, i in values if kk == k]
                assert mine == sorted(mine)
        assert len(receipts) == total // 10
        for receipt in receipts:
            assert await receipt.delivered() is True
            assert receipt.outcome is Outcome.DELIVERED
        where = {(k, i): rid for rid, values in got.items() for (k, i) in values}
        assert all(r.receiver_id in got for r in receipts)
        assert Counter(where.values()) == Counter({rid: len(v) for rid, v in got.items()})


async def test_backpressure_is_bounded_and_another_receiver_unblocks() -> None:
    settings = dataclasses.replace(FAST, credit_window=16)
    async with open_cluster(3, settings=settings) as cluster:
        stuck = cluster.planes["n1"].receive("jobs", buffer=8)  # never reads
        await all_registered(stuck)
        tx = cluster.planes["n0"].send("jobs")
        accepted = 0
        offered = 200

        async def produce() -> None:
            nonlocal accepted
            for i in range(offered):
                await tx.send(i)
                accepted += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            await settle()
            # Only the receiver's free space was granted: exactly its buffer.
            assert accepted == 8
            stats = tx.statistics()
            assert stats.tasks_waiting_send == 1
            assert stats.queued + stats.in_flight == 0
            assert stuck.statistics().current_buffer_used == 8
            assert cluster.planes["n0"].statistics()["jobs"].queued == 0
            # A second receiver registering unblocks the sender.
            other = cluster.planes["n2"].receive("jobs", buffer=4)
            seen: list[int] = []
            with trio.fail_after(10):
                async for value in other:
                    seen.append(value)
                    if len(seen) == offered - 8:
                        break
            assert sorted(seen) == list(range(8, offered))
        assert accepted == offered
        assert stuck.statistics().current_buffer_used == 8
        assert [stuck.receive_nowait() for _ in range(8)] == list(range(8))
        await other.aclose()
        await stuck.aclose()
        await tx.aclose()


async def test_no_receiver_blocks_send_until_one_registers() -> None:
    async with open_cluster(2) as cluster:
        tx = cluster.planes["n0"].send("later")
        with trio.move_on_after(0.05) as scope:
            await tx.send("x")
        assert scope.cancelled_caught
        assert tx.statistics().outstanding == 0  # the cancelled send left nothing behind
        with pytest.raises(trio.WouldBlock):
            tx.send_nowait("y")
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def send_one() -> None:
                await tx.send("z")
                done.set()

            nursery.start_soon(send_one)
            await settle()
            assert not done.is_set()
            rx = cluster.planes["n1"].receive("later")
            with trio.fail_after(5):
                assert await rx.receive() == "z"
                await done.wait()
        await tx.aclose()
        await rx.aclose()


async def test_sender_buffer_accepts_without_credit_and_aclose_waits_for_drain() -> None:
    async with open_cluster(2) as cluster:
        rx = cluster.planes["n1"].receive("drain", buffer=5)
        await all_registered(rx)
        tx = cluster.planes["n0"].send("drain", buffer=50)
        with trio.fail_after(5):
            for i in range(55):  # 5 against credit, 50 wait in the sender's buffer
                await tx.send(i)
        with pytest.raises(trio.WouldBlock):
            tx.send_nowait("full")
        closed = trio.Event()

        async def close() -> None:
            await tx.aclose()
            closed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close)
            await settle()
            assert not closed.is_set()  # 50 accepted messages are not delivered yet
            assert tx.statistics().outstanding == 50
            got = []
            with trio.fail_after(10):
                while len(got) < 55:
                    got.append(await rx.receive())
                await closed.wait()
        assert got == list(range(55))
        assert tx.statistics().delivered == 55
        with pytest.raises(trio.ClosedResourceError):
            await tx.send(1)
        await rx.aclose()


async def test_receiver_close_hands_buffer_to_another_receiver() -> None:
    async with open_cluster(3) as cluster:
        first = cluster.planes["n1"].receive("work", buffer=10)
        await all_registered(first)
        tx = cluster.planes["n0"].send("work")
        with trio.fail_after(5):
            for i in range(10):
                await tx.send(i)
        await settle()
        assert first.statistics().current_buffer_used == 10
        second = cluster.planes["n2"].receive("work", buffer=20)
        await all_registered(second)
        with trio.fail_after(10):
            await first.aclose()
        # Unregistration committed before aclose returned, and the buffer moved over.
        assert all(r.receiver_id != first.receiver_id for r in cluster.registry.receivers("work"))
        stats = first.statistics()
        assert (stats.handed_off, stats.dropped) == (10, 0)
        await settle()
        assert second.statistics().current_buffer_used == 10
        got = [second.receive_nowait() for _ in range(10)]
        assert sorted(got) == list(range(10))
        # New sends go to the remaining receiver.
        with trio.fail_after(5):
            await tx.send("after")
            assert await second.receive() == "after"
        with pytest.raises(trio.ClosedResourceError):
            first.receive_nowait()
        await tx.aclose()
        await second.aclose()


async def test_receiver_close_with_nobody_else_drops_after_the_handoff_timeout() -> None:
    settings = dataclasses.replace(FAST, handoff_timeout=0.2)
    async with open_cluster(2, settings=settings) as cluster:
        rx = cluster.planes["n1"].receive("lonely", buffer=4)
        await all_registered(rx)
        tx = cluster.planes["n0"].send("lonely")
        with trio.fail_after(5):
            for i in range(4):
                await tx.send(i)
        await settle()
        with trio.fail_after(10):
            await rx.aclose()
        assert (rx.statistics().handed_off, rx.statistics().dropped) == (0, 4)
        # The senders were told "delivered": the messages reached a buffer.
        assert tx.statistics().delivered == 4
        await tx.aclose()


async def test_messages_in_flight_to_a_closing_receiver_are_retried_elsewhere() -> None:
    async with open_cluster(3, seed=3) as cluster:
        a = cluster.planes["n1"].receive("move", buffer=64)
        b = cluster.planes["n2"].receive("move", buffer=64)
        await all_registered(a, b)
        tx = cluster.planes["n0"].send("move")
        got: list[int] = []
        total = 2000
        all_in = trio.Event()
        a_busy = trio.Event()

        async def consume(rx: DistributedReceiveChannel) -> None:
            async for value in rx:
                got.append(value)
                if len(got) == total:
                    all_in.set()

        async def consume_a_for_a_while() -> None:
            for _ in range(50):
                got.append(await a.receive())
            a_busy.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume, b)
            nursery.start_soon(consume_a_for_a_while)

            async def produce() -> None:
                for i in range(total):
                    await tx.send(i)

            nursery.start_soon(produce)
            # Close `a` while messages stream towards it; none may be lost or doubled.
            with trio.fail_after(10):
                await a_busy.wait()
                await a.aclose()
                await all_in.wait()
            nursery.cancel_scope.cancel()
        assert sorted(got) == list(range(total))
        assert tx.statistics().failed == 0


async def test_tracked_sends() -> None:
    async with open_cluster(2) as cluster:
        tx = cluster.planes["n0"].send("track")
        receipt = await tx.send_tracked("nobody", timeout=0.05)
        assert await receipt.delivered() is False
        assert receipt.outcome is Outcome.NO_RECEIVER
        rx = cluster.planes["n1"].receive("track", buffer=1)
        await all_registered(rx)
        receipt = await tx.send_tracked("one", timeout=5)
        assert await receipt.delivered() is True
        assert receipt.receiver_id == rx.receiver_id
        full = await tx.send_tracked("full", timeout=0.05)  # buffer holds "one"
        assert await full.delivered() is False
        assert full.outcome is Outcome.TIMED_OUT
        assert [rx.receive_nowait()] == ["one"]
        with pytest.raises(trio.WouldBlock):
            rx.receive_nowait()
        await tx.aclose()
        await rx.aclose()


async def test_a_held_message_times_out_at_its_own_deadline() -> None:
    # Messages held in a send channel's buffer wait with the deadline of their
    # receipt, or undeliverable_timeout. One with an earlier deadline than
    # those already waiting must fail at that deadline, not at theirs.
    settings = dataclasses.replace(FAST, undeliverable_timeout=60.0)
    async with open_cluster(2, settings=settings) as cluster:
        rx = cluster.planes["n1"].receive("held", buffer=0)
        await all_registered(rx)
        tx = cluster.planes["n0"].send("held", buffer=4)
        for i in range(3):
            tx.send_nowait(i)  # nobody waits in receive(): held, 60 s deadlines
        assert tx.statistics().queued == 3
        with trio.fail_after(10):
            receipt = await tx.send_tracked("soon", timeout=0.2)
            assert receipt.outcome is Outcome.PENDING
            assert await receipt.delivered() is False
        assert receipt.outcome is Outcome.TIMED_OUT
        assert tx.statistics().queued == 3
        got = [await rx.receive() for _ in range(3)]
        assert got == [0, 1, 2]
        await tx.aclose()
        await rx.aclose()


async def test_a_delivered_message_never_reports_false() -> None:
    # Short deadlines racing a slow consumer: every receipt must agree with
    # what was actually received.
    async with open_cluster(2, seed=11) as cluster:
        rx = cluster.planes["n1"].receive("race", buffer=2)
        await all_registered(rx)
        tx = cluster.planes["n0"].send("race", buffer=3)
        receipts = {}
        received: list[int] = []
        target = [-1]
        drained = trio.Event()

        async def consume() -> None:
            async for value in rx:
                received.append(value)
                if len(received) == target[0]:
                    drained.set()
                await trio.sleep(0.002)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            for i in range(150):
                receipts[i] = await tx.send_tracked(i, timeout=0.004 * (i % 5))
            with trio.fail_after(10):
                await tx.aclose()
                # Delivered means "in the buffer": let the consumer drain it.
                target[0] = tx.statistics().delivered
                if len(received) < target[0]:
                    await drained.wait()
            nursery.cancel_scope.cancel()
        delivered = {i for i, r in receipts.items() if r.outcome is Outcome.DELIVERED}
        failed = {i for i, r in receipts.items() if r.outcome is not Outcome.DELIVERED}
        assert all(r.done() for r in receipts.values())
        assert delivered == set(received)
        assert not failed & set(received)
        assert delivered
        assert failed
        for i in failed:
            assert receipts[i].outcome in (Outcome.TIMED_OUT, Outcome.NO_RECEIVER)
            assert await receipts[i].delivered() is False


async def test_encode_errors_and_oversized_messages_raise_at_send() -> None:
    settings = DataPlaneSettings(max_frame_bytes=16 * 1024, retry_backoff_min=0.01)
    async with open_cluster(2, settings=settings) as cluster:
        rx = cluster.planes["n1"].receive("sizes", buffer=4)
        await all_registered(rx)
        tx = cluster.planes["n0"].send("sizes")
        with pytest.raises(EncodeError):
            await tx.send(object())
        with pytest.raises(MessageTooLargeError, match="max_frame_bytes"):
            await tx.send(b"x" * 16 * 1024)
        with pytest.raises(MessageTooLargeError):
            tx.send_nowait(b"x" * 16 * 1024)
        assert tx.statistics().outstanding == 0
        biggest = b"y" * (cluster.planes["n0"].max_message_bytes - 16)
        with trio.fail_after(5):
            await tx.send(biggest)
            assert await rx.receive() == biggest
        await tx.aclose()
        await rx.aclose()


async def test_local_receiver_is_served_by_the_same_rules() -> None:
    async with open_cluster(1) as cluster:
        plane = cluster.planes["n0"]
        rx = plane.receive("here", buffer=3)
        await all_registered(rx)
        tx = plane.send("here")
        with trio.fail_after(5):
            for i in range(3):
                await tx.send(i)
        with trio.move_on_after(0.05) as scope:
            await tx.send("blocked")
        assert scope.cancelled_caught
        await settle()
        assert [rx.receive_nowait() for _ in range(3)] == [0, 1, 2]
        await tx.aclose()
        await rx.aclose()


async def test_data_plane_close_breaks_senders_and_ends_receivers() -> None:
    async with open_cluster(2) as cluster:
        plane = cluster.planes["n0"]
        rx = plane.receive("bye")
        await all_registered(rx)
        tx = plane.send("nobody-here")
        results: list[BaseException] = []

        async def blocked_send() -> None:
            try:
                await tx.send(1)
            except trio.BrokenResourceError as exc:
                results.append(exc)

        async def blocked_receive() -> None:
            try:
                await rx.receive()
            except trio.EndOfChannel as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_send)
            nursery.start_soon(blocked_receive)
            await settle()
            with trio.fail_after(10):
                await plane.aclose()
        assert sorted(type(e).__name__ for e in results) == [
            "BrokenResourceError",
            "EndOfChannel",
        ]
        assert cluster.registry.receivers("bye") == ()
        with pytest.raises(trio.BrokenResourceError):
            plane.send("x")
        with pytest.raises(trio.EndOfChannel):
            rx.receive_nowait()


async def test_cancelled_tracked_send_sends_nothing_and_statistics_add_up() -> None:
    async with open_cluster(2) as cluster:
        rx = cluster.planes["n1"].receive("stats", buffer=1)
        await all_registered(rx)
        with cluster.planes["n0"].send("stats") as tx:
            first = await tx.send_tracked("a", timeout=5)
            with trio.move_on_after(0.02) as scope:
                await tx.send_tracked("b")  # no room, no timeout: only the scope ends it
            assert scope.cancelled_caught
            assert await first.delivered() is True
        assert tx.statistics().outstanding == 0
        await settle()
        assert rx.receive_nowait() == "a"
        with pytest.raises(trio.WouldBlock):
            rx.receive_nowait()
        totals = cluster.planes["n0"].statistics()["stats"]
        assert (totals.delivered, totals.failed, totals.queued, totals.in_flight) == (1, 0, 0, 0)
        assert cluster.planes["n1"].statistics()["stats"].received == 1
        assert rx.statistics().received == 1
        await rx.aclose()


async def test_wait_registered_on_a_closed_clone_raises_closed() -> None:
    async with open_cluster(2) as cluster:
        cluster.stalled = True  # the registration cannot commit yet
        rx = cluster.planes["n1"].receive("ns", buffer=1)
        closed_first = rx.clone()
        closed_first.close()
        with trio.fail_after(5):
            with pytest.raises(trio.ClosedResourceError):
                await closed_first.wait_registered()
        # A task already waiting is woken by close(), with the same error.
        waiting = rx.clone()
        outcome: list[BaseException] = []

        async def wait() -> None:
            try:
                await waiting.wait_registered()
            except trio.ClosedResourceError as exc:
                outcome.append(exc)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await settle()
                waiting.close()
        assert len(outcome) == 1
        cluster.stalled = False
        with trio.fail_after(5):
            await rx.wait_registered()  # the receiver itself is unaffected
        await rx.aclose()
