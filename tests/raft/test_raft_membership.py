"""Single-server membership changes and leadership transfer."""

from __future__ import annotations

import pytest

from trio_dchan.raft.errors import (
    ConfChangeInProgress,
    InvalidConfChange,
    LeadershipTransferInProgress,
    NotLeader,
    UnknownNode,
)
from trio_dchan.raft.sim import NetworkConfig, Simulator
from trio_dchan.raft.types import ConfChange, ConfChangeType, EntryType, MessageType, Role

ELECTION = 10
ADD_VOTER = ConfChangeType.ADD_VOTER
ADD_LEARNER = ConfChangeType.ADD_LEARNER
REMOVE = ConfChangeType.REMOVE_NODE


def wait_committed(sim: Simulator, index: int, nodes: list[str]) -> None:
    sim.run_until(
        lambda: all(sim.nodes[n].app.index >= index for n in nodes),
        20 * ELECTION,
        f"index {index} applied on {nodes}",
    )


def test_membership_add_remove() -> None:
    sim = Simulator(
        3, seed=41, joiners=["n4"], snapshot_every=10, config={"snapshot_chunk_size": 64}
    )
    for k in range(25):
        sim.one(b"a%d" % k, 3)
    # The joiner has no membership yet: it waited and never campaigned.
    joiner = sim.core("n4")
    assert joiner.term == 0
    assert joiner.conf.voters == frozenset()

    # Add it as a learner: it catches up through a snapshot, since the
    # leader compacted its log long ago.
    lead = sim.wait_leader()
    index, _ = sim.conf_change(lead, ConfChange(ADD_LEARNER, "n4", b"addr-n4"))
    wait_committed(sim, index, ["n1", "n2", "n3", "n4"])
    assert sim.nodes["n4"].snapshot is not None
    assert sim.sent[MessageType.SNAPSHOT] >= 2
    assert sim.core("n4").role is Role.LEARNER
    assert sim.core("n4").conf.learners == {"n4"}
    # The conf change reached the application too, with its context.
    _, kind, data = sim.committed[index]
    assert kind is EntryType.CONF_CHANGE
    assert ConfChange.decode(data).context == b"addr-n4"

    # Promote it; from now on it votes and counts for commits.
    lead = sim.wait_leader()
    index, _ = sim.conf_change(lead, ConfChange(ADD_VOTER, "n4"))
    wait_committed(sim, index, ["n1", "n2", "n3", "n4"])
    for n in sim.nodes:
        assert sim.core(n).conf.voters == {"n1", "n2", "n3", "n4"}
    assert sim.core("n4").role is Role.FOLLOWER
    sim.one(b"four", 4)

    # Remove the leader itself: it steps down once the removal is committed
    # and the others carry on without it.
    old = sim.wait_leader()
    index, _ = sim.conf_change(old, ConfChange(REMOVE, old))
    rest = [n for n in sorted(sim.nodes) if n != old]
    sim.run_until(
        lambda: sim.core(old).role is not Role.LEADER and sim.leader_among(set(rest)) is not None,
        10 * ELECTION,
        "a new leader after removing the old one",
    )
    wait_committed(sim, index, rest)
    for n in rest:
        assert sim.core(n).conf.voters == set(rest)
    sim.one(b"three", 3, nodes=rest)
    term = sim.core(sim.wait_leader()).term
    sim.run_ticks(10 * ELECTION)
    # The removed node never leads again and does not disturb the cluster.
    assert all(holder != old for t, holder in sim.leaders.items() if t >= term)
    assert sim.core(sim.wait_leader()).term == term

    # Remove a follower too: two voters remain and still agree.
    lead = sim.wait_leader()
    follower = next(n for n in rest if n != lead)
    index, _ = sim.conf_change(lead, ConfChange(REMOVE, follower))
    left = [n for n in rest if n != follower]
    wait_committed(sim, index, left)
    sim.one(b"two", 2, nodes=left)
    # The removed follower was told: it got the entry that removed it, so it
    # knows it is out and never campaigns; then the leader stops talking to it.
    sim.run_until(
        lambda: follower not in sim.core(follower).conf.members, 5 * ELECTION, "removal known"
    )
    sent_to: list[str] = []
    sim.on_send = lambda m: sent_to.append(m.to)
    sim.run_ticks(5 * ELECTION)
    assert follower not in sent_to
    assert sim.core(follower).role is Role.FOLLOWER
    assert follower not in sim.leaders.values()


def test_one_membership_change_at_a_time() -> None:
    sim = Simulator(3, seed=42, joiners=["n4", "n5"])
    sim.one(b"x", 3)
    lead = sim.wait_leader()
    index, _ = sim.conf_change(lead, ConfChange(ADD_LEARNER, "n4"))
    # A second change must wait for the first to commit.
    with pytest.raises(ConfChangeInProgress):
        sim.conf_change(lead, ConfChange(ADD_LEARNER, "n5"))
    wait_committed(sim, index, ["n1", "n2", "n3"])
    index2, _ = sim.conf_change(lead, ConfChange(ADD_LEARNER, "n5"))
    wait_committed(sim, index2, ["n1", "n2", "n3", "n4", "n5"])
    assert sim.core(lead).conf.learners == {"n4", "n5"}

    # Nonsense changes are refused by name.
    with pytest.raises(InvalidConfChange):
        sim.conf_change(lead, ConfChange(ADD_VOTER, lead))
    with pytest.raises(InvalidConfChange):
        sim.conf_change(lead, ConfChange(ADD_LEARNER, lead))
    with pytest.raises(UnknownNode):
        sim.conf_change(lead, ConfChange(REMOVE, "nobody"))
    follower = next(n for n in ("n1", "n2", "n3") if n != lead)
    with pytest.raises(NotLeader) as info:
        sim.conf_change(follower, ConfChange(ADD_VOTER, "n4"))
    assert info.value.leader == lead

    # A new leader cannot change membership before it committed an entry of
    # its own term (slow network: its no-op takes a while to commit).
    slow = Simulator(3, seed=43, net=NetworkConfig(min_delay=25, max_delay=30))
    slow.run_until(lambda: slow.leader() is not None, 20 * ELECTION, "a leader")
    new = slow.leader()
    assert new is not None
    with pytest.raises(ConfChangeInProgress):
        slow.conf_change(new, ConfChange(REMOVE, "n3"))


def test_leadership_transfer() -> None:
    sim = Simulator(3, seed=44)
    sim.one(b"before", 3)
    lead = sim.wait_leader()
    term = sim.core(lead).term
    target = next(n for n in sorted(sim.nodes) if n != lead)
    sim.transfer(lead, target)
    # While the transfer runs, the leader refuses proposals.
    if sim.core(lead).role is Role.LEADER:
        with pytest.raises(LeadershipTransferInProgress):
            sim.core(lead).propose(b"during")
    took = sim.run_until(lambda: sim.leader() == target, 3, "the target to lead")
    assert took <= 2
    assert sim.core(target).term == term + 1
    sim.one(b"after", 3)

    # Transfer to a follower that lags: it is caught up first.
    lead = target
    lagging = next(n for n in sorted(sim.nodes) if n != lead)
    sim.isolate(lagging)
    for k in range(5):
        sim.one(b"lag%d" % k, 2)
    sim.heal()
    sim.transfer(lead, lagging)
    sim.run_until(lambda: sim.leader() == lagging, 2 * ELECTION, "the lagging node to lead")
    sim.one(b"after2", 3)

    # A transfer to an unreachable node is abandoned after an election timeout.
    lead = lagging
    gone = next(n for n in sorted(sim.nodes) if n != lead)
    sim.isolate(gone)
    sim.transfer(lead, gone)
    with pytest.raises(LeadershipTransferInProgress):
        sim.core(lead).propose(b"x")
    sim.run_until(
        lambda: sim.core(lead).transfer_target is None, 2 * ELECTION, "the transfer to end"
    )
    assert sim.leader() == lead
    sim.heal()
    sim.one(b"after3", 3)

    # Refusals.
    follower = next(n for n in sorted(sim.nodes) if n != lead)
    with pytest.raises(NotLeader):
        sim.transfer(follower, lead)
    with pytest.raises(UnknownNode):
        sim.transfer(lead, "nobody")
