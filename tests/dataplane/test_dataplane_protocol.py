"""The data-plane stream protocol, with the test playing one end of the link.

These tests exercise what a misbehaving or failing peer can do: lose the
connection under a message, refuse messages, send garbage. Every case must
end with a clear outcome for the messages involved and no effect on other
streams.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import trio
import trio.testing
from _dp_harness import FAST, open_cluster, settle

from trio_dchan import codec
from trio_dchan.dataplane import (
    DeliveryUnknownError,
    MemoryLink,
    Outcome,
    PeerProtocolError,
    memory_link_pair,
)
from trio_dchan.dataplane import _frames as fr
from trio_dchan.registry import RegisterReceiver, encode_command


async def _records(link: Any) -> list[Any]:
    with trio.fail_after(5):
        return list(fr.parse(await link.receive_frame(), fr.TO_RECEIVER))


async def _fake_receiver(cluster: Any, namespace: str, rid: str = "fake/1") -> Any:
    """Register a receiver on node "fake", played by the test; return its link channel."""
    links = cluster.fake_node("fake")
    await cluster.propose(encode_command(RegisterReceiver(namespace, rid, "fake", 8)))
    return links


async def _granted_link(links: Any, rid: str, credit: int) -> Any:
    """Accept the sender's stream, read its WANT and grant ``credit``."""
    with trio.fail_after(5):
        link = await links.receive()
    (want,) = await _records(link)
    assert isinstance(want, fr.RidCount)
    assert want.kind == fr.WANT
    assert want.rid == rid
    await link.send_frame(fr.rid_count(fr.CREDIT, rid, credit))
    return link


async def test_connection_lost_before_the_ack_makes_the_outcome_unknown() -> None:
    async with open_cluster(1) as cluster:
        links = await _fake_receiver(cluster, "doubt")
        tx = cluster.planes["n0"].send("doubt")
        link = await _granted_link(links, "fake/1", 4)
        receipt = await tx.send_tracked("maybe", timeout=5)
        (batch,) = await _records(link)
        assert isinstance(batch, fr.Batch)
        assert codec.decode_batch(batch.payload) == ["maybe"]
        await link.aclose()  # no ack: the sender cannot know
        with trio.fail_after(5), pytest.raises(DeliveryUnknownError):
            await receipt.delivered()
        assert receipt.outcome is Outcome.UNKNOWN
        stats = tx.statistics()
        assert (stats.failed, stats.in_flight, stats.outstanding) == (1, 0, 0)
        # The sender reconnects and asks for credit again.
        link2 = await _granted_link(links, "fake/1", 1)
        await tx.send("again")
        (batch,) = await _records(link2)
        assert batch.first_seq == 1  # a new stream numbers from 1
        await link2.send_frame(fr.ack(1))
        with trio.fail_after(5):
            await tx.aclose()
        assert tx.statistics().delivered == 1


async def test_refused_messages_go_to_another_receiver_and_invalid_ones_fail() -> None:
    async with open_cluster(1) as cluster:
        links = await _fake_receiver(cluster, "ref")
        tx = cluster.planes["n0"].send("ref")
        link = await _granted_link(links, "fake/1", 3)
        r1 = await tx.send_tracked(1, timeout=5)
        r2 = await tx.send_tracked(2, timeout=5)
        r3 = await tx.send_tracked(3, timeout=5)
        got = []
        while sum(b.count for b in got) < 3:
            got += await _records(link)
        # 1 is delivered, 2 refused (the receiver is gone), 3 undecodable.
        refusals = fr.refuse(2, 1, fr.Refusal.NO_RECEIVER) + fr.refuse(3, 1, fr.Refusal.INVALID)
        await link.send_frame(refusals + fr.ack(3))
        with trio.fail_after(5):
            assert await r1.delivered() is True
            assert await r3.delivered() is False
        assert r3.outcome is Outcome.REFUSED
        assert not r2.done()  # waiting for a receiver with credit
        real = cluster.planes["n0"].receive("ref", buffer=4)
        with trio.fail_after(5):
            assert await real.receive() == 2
            assert await r2.delivered() is True
        assert r2.receiver_id == real.receiver_id
        assert tx.statistics().retried == 1
        await tx.aclose()
        await real.aclose()


async def test_garbage_feedback_drops_only_that_link() -> None:
    async with open_cluster(1) as cluster:
        links = await _fake_receiver(cluster, "junk")
        tx = cluster.planes["n0"].send("junk")
        link = await _granted_link(links, "fake/1", 2)
        await link.send_frame(b"\xff\x00garbage")
        # The sender drops the stream and opens a new one.
        link2 = await _granted_link(links, "fake/1", 1)
        await tx.send("fine")
        (batch,) = await _records(link2)
        assert codec.decode_batch(batch.payload) == ["fine"]
        await link2.send_frame(fr.ack(1))
        with trio.fail_after(5):
            await tx.aclose()
        # An ack beyond what was sent is garbage too.
        tx2 = cluster.planes["n0"].send("junk")
        await link2.send_frame(fr.ack(99))
        with trio.fail_after(5):
            await _granted_link(links, "fake/1", 1)
        await tx2.aclose()
        del link


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x63",
        fr.batch(5, 1, b"r", b"\x80"),  # wrong sequence number
        fr.batch(1, 1, b"r", b"\x80")[:-3],  # truncated
        fr.rid_count(fr.CREDIT, "r", 1),  # a record of the other direction
        b"\x02\x00\x00\x00\x01\x00\x02\xff\xfe",  # receiver id not UTF-8
    ],
)
async def test_garbage_frames_fail_that_stream_only(garbage: bytes) -> None:
    async with open_cluster(2) as cluster:
        n1 = cluster.planes["n1"]
        rx = n1.receive("safe", buffer=4)
        with trio.fail_after(5):
            await rx.wait_registered()
        tx = cluster.planes["n0"].send("safe")
        ours, theirs = memory_link_pair()
        async with trio.open_nursery() as nursery:
            errors: list[BaseException] = []

            async def serve() -> None:
                try:
                    await n1.serve_stream("evil", theirs)
                except PeerProtocolError as exc:
                    errors.append(exc)

            nursery.start_soon(serve)
            await ours.send_frame(garbage)
            await settle()
            assert len(errors) == 1
            with pytest.raises(trio.EndOfChannel):
                await ours.receive_frame()
        # The honest stream from n0 still works.
        with trio.fail_after(5):
            await tx.send("ok")
            assert await rx.receive() == "ok"
        await tx.aclose()
        await rx.aclose()


async def test_receiving_node_refuses_what_it_did_not_grant_or_cannot_decode() -> None:
    async with open_cluster(1) as cluster:
        n0 = cluster.planes["n0"]
        rx = n0.receive("strict", buffer=2)
        with trio.fail_after(5):
            await rx.wait_registered()
        rid = rx.receiver_id
        ours, theirs = memory_link_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(n0.serve_stream, "peer", theirs)
            one = codec.encode("one")
            # No WANT yet, so no credit: refused, not placed.
            await ours.send_frame(fr.batch(1, 1, rid.encode(), codec.join_encoded([one])))
            with trio.fail_after(5):
                recs = list(fr.parse(await ours.receive_frame(), fr.TO_SENDER))
            assert recs == [fr.Refuse(1, 1, fr.Refusal.NO_CREDIT), fr.Ack(1)]
            await ours.send_frame(fr.rid_count(fr.WANT, rid, 10))
            with trio.fail_after(5):
                recs = list(fr.parse(await ours.receive_frame(), fr.TO_SENDER))
            assert recs == [fr.RidCount(fr.CREDIT, rid, 2)]  # the buffer's size
            # Three messages against two credits: the third is refused.
            await ours.send_frame(fr.batch(2, 3, rid.encode(), codec.join_encoded([one] * 3)))
            with trio.fail_after(5):
                recs = list(fr.parse(await ours.receive_frame(), fr.TO_SENDER))
            assert recs == [fr.Refuse(4, 1, fr.Refusal.NO_CREDIT), fr.Ack(4)]
            assert rx.statistics().current_buffer_used == 2
            # Reading one frees a slot: fresh credit; an undecodable batch is refused.
            assert rx.receive_nowait() == "one"
            with trio.fail_after(5):
                recs = list(fr.parse(await ours.receive_frame(), fr.TO_SENDER))
            assert recs == [fr.RidCount(fr.CREDIT, rid, 1)]
            await ours.send_frame(fr.batch(5, 1, rid.encode(), b"\x81\xff"))
            with trio.fail_after(5):
                recs = list(fr.parse(await ours.receive_frame(), fr.TO_SENDER))
            assert recs[0] == fr.Refuse(5, 1, fr.Refusal.INVALID)
            assert rx.statistics().current_buffer_used == 1
            # Messages for an unknown receiver are refused so the sender can retry.
            await ours.send_frame(fr.batch(6, 2, b"nobody", codec.join_encoded([one] * 2)))
            with trio.fail_after(5):
                recs = list(fr.parse(await ours.receive_frame(), fr.TO_SENDER))
            assert fr.Refuse(6, 2, fr.Refusal.NO_RECEIVER) in recs
            await ours.aclose()
        assert rx.receive_nowait() == "one"
        with trio.fail_after(5):
            await rx.aclose()
        assert rx.statistics().dropped == 0


async def test_credit_returns_in_chunks_not_one_frame_per_message() -> None:
    """A consumer draining a full buffer frees credit in chunks (a quarter of the buffer).

    Granting each freed slot on its own would send one feedback frame per
    message received, and the sender would trickle one message per frame.
    """
    # A batch leaves when its sender blocks for want of credit, never because
    # a linger timer ran out on a loaded machine (that would split a grant's
    # messages over two frames, and two acks).
    settings = dataclasses.replace(
        FAST, handoff_timeout=0.1, batch_linger=10.0, batch_linger_max=10.0
    )
    async with open_cluster(2, seed=5, settings=settings) as cluster:
        rx = cluster.planes["n1"].receive("chunks", buffer=64)
        with trio.fail_after(5):
            await rx.wait_registered()
        tx = cluster.planes["n0"].send("chunks")

        async def flood() -> None:
            for i in range(1000):
                await tx.send(i)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood)
            with trio.fail_after(5):
                while not (
                    rx.statistics().current_buffer_used == 64
                    and tx.statistics().tasks_waiting_send == 1
                ):
                    await trio.testing.wait_all_tasks_blocked(cushion=0.001)
            (feedback,) = [
                theirs for me, peer, _, theirs in cluster.links if (me, peer) == ("n0", "n1")
            ]
            assert isinstance(feedback, MemoryLink)
            before = feedback.frames_sent
            for _ in range(64):
                await rx.receive()
            await trio.testing.wait_all_tasks_blocked(cushion=0.001)
            # 64 / 16 grants, each answered at most by its own frame plus an ack.
            assert feedback.frames_sent - before <= 2 * (64 // 16)
            nursery.cancel_scope.cancel()
