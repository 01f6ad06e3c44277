"""Closing without a quorum: unregistration is bounded by ``unregister_timeout``.

When every node of a cluster leaves at once, the proposals that unregister
receivers can never commit. Closing a receiver, and the data plane, must
still return; the receiver's node refuses its messages so senders go
elsewhere, and the stale registration is removed when the node next starts.
"""

from __future__ import annotations

import dataclasses

import trio
import trio.testing
from _dp_harness import FAST, all_registered, open_cluster

from trio_dchan.dataplane import Outcome
from trio_dchan.registry import UnregisterNode, encode_command

SETTINGS = dataclasses.replace(FAST, unregister_timeout=2.0, handoff_timeout=3.0)


async def test_receiver_close_is_bounded_and_its_messages_go_elsewhere(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster(2, settings=SETTINGS, seed=11) as cluster:
        n0, n1 = cluster.planes["n0"], cluster.planes["n1"]
        gone = n1.receive("jobs", buffer=4)
        other = n0.receive("jobs", buffer=64)
        await all_registered(gone, other)
        tx = n0.send("jobs")
        # Fill the receiver that is about to close.
        early = 0
        while gone.statistics().current_buffer_used < 2:
            early += 1
            receipt = await tx.send_tracked("early", timeout=5)
            with trio.fail_after(5):
                await receipt.delivered()

        cluster.stalled = True  # no proposal commits any more
        start = trio.current_time()
        with trio.fail_after(SETTINGS.unregister_timeout + SETTINGS.handoff_timeout + 1):
            await gone.aclose()
        assert trio.current_time() - start >= SETTINGS.unregister_timeout
        # It never left the Registry: the proposal did not commit.
        registered = {r.receiver_id for r in cluster.registry.receivers("jobs")}
        assert gone.receiver_id in registered
        # Its buffered messages were handed to the other receiver anyway.
        assert gone.statistics().handed_off == gone.statistics().received
        assert gone.statistics().dropped == 0

        # Senders that still route to it are refused and retry elsewhere.
        receipts = [await tx.send_tracked(i, timeout=5) for i in range(40)]
        with trio.fail_after(5):
            for r in receipts:
                assert await r.delivered()
        assert {r.receiver_id for r in receipts} == {other.receiver_id}
        assert tx.statistics().failed == 0
        got = []
        while True:
            try:
                got.append(other.receive_nowait())
            except trio.WouldBlock:
                break
        assert sorted(v for v in got if v != "early") == list(range(40))
        assert got.count("early") == early

        # The node's next start removes what it left behind (cluster.py
        # proposes UnregisterNode once a leader is known).
        cluster.stalled = False
        await cluster.propose(encode_command(UnregisterNode("n1")))
        registered = {r.receiver_id for r in cluster.registry.receivers("jobs")}
        assert registered == {other.receiver_id}
        await tx.aclose()
        await other.aclose()


async def test_data_plane_aclose_is_bounded_without_a_quorum(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_cluster(2, settings=SETTINGS, seed=12) as cluster:
        n0, n1 = cluster.planes["n0"], cluster.planes["n1"]
        receivers = [n1.receive(ns, buffer=8) for ns in ("a", "b", "c")]
        await all_registered(*receivers)
        pending = n1.receive("late", buffer=1)  # its registration never commits
        cluster.stalled = True
        tx = n0.send("a")
        await tx.send("x")
        with trio.fail_after(5):
            while receivers[0].statistics().received == 0:
                await trio.testing.wait_all_tasks_blocked()

        with trio.fail_after(SETTINGS.unregister_timeout + SETTINGS.handoff_timeout + 1):
            await n1.aclose()
        for rx in receivers:
            with trio.fail_after(1):
                async for _ in rx:  # the node shut down: the loop ends
                    raise AssertionError("a closed receiver produced a message")
        assert not pending.statistics().registered
        # "x" found no other receiver of "a" within the hand-off timeout.
        assert receivers[0].statistics().dropped == 1
        # The sending node is not stuck either.
        receipt = await tx.send_tracked("y", timeout=1)
        assert not await receipt.delivered()
        assert receipt.outcome in (Outcome.TIMED_OUT, Outcome.NO_RECEIVER)
        with trio.fail_after(SETTINGS.unregister_timeout + 1):
            await n0.aclose()
