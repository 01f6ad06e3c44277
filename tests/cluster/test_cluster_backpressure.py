"""Backpressure across nodes: full receivers stop senders; room anywhere frees them."""

from __future__ import annotations

import dataclasses

import trio
import trio.testing
from _cluster_harness import STEP, local_cluster


async def _until(predicate: object) -> None:
    """Wait (bounded) until ``predicate()`` holds while every task is blocked."""
    assert callable(predicate)
    with trio.fail_after(STEP):
        while not predicate():
            await trio.testing.wait_all_tasks_blocked(cushion=0.003)


async def test_backpressure_blocks_senders_until_a_receiver_has_room() -> None:
    """A receiver that never reads holds its buffer; the sender keeps only its own buffer.

    Accepted = placed in the receiver's buffer (5) + waiting in the send
    channel's buffer (3). Messages waiting in the channel's buffer fail after
    ``undeliverable_timeout`` (docs/channels.md, "Delivery guarantee"), which
    frees their places in that buffer: a sender blocked for longer than that
    gets new messages accepted in their stead, and these fail in turn. At no
    moment does the sending node hold more than the channel's buffer.
    """
    async with local_cluster(2, seed=3, start=False) as lc:
        lc.settings = dataclasses.replace(
            lc.settings,
            dataplane=dataclasses.replace(lc.settings.dataplane, undeliverable_timeout=1.0),
        )
        for address in lc.addresses:
            lc.start(address)
        await lc.wait_up()
        a, b = lc.nodes
        stuck = b.receive("slow", buffer=5)
        await stuck.wait_registered()
        await a.raft.wait_for(lambda n: n.applied_index >= b.raft.applied_index)
        tx = a.send("slow", buffer=3)
        sent = 0
        most_outstanding = 0

        async def flood() -> None:
            nonlocal sent, most_outstanding
            while True:
                await tx.send(sent)
                sent += 1
                most_outstanding = max(most_outstanding, tx.statistics().outstanding)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            # The sender blocks once the receiver's 5 were delivered and 3 wait here.
            await _until(
                lambda: (
                    tx.statistics().tasks_waiting_send == 1
                    and tx.statistics().delivered == 5
                    and tx.statistics().in_flight == 0
                )
            )
            stats = tx.statistics()
            assert stats.queued == 3
            assert sent == 5 + 3 + stats.failed
            assert stuck.statistics().current_buffer_used == 5
            assert stuck.statistics().credit_granted == 0

            # The 3 waiting ones expire; 3 new ones take their places, no more.
            await _until(
                lambda: tx.statistics().failed >= 3 and tx.statistics().tasks_waiting_send == 1
            )
            stats = tx.statistics()
            assert sent == 5 + 3 + stats.failed
            assert stats.delivered == 5
            assert stats.queued == stats.outstanding == 3
            assert stuck.statistics().current_buffer_used == 5
            # Accepted and unsettled at any moment: the receiver's credit + the buffer.
            assert most_outstanding <= 5 + 3

            # A second receiver with room unblocks the sender.
            second = a.receive("slow", buffer=10)
            await second.wait_registered()
            target = sent + 10
            await _until(lambda: sent >= target)
            nursery.cancel_scope.cancel()
        assert stuck.statistics().current_buffer_used == 5
        await tx.aclose()
        # Closing the stuck receiver hands its 5 messages to the other one.
        drained = _drain(second)
        await stuck.aclose()
        assert stuck.statistics().handed_off == 5
        await _until(lambda: second.statistics().current_buffer_used == 5)
        assert sorted(_drain(second)) == list(range(5))
        assert len(set(drained)) == len(drained)
        await second.aclose()


def _drain(rx: trio.abc.ReceiveChannel[int]) -> list[int]:
    out: list[int] = []
    while True:
        try:
            out.append(rx.receive_nowait())
        except trio.WouldBlock:
            return out


async def test_a_prefetching_receiver_holds_buffer_plus_prefetch() -> None:
    """``cluster.receive(..., prefetch=P)``: P more messages reach the receiver's node, no more."""
    async with local_cluster(2, seed=5) as lc:
        a, b = lc.nodes
        stuck = b.receive("ahead", buffer=5, prefetch=7)
        await stuck.wait_registered()
        await a.raft.wait_for(lambda n: n.applied_index >= b.raft.applied_index)
        tx = a.send("ahead")
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await tx.send(sent)
                sent += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            await _until(
                lambda: tx.statistics().tasks_waiting_send == 1 and tx.statistics().delivered == 12
            )
            assert sent == 12
            stats = stuck.statistics()
            assert (stats.max_buffer_size, stats.prefetch, stats.current_buffer_used) == (5, 7, 12)
            assert _drain(stuck) == list(range(12))
            # Reading made room: the sender goes on, again up to 12 held.
            await _until(lambda: sent == 24 and tx.statistics().tasks_waiting_send == 1)
            nursery.cancel_scope.cancel()
        assert _drain(stuck) == list(range(12, 24))
        await tx.aclose()
        await stuck.aclose()
