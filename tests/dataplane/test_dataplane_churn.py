"""Randomised churn: receivers come and go, sends time out and get cancelled.

Whatever happens, a message is received at most once, a receipt that says
"not delivered" belongs to a message nobody received, and every message a
receipt calls delivered is received or accounted for as dropped by a closing
receiver that found no one to hand it to.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Any

import pytest
import trio
from _dp_harness import FAST, open_cluster

from trio_dchan.dataplane import DistributedReceiveChannel, Outcome


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_churn_keeps_at_most_once_and_honest_receipts(seed: int) -> None:
    rng = random.Random(seed)
    settings = dataclasses.replace(
        FAST, handoff_timeout=0.3, credit_window=8, undeliverable_timeout=0.5
    )
    received: list[Any] = []
    dropped = 0
    async with open_cluster(3, settings=settings, seed=seed) as cluster:
        nodes = list(cluster.planes)
        receipts: dict[tuple[int, int], Any] = {}

        async def consume(rx: DistributedReceiveChannel, budget: int) -> None:
            # Take some messages, now and then abandoning a receive() midway.
            for _ in range(budget):
                with trio.move_on_after(rng.choice([0.001, 0.005, 0.02])):
                    received.append(await rx.receive())
            while True:
                try:
                    received.append(rx.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break

        async def receiver_life(k: int) -> None:
            nonlocal dropped
            plane = cluster.planes[rng.choice(nodes)]
            rx = plane.receive("churn", buffer=rng.choice([0, 1, 4, 16]))
            await consume(rx, rng.randrange(5, 60))
            await rx.aclose()
            dropped += rx.statistics().dropped

        async def sender_life(k: int) -> None:
            tx = cluster.planes[rng.choice(nodes)].send("churn", buffer=rng.choice([0, 0, 3]))
            for i in range(rng.randrange(20, 50)):
                if rng.random() < 0.1:
                    with trio.move_on_after(rng.choice([0, 0.002])):
                        await tx.send((k, i, "cancellable"))
                    continue
                receipts[(k, i)] = await tx.send_tracked((k, i), timeout=rng.choice([0.005, 0.05]))
            await tx.aclose()

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                for k in range(6):
                    nursery.start_soon(sender_life, k)
                for k in range(8):
                    nursery.start_soon(receiver_life, k)
            # A last receiver collects whatever is still on its way or parked.
            last = cluster.planes[nodes[0]].receive("churn", buffer=64)
            for receipt in receipts.values():
                await receipt.delivered()
            delivered = {key for key, r in receipts.items() if r.outcome is Outcome.DELIVERED}
            tracked_received = [v[:2] for v in received if len(v) == 2]
            while len(tracked_received) + dropped < len(delivered):
                value = await last.receive()
                received.append(value)
                if len(value) == 2:
                    tracked_received.append(value[:2])
            await last.aclose()

        counts = Counter(received)
        assert all(n == 1 for n in counts.values()), "a message was received twice"
        got = {v[:2] for v in received if len(v) == 2}
        failed = {key for key, r in receipts.items() if r.outcome is not Outcome.DELIVERED}
        assert not got & failed, "a message reported undelivered was received"
        assert got <= delivered
        assert len(delivered - got) == dropped
        assert all(
            r.outcome in (Outcome.DELIVERED, Outcome.TIMED_OUT, Outcome.NO_RECEIVER)
            for r in receipts.values()
        )
