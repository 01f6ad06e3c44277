"""Crashes and restarts, figure 8, unreliable networks and churn."""

from __future__ import annotations

from _raft_scenarios import UNRELIABLE, churn, figure8, settle

from trio_dchan.raft.sim import NetworkConfig, Simulator


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
    sim = Simulator(5, seed=24)
    sim.one(b"start", 1)
    figure8(sim, iterations=300, unreliable=False)
    settle(sim, b"end")
    assert len(sim.leaders) > 10


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
    net = NetworkConfig(drop=0.1, duplicate=0.1, long_delay=0.1, long_delay_max=300)
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
