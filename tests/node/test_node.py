"""Whole nodes (driver + MemoryStorage + state machine) over the in-memory network.

Every test runs under ``MockClock(autojump_threshold=0)``: time only moves
when every task is blocked, so elections and timeouts take no wall-clock time
and runs are deterministic for a given seed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
import trio.testing
from _node_harness import TEST_SETTINGS, Cluster, RecordingMachine

from trio_dchan.raft.errors import NotLeader, ProposalDropped
from trio_dchan.raft.node import (
    NodeStopped,
    OutcomeUnknown,
    RaftSettings,
    open_raft_node,
)
from trio_dchan.raft.storage import FileStorage, MemoryStorage
from trio_dchan.raft.transport import MemoryNetwork, Proposal, Unavailable
from trio_dchan.raft.types import ConfState, Role

IDS = ["a", "b", "c"]


def rec(cluster: Cluster, node_id: str) -> RecordingMachine:
    machine = cluster.machines[node_id]
    assert isinstance(machine, RecordingMachine)
    return machine


async def test_single_node_elects_itself_and_applies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, ["solo"])
        await cluster.start_all()
        with trio.fail_after(5):
            leader = await cluster.wait_leader()
            assert leader.id == "solo"
            index, count = await leader.propose(b"one")  # type: ignore[misc]
            assert count == 1
            assert leader.applied_index >= index
            assert rec(cluster, "solo").applied == [b"one"]
            assert leader.members == ConfState(voters=frozenset({"solo"}))
        nursery.cancel_scope.cancel()


async def test_three_nodes_elect_one_leader_and_replicate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, IDS, seed=1)
        await cluster.start_all()
        with trio.fail_after(10):
            leader = await cluster.wait_leader()
            assert leader.term >= 1
            assert all(n.leader == leader.id for n in cluster.nodes.values())
            for i in range(5):
                await leader.propose(b"cmd%d" % i)
            await cluster.wait_applied(leader.applied_index)
        expected = [b"cmd%d" % i for i in range(5)]
        for node_id in IDS:
            assert rec(cluster, node_id).applied == expected
        nursery.cancel_scope.cancel()


async def test_concurrent_proposals_are_batched(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, IDS, seed=2)
        await cluster.start_all()
        results: dict[int, object] = {}
        with trio.fail_after(10):
            leader = await cluster.wait_leader()
            batches_before = leader.stats_batches
            saves_before = leader.stats_saves

            async def one(i: int) -> None:
                results[i] = await leader.propose(b"p%d" % i)

            async with trio.open_nursery() as inner:
                for i in range(64):
                    inner.start_soon(one, i)
        assert len(results) == 64
        applied = rec(cluster, leader.id).applied
        assert sorted(applied) == sorted(b"p%d" % i for i in range(64))
        # Each proposer got the index its own command landed at.
        for i, result in results.items():
            _index, count = result  # type: ignore[misc]
            assert applied[count - 1] == b"p%d" % i
        # Group commit: far fewer batches and fsync rounds than proposals.
        assert leader.stats_batches - batches_before <= 8
        assert leader.stats_saves - saves_before <= 24
        nursery.cancel_scope.cancel()


async def test_follower_forwards_and_reads_its_own_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, IDS, seed=3)
        await cluster.start_all()
        with trio.fail_after(10):
            leader = await cluster.wait_leader()
            follower = next(n for n in cluster.nodes.values() if n is not leader)
            index, count = await follower.propose(b"via-follower")  # type: ignore[misc]
            # Once propose returns, the follower itself has applied the entry.
            assert follower.applied_index >= index
            assert rec(cluster, follower.id).applied[count - 1] == b"via-follower"
        nursery.cancel_scope.cancel()


async def test_leader_crash_fails_over_and_restart_catches_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, IDS, seed=4)
        await cluster.start_all()
        with trio.fail_after(20):
            old = await cluster.wait_leader()
            await old.propose(b"before")
            old_id, old_term = old.id, old.term
            cluster.crash(old_id)
            survivors = [i for i in IDS if i != old_id]
            new = await cluster.wait_leader(survivors)
            assert new.id != old_id
            assert new.term > old_term
            survivor = next(cluster.nodes[i] for i in survivors if i != new.id)
            await survivor.propose(b"after")  # forwarded to the new leader
            restarted = await cluster.start(old_id)
            await cluster.wait_applied(new.applied_index)
            assert restarted.leader == new.id
        for node_id in IDS:
            assert rec(cluster, node_id).applied == [b"before", b"after"]
        cluster.check()
        nursery.cancel_scope.cancel()


async def test_follower_restart_recovers_from_its_storage(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, IDS, seed=5)
        await cluster.start_all()
        with trio.fail_after(20):
            leader = await cluster.wait_leader()
            follower_id = next(i for i in IDS if i != leader.id)
            for i in range(10):
                await leader.propose(b"x%d" % i)
            await cluster.wait_applied(leader.applied_index)
            cluster.crash(follower_id)
            for i in range(10, 15):
                await leader.propose(b"x%d" % i)
            node = await cluster.start(follower_id)
            # The restarted node replays its own log before it hears the leader.
            await cluster.wait_applied(leader.applied_index)
            assert node.term == leader.term
        assert rec(cluster, follower_id).applied == [b"x%d" % i for i in range(15)]
        nursery.cancel_scope.cancel()


async def test_lagging_follower_gets_a_snapshot(autojump_clock: trio.testing.MockClock) -> None:
    settings = dataclasses.replace(TEST_SETTINGS, snapshot_every=16)
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, IDS, seed=6, settings=settings)
        await cluster.start_all()
        with trio.fail_after(30):
            leader = await cluster.wait_leader()
            lagging = next(i for i in IDS if i != leader.id)
            cluster.network.isolate(lagging)
            for i in range(80):
                await leader.propose(b"s%d" % i)
            # The leader has compacted past everything the lagging node has.
            assert cluster.storages[leader.id].snapshot_index > 16
            cluster.network.heal()
            await cluster.wait_applied(leader.applied_index)
        machine = rec(cluster, lagging)
        assert machine.restores >= 1
        assert machine.applied == [b"s%d" % i for i in range(80)]
        nursery.cancel_scope.cancel()


async def test_deposed_leader_reports_outcome_unknown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, IDS, seed=7)
        await cluster.start_all()
        with trio.fail_after(20):
            leader = await cluster.wait_leader()
            cluster.network.isolate(leader.id)
            # Appended locally, never replicated; the leader steps down (check quorum)
            # and never learns more while it stays cut off.
            with pytest.raises(OutcomeUnknown):
                await leader.propose(b"lost?")
            assert leader.role != Role.LEADER
        nursery.cancel_scope.cancel()


async def test_overwritten_proposal_is_reported_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, IDS, seed=8)
        await cluster.start_all()
        outcome: list[BaseException] = []
        with trio.fail_after(20):
            old = await cluster.wait_leader()
            cluster.network.isolate(old.id)

            async def doomed() -> None:
                try:
                    await old.propose(b"doomed")
                except Exception as exc:
                    outcome.append(exc)

            nursery.start_soon(doomed)
            others = [i for i in IDS if i != old.id]
            new = await cluster.wait_leader(others)
            await new.propose(b"winner")
            # Heal as soon as the old leader has noticed it lost its quorum.
            await cluster.wait_until(lambda: old.role != Role.LEADER)
            cluster.network.heal()
            await cluster.wait_until(lambda: bool(outcome))
        assert isinstance(outcome[0], ProposalDropped)
        for node_id in IDS:
            assert b"doomed" not in rec(cluster, node_id).applied
        nursery.cancel_scope.cancel()


async def test_no_leader_reachable_raises_a_named_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = dataclasses.replace(TEST_SETTINGS, proposal_timeout=1.0)
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, IDS, seed=9, settings=settings)
        await cluster.start_all()
        with trio.fail_after(20):
            leader = await cluster.wait_leader()
            follower = next(n for n in cluster.nodes.values() if n is not leader)
            cluster.network.isolate(follower.id)
            with pytest.raises((NotLeader, Unavailable)):
                await follower.propose(b"nowhere")
        nursery.cancel_scope.cancel()


async def test_propose_honours_cancellation(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, IDS, seed=10)
        await cluster.start_all()
        with trio.fail_after(20):
            leader = await cluster.wait_leader()
            follower = next(n for n in cluster.nodes.values() if n is not leader)
            cluster.network.isolate(follower.id)
            with trio.move_on_after(0.2) as scope:
                await follower.propose(b"cancelled")
            assert scope.cancelled_caught
            cluster.network.heal()
            await leader.propose(b"next")
            await cluster.wait_applied(leader.applied_index)
        assert rec(cluster, follower.id).applied == [b"next"]
        nursery.cancel_scope.cancel()


async def test_membership_add_learner_voter_and_remove(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, [*IDS, "d"], seed=11)
        conf = ConfState(voters=frozenset(IDS))
        for node_id in IDS:
            await cluster.start(node_id, initial_conf=conf)
        with trio.fail_after(30):
            leader = await cluster.wait_leader(IDS)
            await leader.propose(b"early")
            joiner = await cluster.start("d")  # no conf: waits to be contacted
            follower = next(cluster.nodes[i] for i in IDS if i != leader.id)
            await follower.add_learner("d", "127.0.0.1:7004")  # forwarded
            await cluster.wait_until(lambda: "d" in joiner.members.learners)
            await leader.add_voter("d", "127.0.0.1:7004")
            assert "d" in leader.members.voters
            await cluster.wait_applied(leader.applied_index)
            assert rec(cluster, "d").applied == [b"early"]
            await leader.remove_node("d")
            assert "d" not in leader.members.members
        nursery.cancel_scope.cancel()


async def test_transfer_leadership(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, IDS, seed=12)
        await cluster.start_all()
        with trio.fail_after(20):
            leader = await cluster.wait_leader()
            target = next(i for i in IDS if i != leader.id)
            other = next(i for i in IDS if i not in (leader.id, target))
            # Asked on a third node: forwarded to the leader.
            await cluster.nodes[other].transfer_leadership(target)
            assert cluster.nodes[other].leader == target
            new = await cluster.wait_leader()
            assert new.id == target
            await cluster.nodes[leader.id].propose(b"after-transfer")
        nursery.cancel_scope.cancel()


class FailingStorage(MemoryStorage):
    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def save(self, hard_state, entries, snapshot) -> None:  # type: ignore[no-untyped-def]
        if self.fail:
            raise OSError(28, "No space left on device")
        super().save(hard_state, entries, snapshot)


async def test_storage_error_stops_the_node_and_surfaces(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage = FailingStorage()
    network = MemoryNetwork()
    with trio.fail_after(10), pytest.raises(OSError, match="No space"):  # noqa: PT012
        async with open_raft_node(
            "solo",
            storage=storage,
            state_machine=RecordingMachine(),
            transport_factory=lambda handler: network.transport_for("solo", handler),
            settings=TEST_SETTINGS,
            initial_conf=ConfState(voters=frozenset({"solo"})),
        ) as node:
            await node.wait_for(lambda n: n.role == Role.LEADER)
            await node.propose(b"first")
            storage.fail = True
            await node.propose(b"second")
    assert not node.running
    with pytest.raises(NodeStopped):
        await node.propose(b"third")


async def test_leaving_the_block_stops_the_node(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    storage = MemoryStorage()
    with trio.fail_after(10):
        async with open_raft_node(
            "solo",
            storage=storage,
            state_machine=RecordingMachine(),
            transport_factory=lambda handler: network.transport_for("solo", handler),
            settings=TEST_SETTINGS,
            initial_conf=ConfState(voters=frozenset({"solo"})),
        ) as node:
            await node.wait_leader_known()
            index, _ = await node.propose(b"kept")  # type: ignore[misc]
        assert not node.running
        # The same storage restarts the node with its state.
        machine = RecordingMachine()
        async with open_raft_node(
            "solo",
            storage=storage,
            state_machine=machine,
            transport_factory=lambda handler: network.transport_for("solo", handler),
            settings=TEST_SETTINGS,
        ) as node:
            await node.wait_for(lambda n: n.applied_index >= index)
        assert machine.applied == [b"kept"]


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="heartbeat"):
        RaftSettings(election_ticks=2, heartbeat_ticks=2)
    with pytest.raises(ValueError, match="tick_interval"):
        RaftSettings(tick_interval=0)
    with pytest.raises(ValueError, match="max_batch"):
        RaftSettings(max_batch=0)
    assert RaftSettings().election_timeout < 0.8


async def test_saves_in_a_worker_thread_with_real_files(tmp_path: Path) -> None:
    """Real clock, real files, saves in a thread: state survives a restart."""
    settings = dataclasses.replace(TEST_SETTINGS, persist_in_thread=True)
    network = MemoryNetwork()
    conf = ConfState(voters=frozenset({"solo"}))
    with trio.fail_after(20):
        with FileStorage(tmp_path, cluster_id="t", node_id="solo") as storage:
            async with open_raft_node(
                "solo",
                storage=storage,
                state_machine=RecordingMachine(),
                transport_factory=lambda handler: network.transport_for("solo", handler),
                settings=settings,
                initial_conf=conf,
            ) as node:
                await node.wait_leader_known()
                async with trio.open_nursery() as proposers:
                    for i in range(20):
                        proposers.start_soon(node.propose, b"t%d" % i)
                last = node.applied_index
        machine = RecordingMachine()
        with FileStorage(tmp_path, cluster_id="t", node_id="solo") as storage:
            async with open_raft_node(
                "solo",
                storage=storage,
                state_machine=machine,
                transport_factory=lambda handler: network.transport_for("solo", handler),
                settings=settings,
            ) as node:
                await node.wait_for(lambda n: n.applied_index >= last)
    assert sorted(machine.applied) == sorted(b"t%d" % i for i in range(20))


async def test_lossy_network_still_agrees(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, IDS, seed=13)
        cluster.network.drop_rate = 0.2
        await cluster.start_all()
        done: list[bytes] = []
        with trio.fail_after(60):
            await cluster.wait_leader()
            for i in range(30):
                node = cluster.nodes[IDS[i % 3]]
                command = b"lossy%d" % i
                try:
                    await node.propose(command)
                except (NotLeader, Unavailable, OutcomeUnknown, ProposalDropped):
                    continue
                done.append(command)
            cluster.network.drop_rate = 0.0
            leader = await cluster.wait_leader()
            await leader.propose(b"end")
            await cluster.wait_applied(leader.applied_index)
        histories = [rec(cluster, i).applied for i in IDS]
        assert histories[0] == histories[1] == histories[2]
        assert set(done) <= set(histories[0])
        assert len(done) >= 20
        assert cluster.network.dropped > 0
        cluster.check()
        nursery.cancel_scope.cancel()


class ResetAfterForwardNetwork(MemoryNetwork):
    """Runs every forwarded proposal, then loses the reply (a connection reset)."""

    async def _forward(self, source: str, to: str, proposal: Proposal) -> object:
        await super()._forward(source, to, proposal)
        raise Unavailable(to, "connection reset", maybe_delivered=True)


async def test_lost_reply_from_the_leader_is_outcome_unknown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, IDS, seed=14)
        cluster.network = ResetAfterForwardNetwork()
        cluster.network.observers.append(cluster._observe)
        await cluster.start_all()
        with trio.fail_after(20):
            leader = await cluster.wait_leader()
            follower = next(n for n in cluster.nodes.values() if n is not leader)
            with pytest.raises(OutcomeUnknown):
                await follower.propose(b"did-it-commit")
            await leader.propose(b"next")
            await cluster.wait_applied(leader.applied_index)
        # Unknown to the caller, but it did commit: exactly once, everywhere.
        for node_id in IDS:
            assert rec(cluster, node_id).applied == [b"did-it-commit", b"next"]
        nursery.cancel_scope.cancel()
