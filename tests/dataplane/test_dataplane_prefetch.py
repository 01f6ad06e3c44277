"""Receivers that prefetch: messages sent beyond a full buffer, and the bound on them."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing
from _dp_harness import FAST, all_registered, open_cluster, settle

from trio_dchan.dataplane import Outcome


@pytest.mark.parametrize("buffer", [0, 8])
async def test_a_receiver_holds_at_most_buffer_plus_prefetch(buffer: int) -> None:
    async with open_cluster(2) as cluster:
        rx = cluster.planes["n1"].receive("jobs", buffer=buffer, prefetch=24)
        await all_registered(rx)
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
            # Nobody reads: the sender got credit for the buffer and the
            # prefetch, no more, and blocks.
            held = buffer + 24
            assert accepted == held
            assert tx.statistics().tasks_waiting_send == 1
            stats = rx.statistics()
            assert (stats.max_buffer_size, stats.prefetch) == (buffer, 24)
            assert stats.current_buffer_used == held
            assert stats.credit_granted == 0
            # Prefetched messages are received like buffered ones, in order,
            # and reading makes room for the rest.
            got = [rx.receive_nowait() for _ in range(held)]
            assert got == list(range(held))
            with trio.fail_after(10):
                while len(got) < offered:
                    got.append(await rx.receive())
            assert got == list(range(offered))
        assert tx.statistics().delivered == offered
        assert rx.statistics().peak_buffer_used <= buffer + 24
        await tx.aclose()
        await rx.aclose()


async def test_prefetched_messages_are_handed_off_on_close() -> None:
    async with open_cluster(3) as cluster:
        first = cluster.planes["n1"].receive("work", buffer=4, prefetch=12)
        await all_registered(first)
        tx = cluster.planes["n0"].send("work")
        receipts = []
        with trio.fail_after(5):
            for i in range(16):
                receipts.append(await tx.send_tracked(i))
        await settle()
        assert first.statistics().current_buffer_used == 16
        # A prefetched message is in the receiving node's hands: delivered.
        for receipt in receipts:
            assert await receipt.delivered()
            assert receipt.outcome is Outcome.DELIVERED
        second = cluster.planes["n2"].receive("work", buffer=16)
        await all_registered(second)
        with trio.fail_after(10):
            await first.aclose()
        stats = first.statistics()
        assert (stats.handed_off, stats.dropped) == (16, 0)
        await settle()
        got = [second.receive_nowait() for _ in range(16)]
        assert sorted(got) == list(range(16))
        await tx.aclose()
        await second.aclose()


async def test_prefetch_bounds_what_all_sending_nodes_together_send() -> None:
    settings = dataclasses.replace(FAST, credit_window=1000)
    async with open_cluster(3, settings=settings) as cluster:
        rx = cluster.planes["n2"].receive("shared", buffer=2, prefetch=10)
        await all_registered(rx)
        senders = [cluster.planes[n].send("shared") for n in ("n0", "n1")]
        accepted = [0, 0]

        async def produce(k: int) -> None:
            for i in range(100):
                await senders[k].send((k, i))
                accepted[k] += 1

        async with trio.open_nursery() as nursery:
            for k in range(2):
                nursery.start_soon(produce, k)
            await settle()
            # However many sending nodes want it, the receiver's node hands
            # out no more than its 12 places.
            assert sum(accepted) == 12
            got = []
            with trio.fail_after(10):
                while len(got) < 200:
                    got.append(await rx.receive())
                    assert sum(accepted) - len(got) <= 12
            for k in range(2):
                assert [i for kk, i in got if kk == k] == list(range(100))
        for tx in senders:
            await tx.aclose()
        await rx.aclose()


async def test_prefetch_must_be_a_non_negative_int() -> None:
    async with open_cluster(1) as cluster:
        plane = cluster.planes["n0"]
        with pytest.raises(ValueError, match="prefetch"):
            plane.receive("x", prefetch=-1)
        with pytest.raises(ValueError, match="prefetch"):
            plane.receive("x", prefetch=1.5)  # type: ignore[arg-type]
