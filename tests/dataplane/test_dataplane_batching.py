"""When a sending node's batch leaves: at once, after lingering, or when big enough.

The test plays the receiving node and notes the (virtual) time each frame
arrives. A lone message must not wait; a busy node's batch waits while
messages keep coming, but never longer than ``batch_linger_max``, and leaves
about ``batch_linger`` after the last one; a batch of large messages leaves
once ``batch_target_bytes`` are queued.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
import trio.testing
from _dp_harness import FAST, open_cluster

from trio_dchan import codec
from trio_dchan.dataplane import DataPlaneSettings, DistributedSendChannel
from trio_dchan.dataplane import _frames as fr
from trio_dchan.registry import RegisterReceiver, encode_command

LINGER = 0.01
LINGER_MAX = 0.05
SETTINGS = dataclasses.replace(FAST, batch_linger=LINGER, batch_linger_max=LINGER_MAX)


class _Log(list[tuple[float, list[Any]]]):
    """(arrival time, messages) of each frame; ``first`` is set by the first one."""

    def __init__(self) -> None:
        super().__init__()
        self.first = trio.Event()


async def _receiving_node(cluster: Any, credit: int, task_status: trio.TaskStatus[_Log]) -> None:
    """Play node "fake": grant ``credit``, ack every frame, log the frames."""
    links = cluster.fake_node("fake")
    await cluster.propose(encode_command(RegisterReceiver("ns", "fake/1", "fake", 8)))
    log = _Log()
    task_status.started(log)
    link = await links.receive()
    while True:
        try:
            frame = await link.receive_frame()
        except trio.EndOfChannel:
            return  # the sending node closed at the end of the test
        records = list(fr.parse(frame, fr.TO_RECEIVER))
        batches = [r for r in records if isinstance(r, fr.Batch)]
        for rec in records:
            if isinstance(rec, fr.RidCount) and rec.kind == fr.WANT:
                await link.send_frame(fr.rid_count(fr.CREDIT, "fake/1", credit))
        if batches:
            values = [v for b in batches for v in codec.decode_batch(b.payload)]
            log.append((trio.current_time(), values))
            log.first.set()
            last = batches[-1]
            await link.send_frame(fr.ack(last.first_seq + last.count - 1))


@asynccontextmanager
async def _sender_and_log(
    settings: DataPlaneSettings = SETTINGS, credit: int = 10_000
) -> AsyncIterator[tuple[DistributedSendChannel[Any], _Log]]:
    """Node n0's send channel, once the played receiver's credit reached it."""
    async with open_cluster(1, settings=settings) as cluster:
        log = await cluster.nursery.start(_receiving_node, cluster, credit)
        tx = cluster.planes["n0"].send("ns")
        with trio.fail_after(5):
            while tx.statistics().credit == 0:  # noqa: ASYNC110 - a statistic, no event
                await trio.sleep(0.001)
        yield tx, log
        with trio.fail_after(1):
            await tx.aclose()


async def test_a_lone_message_leaves_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async with _sender_and_log() as (tx, log):
        sent_at = trio.current_time()
        await tx.send("alone")
        with trio.fail_after(1):
            await log.first.wait()
        assert log == [(sent_at, ["alone"])]


async def test_a_busy_batch_waits_while_messages_keep_coming_but_not_past_the_maximum(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _sender_and_log() as (tx, log):
        start = trio.current_time()
        # Three at once (the node is busy) every 4 ms for 120 ms: never a
        # pause as long as the linger.
        for burst in range(30):
            if burst:
                await trio.sleep(0.004)
            for i in range(3):
                await tx.send(3 * burst + i)
        with trio.fail_after(1):
            await tx.aclose()
        times = [t - start for t, _ in log]
        # Without lingering each burst would travel alone (30 frames). Each
        # batch instead waited the maximum, then left with what came.
        assert len(log) <= 4
        assert abs(times[0] - LINGER_MAX) < 0.005
        assert len(log[0][1]) >= 36
        assert [v for _, values in log for v in values] == list(range(90))
        for earlier, later in itertools.pairwise(times):
            assert later - earlier <= LINGER_MAX + 0.005


async def test_a_batch_leaves_soon_after_the_messages_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with _sender_and_log() as (tx, log):
        for i in range(5):
            await tx.send(i)
        last_sent = trio.current_time()
        with trio.fail_after(1):
            await log.first.wait()
        ((arrived, values),) = log
        assert values == [0, 1, 2, 3, 4]
        # One linger with no new message, after at most one that saw the
        # burst's tail: well before the maximum.
        assert arrived - last_sent <= 2 * LINGER + 0.001
        assert arrived - last_sent < LINGER_MAX


async def test_a_batch_of_large_messages_leaves_once_it_reaches_its_byte_target(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 400 credits of 3,000-byte messages: a quarter of what credit allows is
    # 100 messages, more than batch_target_bytes (10 messages) and less than
    # half the credit (the message target, 200).
    settings = dataclasses.replace(SETTINGS, batch_target_bytes=30_000)
    async with _sender_and_log(settings, credit=400) as (tx, log):
        sent_at = trio.current_time()
        for i in range(120):
            await tx.send(i.to_bytes(2, "big") * 1500)
        with trio.fail_after(1):
            await log.first.wait()
        arrived, values = log[0]
        # Four such batches fit in the credit, so one can travel while the
        # next ones gather: it left without lingering.
        assert arrived == sent_at
        assert 100 <= len(values) <= 101
        assert [int.from_bytes(v[:2], "big") for v in values] == list(range(len(values)))


async def test_credit_kept_for_a_namespace_no_longer_used_does_not_set_the_target(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The node holds plenty of credit for "old" (whose sender closed) when
    # "new" starts with 64. A batch for "new" must aim at half of ITS credit
    # (32), so that one batch travels while the next gathers; aiming at half
    # of all credit held, it would wait until the sender ran dry.
    async with open_cluster(1, settings=SETTINGS) as cluster:
        links = cluster.fake_node("fake")
        for ns in ("old", "new"):
            await cluster.propose(encode_command(RegisterReceiver(ns, f"fake/{ns}", "fake", 8)))
        grants = {"fake/old": 10_000, "fake/new": 64}
        frames: list[list[Any]] = []

        async def receiving_node() -> None:
            link = await links.receive()
            while True:
                try:
                    frame = await link.receive_frame()
                except trio.EndOfChannel:
                    return
                records = list(fr.parse(frame, fr.TO_RECEIVER))
                for rec in records:
                    if isinstance(rec, fr.RidCount) and rec.kind == fr.WANT:
                        await link.send_frame(fr.rid_count(fr.CREDIT, rec.rid, grants[rec.rid]))
                batches = [r for r in records if isinstance(r, fr.Batch)]
                if batches:
                    if batches[0].rid == "fake/new":
                        frames.append([v for b in batches for v in codec.decode_batch(b.payload)])
                    last = batches[-1]
                    await link.send_frame(fr.ack(last.first_seq + last.count - 1))

        cluster.nursery.start_soon(receiving_node)
        plane = cluster.planes["n0"]
        with trio.fail_after(5):
            async with plane.send("old") as old:
                while old.statistics().credit == 0:  # noqa: ASYNC110 - a statistic, no event
                    await trio.sleep(0.001)
                await old.send("before")
            new = plane.send("new")
            while new.statistics().credit == 0:  # noqa: ASYNC110 - a statistic, no event
                await trio.sleep(0.001)
            for i in range(64):
                await new.send(i)
            await new.aclose()
        # The first batch left at its target (the sender may add one more
        # before the pump runs), not once all 64 were queued.
        assert len(frames) >= 2
        assert 32 <= len(frames[0]) <= 34
        assert [v for f in frames for v in f] == list(range(64))
