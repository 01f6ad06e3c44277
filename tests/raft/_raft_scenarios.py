"""Scenarios shared by the Raft simulator tests (churn, figure 8) and the seed sweep."""

from __future__ import annotations

import os
import random

from trio_dchan.raft.errors import RaftError
from trio_dchan.raft.sim import NetworkConfig, Simulator
from trio_dchan.raft.types import ConfChange, ConfChangeType, Role

UNRELIABLE = NetworkConfig(
    drop=0.1, duplicate=0.05, long_delay=0.05, long_delay_max=150, reorder=True
)
RELIABLE = NetworkConfig()


def sweep_seeds(default: int) -> range:
    """Seeds for a sweep: ``RAFT_SEEDS`` raises the default count."""
    return range(int(os.environ.get("RAFT_SEEDS", default)))


def settle(sim: Simulator, tag: bytes) -> int:
    """Heal everything, restart every node, make the network reliable, then
    commit one more entry on every node and wait until all applied it."""
    sim.heal()
    sim.net = RELIABLE
    for node in list(sim.nodes):
        sim.restart(node)
    n = len(sim.nodes)
    index = sim.one(tag, n, max_ticks=600)
    sim.run_until(
        lambda: all(node.app.index >= index for node in sim.nodes.values()),
        200,
        "every node to apply the last entry",
    )
    return index


def churn(
    sim: Simulator,
    *,
    rounds: int,
    unreliable: bool,
    crash: bool = True,
    snapshots: bool = False,
) -> int:
    """Random crashes, restarts, partitions and proposals; returns how many
    proposals the leaders accepted. Safety is checked by the simulator after
    every step; liveness by :func:`settle` afterwards."""
    rng = random.Random(sim.seed * 7919 + 17)
    ids = sorted(sim.nodes)
    n = len(ids)
    accepted = 0
    for r in range(rounds):
        sim.net = UNRELIABLE if unreliable and rng.random() < 0.7 else RELIABLE
        for _ in range(rng.randint(1, 3)):
            lead = sim.leader()
            if lead is not None and sim.propose(lead, b"r%d-%d" % (r, accepted)) is not None:
                accepted += 1
        for _ in range(rng.randint(1, 8)):
            sim.tick()
            # Crash-restart voters in the middle of elections: a vote or a
            # term that was not persisted would let someone vote twice.
            voting = [
                i
                for i in sim.alive()
                if sim.core(i).role in (Role.CANDIDATE, Role.PRE_CANDIDATE) or sim.core(i).vote
            ]
            if crash and voting and rng.random() < 0.1:
                victim = rng.choice(voting)
                sim.crash(victim)
                sim.restart(victim)
        event = rng.random()
        lead = sim.leader()
        if crash and lead is not None and event < 0.08:
            sim.crash(lead)
        elif crash and event < 0.15:
            alive = sim.alive()
            if len(alive) > (n + 1) // 2:
                sim.crash(rng.choice(alive))
        elif crash and event < 0.35:
            dead = [i for i in ids if i not in sim.alive()]
            if dead:
                sim.restart(rng.choice(dead))
        elif event < 0.45:
            nodes = ids[:]
            rng.shuffle(nodes)
            cut = rng.randint(1, n - 1)
            sim.partition(nodes[:cut], nodes[cut:])
        elif event < 0.55:
            sim.isolate(rng.choice(ids))
        elif event < 0.75:
            sim.heal()
    return accepted


def figure8(sim: Simulator, *, iterations: int, unreliable: bool) -> None:
    """The figure 8 scenario: leaders that crash (or are cut off) right after
    appending entries, so that entries of old terms float around."""
    rng = random.Random(sim.seed * 104729 + 3)
    ids = sorted(sim.nodes)
    n = len(ids)
    up = set(ids)
    for it in range(iterations):
        lead = sim.leader()
        if lead is not None and (lead in up):
            sim.propose(lead, b"f%d" % it)
        if rng.random() < 0.1:
            sim.run_ticks(rng.randint(0, 20))
        else:
            sim.run_ticks(rng.randint(0, 2))
        lead = sim.leader()
        if lead is not None and lead in up and rng.random() < 0.5:
            if unreliable:
                sim.isolate(lead)
            else:
                sim.crash(lead)
            up.discard(lead)
        if len(up) < (n + 1) // 2:
            pick = rng.choice(sorted(set(ids) - up))
            if unreliable:
                # Reconnect it: rebuild the partition from the nodes still up.
                up.add(pick)
                sim.partition(sorted(up))
            else:
                sim.restart(pick)
                up.add(pick)


def membership_churn(sim: Simulator, *, rounds: int, unreliable: bool) -> int:
    """Churn plus membership changes (learners added and promoted, voters
    removed and re-added) and leadership transfers. Returns how many
    membership changes were accepted."""
    rng = random.Random(sim.seed * 6151 + 5)
    ids = sorted(sim.nodes)
    changes = 0
    for r in range(rounds):
        sim.net = UNRELIABLE if unreliable and rng.random() < 0.5 else RELIABLE
        lead = sim.leader()
        if lead is not None:
            sim.propose(lead, b"m%d" % r)
            conf = sim.core(lead).conf
            roll = rng.random()
            cc: ConfChange | None = None
            outsiders = [i for i in ids if i not in conf.members]
            if roll < 0.15 and outsiders:
                cc = ConfChange(ConfChangeType.ADD_LEARNER, rng.choice(outsiders))
            elif roll < 0.3 and conf.learners:
                cc = ConfChange(ConfChangeType.ADD_VOTER, rng.choice(sorted(conf.learners)))
            elif roll < 0.4 and len(conf.voters) > 3:
                cc = ConfChange(ConfChangeType.REMOVE_NODE, rng.choice(sorted(conf.voters)))
            elif roll < 0.45 and conf.learners:
                cc = ConfChange(ConfChangeType.REMOVE_NODE, rng.choice(sorted(conf.learners)))
            elif roll < 0.55:
                target = rng.choice(sorted(conf.voters))
                try:
                    sim.transfer(lead, target)
                except RaftError:
                    pass
            if cc is not None:
                try:
                    sim.conf_change(lead, cc)
                    changes += 1
                except RaftError:
                    pass
        sim.run_ticks(rng.randint(1, 6))
        event = rng.random()
        if event < 0.1:
            alive = sim.alive()
            if len(alive) > len(ids) - 1:
                sim.crash(rng.choice(alive))
        elif event < 0.3:
            for dead in [i for i in ids if i not in sim.alive()]:
                sim.restart(dead)
        elif event < 0.38:
            sim.isolate(rng.choice(ids))
        elif event < 0.55:
            sim.heal()
    return changes


def settle_members(sim: Simulator, tag: bytes) -> int:
    """Like :func:`settle`, for a cluster whose membership changed: every
    current member (voter or learner, per the leader) applies one more entry.
    Nodes that were removed, or whose addition was never committed, are left
    alone: nobody replicates to them any more."""
    sim.heal()
    sim.net = RELIABLE
    for node in list(sim.nodes):
        sim.restart(node)
    index = sim.one(tag, 1, max_ticks=600)

    def members_applied() -> bool:
        lead = sim.leader()
        if lead is None:
            return False
        members = sim.core(lead).conf.members
        return all(sim.nodes[m].app.index >= index for m in members)

    sim.run_until(members_applied, 400, "every member to apply the last entry")
    return index
