"""Crashes and restarts, figure 8, unreliable networks and churn."""

from __future__ import annotations

from _raft_scenarios import UNRELIABLE, churn, figure8, settle

from trio_dchan.raft.sim import NetworkConfig, Simulator
from trio_dchan.raft.types import MessageType, Role


def ring(sim: Simulator, lead: str, k: int) -> str:
    ids = sorted(sim.nodes)
    return ids[(ids.index(lead) + k) % len(ids)]


def test_persist1() -> None:
    sim = Simulator(3, seed=21)
    sim.one(b"11", 3)
    # Everyone crashes and restarts: the log survives.
    for n in sorted(sim.nodes):
        sim.crash(n)
    for n in sorted(sim.nodes):
        sim.restart(n)
    sim.one(b"12", 3)
    lead1 = sim.wait_leader()
    sim.crash(lead1)
    sim.restart(lead1)
    sim.one(b"13", 3)
    lead2 = sim.wait_leader()
    sim.crash(lead2)
    sim.one(b"14", 2)
    sim.restart(lead2)
    sim.run_until(lambda: sim.nodes[lead2].app.index >= sim.max_commit, 100, "lead2 catch-up")
    lead3 = sim.wait_leader()
    follower = ring(sim, lead3, 1)
    sim.crash(follower)
    sim.one(b"15", 2)
    sim.restart(follower)
    index = sim.one(b"16", 3)
    assert sim.n_applied(index, b"16") == 3


def test_persist2() -> None:
    sim = Simulator(5, seed=22)
    for it in range(5):
        sim.one(b"a%d" % it, 5)
        lead = sim.wait_leader()
        sim.crash(ring(sim, lead, 1))
        sim.crash(ring(sim, lead, 2))
        sim.one(b"b%d" % it, 3)
        sim.crash(lead)
        sim.crash(ring(sim, lead, 3))
        sim.crash(ring(sim, lead, 4))
        # Two nodes are back: no quorum, nothing commits.
        sim.restart(ring(sim, lead, 1))
        sim.restart(ring(sim, lead, 2))
        before = sim.max_commit
        sim.run_ticks(30)
        assert sim.max_commit == before
        sim.restart(ring(sim, lead, 3))
        sim.one(b"c%d" % it, 3)
        sim.restart(lead)
        sim.restart(ring(sim, lead, 4))
    sim.one(b"1000", 5)


def test_persist3() -> None:
    sim = Simulator(3, seed=23)
    sim.one(b"101", 3)
    lead = sim.wait_leader()
    sim.crash(ring(sim, lead, 2))
    i102 = sim.one(b"102", 2)
    sim.crash(lead)
    sim.crash(ring(sim, lead, 1))
    sim.restart(ring(sim, lead, 2))
    sim.restart(lead)
    # 102 was committed by lead and its follower; the node that missed it and
    # the old leader must still agree on it.
    index = sim.one(b"103", 2)
    assert index > i102
    sim.restart(ring(sim, lead, 1))
    sim.one(b"104", 3)
    assert sim.n_applied(i102, b"102") == 3


def test_figure8() -> None:
    scripted_figure8()
    sim = Simulator(5, seed=24)
    sim.one(b"start", 1)
    figure8(sim, iterations=300, unreliable=False)
    settle(sim, b"end")
    assert len(sim.leaders) > 10


def campaign(sim: Simulator, node: str) -> None:
    """Make ``node`` time out first and run its election to the end."""
    term = sim.core(node).term
    for _ in range(100):
        sim.tick_node(node)
        sim.deliver_all()
        core = sim.core(node)
        if core.role is Role.LEADER or (core.term > term + 1):
            return
    raise sim.fail(f"{node} did not campaign")


def scripted_figure8() -> None:
    """Figure 8 of the paper, step by step: an entry of an old term that a
    new leader replicated to a majority must not count as committed, because
    a server holding a newer-term entry at that index can still be elected
    and overwrite it."""
    ids = ["s1", "s2", "s3", "s4", "s5"]
    sim = Simulator(
        ids,
        seed=240,
        config={"max_entries_per_message": 1, "pre_vote": False, "check_quorum": False},
    )
    lead = sim.wait_leader()
    if lead != "s1":
        sim.transfer(lead, "s1")
        sim.run_until(lambda: sim.leader() == "s1", 50, "s1 to lead")
    sim.one(b"base", 5)
    sim.run_ticks(3)

    # (a) s1 leads and gets X (index i) to s2 only; then it crashes.
    sim.partition(["s1", "s2"], ["s3", "s4", "s5"])
    placed = sim.propose("s1", b"X")
    assert placed is not None
    i, term_x = placed
    sim.run_ticks(2)
    assert sim.core("s2").log_term(i) == term_x
    sim.crash("s1")

    # (b) s5 is elected by s3 and s4, appends its no-op at i, but nothing it
    # sends arrives; then it crashes.
    sim.partition(["s3", "s4", "s5"], ["s2"])
    sim.drop_filter = lambda m: m.sender == "s5" and m.type is MessageType.APPEND
    campaign(sim, "s5")
    assert sim.core("s5").role is Role.LEADER
    term_5 = sim.core("s5").term
    assert sim.core("s5").log_term(i) == term_5
    assert sim.core("s3").last_index == i - 1
    sim.crash("s5")
    sim.drop_filter = None

    # (c) s1 comes back and is elected with s2, s3, s4. It replicates X to
    # s3 and s4 (a majority holds X now) but its own no-op reaches only s2.
    sim.restart("s1")
    sim.partition(["s1", "s2", "s3", "s4"])
    sim.drop_filter = lambda m: (
        m.sender == "s1"
        and m.to in ("s3", "s4")
        and m.type is MessageType.APPEND
        and any(e.index > i for e in m.entries)
        and sim.core(m.to).log_term(i) == term_x
    )
    campaign(sim, "s1")
    if sim.core("s1").role is not Role.LEADER:
        campaign(sim, "s1")
    assert sim.core("s1").role is Role.LEADER
    sim.run_ticks(5)
    for node in ("s1", "s2", "s3", "s4"):
        assert sim.core(node).log_term(i) == term_x
    # The Figure 8 rule: X is on a majority but is of an older term, so it
    # is not committed yet.
    assert sim.core("s1").commit_index < i
    sim.crash("s1")
    sim.crash("s2")
    sim.drop_filter = None

    # (d) s5 returns and wins with s3 and s4 (its last entry has a newer term)
    # and replaces X at i. Had X been counted as committed, the simulator's
    # checks would fail right here.
    sim.restart("s5")
    sim.partition(["s3", "s4", "s5"])
    campaign(sim, "s5")
    if sim.core("s5").role is not Role.LEADER:
        campaign(sim, "s5")
    assert sim.core("s5").role is Role.LEADER
    index = sim.one(b"after", 3, nodes=["s5"])
    assert sim.core("s3").log_term(i) == term_5
    assert all(v != b"X" for node in sim.nodes.values() for v in node.app.log)
    sim.heal()
    sim.restart("s1")
    sim.restart("s2")
    sim.run_until(lambda: all(n.app.index >= index for n in sim.nodes.values()), 100, "everyone")


def test_unreliable_agree() -> None:
    sim = Simulator(5, seed=25, net=UNRELIABLE)
    sim.wait_leader()
    for it in range(40):
        lead = sim.leader()
        if lead is not None:
            for j in range(3):
                sim.propose(lead, b"bg%d-%d" % (it, j))
        sim.one(b"fg%d" % it, 1)
    sim.net = NetworkConfig()
    index = sim.one(b"100", 5)
    assert sim.n_applied(index, b"100") == 5


def test_figure8_unreliable() -> None:
    net = NetworkConfig(drop=0.1, duplicate=0.1, long_delay=0.1, long_delay_max=300, reorder=True)
    sim = Simulator(5, seed=26, net=net)
    sim.one(b"start", 1)
    figure8(sim, iterations=300, unreliable=True)
    settle(sim, b"end")


def test_reliable_churn() -> None:
    sim = Simulator(5, seed=27)
    accepted = churn(sim, rounds=150, unreliable=False)
    settle(sim, b"end")
    assert accepted > 50
    assert sim.max_commit > 50


def test_unreliable_churn() -> None:
    sim = Simulator(5, seed=28, net=UNRELIABLE)
    accepted = churn(sim, rounds=150, unreliable=True)
    settle(sim, b"end")
    assert accepted > 30
