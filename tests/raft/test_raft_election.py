"""Leader election: the paper's election rules, pre-vote and check-quorum."""

from __future__ import annotations

import random

from trio_dchan.raft.sim import Simulator
from trio_dchan.raft.types import Role

ELECTION = 10  # election_ticks used by the simulator's defaults


def assert_agreed_leader(sim: Simulator, lead: str) -> None:
    core = sim.core(lead)
    for node in sim.alive():
        if sim.connected(node, lead):
            c = sim.core(node)
            assert c.term == core.term, sim.fail(f"{node} is in term {c.term}")
            assert c.leader == lead, sim.fail(f"{node} follows {c.leader}")


def test_initial_election() -> None:
    sim = Simulator(3, seed=1)
    lead = sim.wait_leader(max_ticks=5 * ELECTION)
    sim.run_ticks(2)
    assert_agreed_leader(sim, lead)
    term = sim.core(lead).term
    # Nothing goes wrong, so nothing changes: no new election.
    sim.run_ticks(10 * ELECTION)
    assert sim.leader() == lead
    assert all(sim.core(n).term == term for n in sim.alive())
    assert len(sim.leaders) == 1


def test_re_election() -> None:
    sim = Simulator(3, seed=2)
    lead1 = sim.wait_leader()
    others = [n for n in sim.alive() if n != lead1]

    # The leader is cut off: the other two elect a new one.
    sim.isolate(lead1)
    lead2 = sim.wait_leader(among=others, max_ticks=5 * ELECTION)
    assert lead2 != lead1
    assert sim.core(lead2).term > sim.core(lead1).term

    # The old leader comes back: it must not disturb the new one, and it
    # follows once it hears from it.
    sim.heal()
    sim.run_until(lambda: sim.core(lead1).leader == lead2, 5 * ELECTION, "old leader to follow")
    assert sim.leaders_now() == [lead2]

    # Without a quorum nobody can be elected.
    third = next(n for n in sim.alive() if n not in (lead1, lead2))
    sim.partition([lead2], [lead1], [third])
    sim.run_ticks(6 * ELECTION)
    assert sim.leaders_now() == [], sim.fail(f"leaders without quorum: {sim.leaders_now()}")

    # A quorum again: a leader again.
    sim.partition([lead1, third], [lead2])
    sim.wait_leader(among=[lead1, third], max_ticks=6 * ELECTION)
    sim.heal()
    lead = sim.wait_leader()
    sim.run_ticks(3 * ELECTION)
    assert sim.leaders_now() == [sim.leader()]
    assert_agreed_leader(sim, sim.leader() or lead)


def test_many_elections() -> None:
    sim = Simulator(7, seed=3)
    sim.wait_leader()
    rng = random.Random(3)
    ids = sorted(sim.nodes)
    for _ in range(10):
        cut = rng.sample(ids, 3)
        rest = [n for n in ids if n not in cut]
        sim.partition(rest, *([c] for c in cut))

        # Within the majority, one leader is elected and everyone follows it.
        def settled(rest: list[str] = rest) -> bool:
            lead = sim.leader_among(set(rest))
            return lead is not None and all(sim.core(n).leader == lead for n in rest)

        sim.run_until(settled, 8 * ELECTION, "the majority to agree on a leader")
        for c in cut:
            assert (
                sim.core(c).role is not Role.LEADER
                or sim.core(c).term < sim.core(sim.leader_among(set(rest)) or rest[0]).term
            )
        sim.heal()
    sim.wait_leader()
    # At most one leader per term held throughout (checked at every step);
    # every term that had a leader had exactly one.
    assert len(sim.leaders) >= 2


def test_prevote_isolated_rejoin() -> None:
    for pre_vote in (True, False):
        sim = Simulator(3, seed=4, config={"pre_vote": pre_vote})
        lead = sim.wait_leader()
        sim.run_ticks(5)
        term = sim.core(lead).term
        follower = next(n for n in sim.alive() if n != lead)
        sim.isolate(follower)
        sim.run_ticks(20 * ELECTION)
        if pre_vote:
            # Pre-votes fail, so the isolated node never raises its term.
            assert sim.core(follower).term == term
        else:
            assert sim.core(follower).term > term
        sim.heal()
        sim.run_ticks(5 * ELECTION)
        if pre_vote:
            assert sim.leader() == lead
            assert sim.core(lead).term == term, sim.fail("the rejoining node disturbed the leader")
            assert sim.core(follower).leader == lead
        else:
            # Without pre-vote the rejoining node's higher term deposes the leader:
            # the case pre-vote exists for.
            assert sim.core(sim.wait_leader()).term > term


def test_check_quorum_step_down() -> None:
    sim = Simulator(5, seed=5)
    lead = sim.wait_leader()
    ids = sorted(sim.nodes)
    buddy = next(n for n in ids if n != lead)
    majority = [n for n in ids if n not in (lead, buddy)]
    sim.partition([lead, buddy], majority)
    # The cut-off leader notices it lost its quorum and steps down, even
    # though nobody told it about a newer term.
    took = sim.run_until(
        lambda: sim.core(lead).role is not Role.LEADER, 3 * ELECTION, "the old leader to step down"
    )
    assert took <= 2 * ELECTION + 1
    new = sim.wait_leader(among=majority)
    assert new in majority
    # And with check-quorum off it would have stayed leader (nothing forces it down).
    sim2 = Simulator(5, seed=5, config={"check_quorum": False})
    lead2 = sim2.wait_leader()
    buddy2 = next(n for n in ids if n != lead2)
    sim2.partition([lead2, buddy2], [n for n in ids if n not in (lead2, buddy2)])
    sim2.run_ticks(6 * ELECTION)
    assert sim2.core(lead2).role is Role.LEADER


def test_single_node_cluster() -> None:
    sim = Simulator(1, seed=6, snapshot_every=5)
    lead = sim.wait_leader(max_ticks=3 * ELECTION)
    for k in range(12):
        sim.one(b"solo%d" % k, 1)
    sim.crash(lead)
    sim.restart(lead)
    assert sim.wait_leader() == lead
    index = sim.one(b"again", 1)
    assert sim.nodes[lead].app.log[index - 1] == b"again"
    assert sim.nodes[lead].app.log.count(b"solo11") == 1
