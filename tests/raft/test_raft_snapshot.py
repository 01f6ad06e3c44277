"""Snapshots, log compaction and InstallSnapshot (chunked)."""

from __future__ import annotations

from _raft_scenarios import UNRELIABLE, settle

from trio_dchan.raft.sim import NetworkConfig, Simulator
from trio_dchan.raft.types import MessageType

SNAP_EVERY = 10
#: Small chunks so that every snapshot travels in several messages.
CONFIG = {"snapshot_chunk_size": 64}


def assert_compacted(sim: Simulator, node: str) -> None:
    core = sim.core(node)
    assert core.snapshot is not None, sim.fail(f"{node} never took a snapshot")
    # The log holds only what came after the last snapshot.
    assert core.last_index - core.first_index + 1 <= 3 * SNAP_EVERY


def test_snapshot_basic() -> None:
    sim = Simulator(3, seed=31, snapshot_every=SNAP_EVERY, config=CONFIG)
    for k in range(60):
        sim.one(b"s%d" % k, 3)
    for node in sim.nodes:
        assert_compacted(sim, node)
        snap = sim.nodes[node].snapshot
        assert snap is not None
        assert snap.meta.index >= 50
        assert sim.nodes[node].entries == [] or sim.nodes[node].entries[0].index > snap.meta.index
    # Nobody needed an InstallSnapshot: every node kept up.
    assert sim.sent[MessageType.SNAPSHOT] == 0


def lag_and_catch_up(sim: Simulator, *, crash: bool, rounds: int) -> None:
    for r in range(rounds):
        lead = sim.wait_leader()
        victim = next(n for n in sorted(sim.nodes) if n != lead)
        if crash:
            sim.crash(victim)
        else:
            sim.isolate(victim)
        others = [n for n in sim.nodes if n != victim]
        for k in range(3 * SNAP_EVERY):
            sim.one(b"r%d-%d" % (r, k), 2, nodes=others)
        before = sim.sent[MessageType.SNAPSHOT]
        if crash:
            sim.restart(victim)
        else:
            sim.heal()
        index = sim.one(b"r%d-back" % r, 3)
        sim.run_until(
            lambda index=index, v=victim: sim.nodes[v].app.index >= index, 200, "catch-up"
        )
        # The leader had compacted past what the victim had: it sent a snapshot,
        # in several chunks.
        assert sim.sent[MessageType.SNAPSHOT] - before >= 2, sim.fail("no chunked snapshot sent")
        assert_compacted(sim, victim)


def test_snapshot_install() -> None:
    sim = Simulator(3, seed=32, snapshot_every=SNAP_EVERY, config=CONFIG, record_trace=True)
    lag_and_catch_up(sim, crash=False, rounds=3)
    assert any(t[1] == "install" for t in sim.trace or [])


def test_snapshot_install_unreliable() -> None:
    sim = Simulator(3, seed=33, snapshot_every=SNAP_EVERY, config=CONFIG, net=UNRELIABLE)
    lag_and_catch_up(sim, crash=False, rounds=3)
    sim.net = NetworkConfig()
    settle(sim, b"end")


def test_snapshot_install_crash() -> None:
    sim = Simulator(3, seed=34, snapshot_every=SNAP_EVERY, config=CONFIG)
    lag_and_catch_up(sim, crash=True, rounds=3)
    settle(sim, b"end")


def test_snapshot_all_crash() -> None:
    sim = Simulator(3, seed=35, snapshot_every=SNAP_EVERY, config=CONFIG)
    commits: dict[str, int] = {}
    for r in range(5):
        for k in range(SNAP_EVERY + 3):
            sim.one(b"a%d-%d" % (r, k), 3)
        for node in sorted(sim.nodes):
            commits[node] = sim.core(node).commit_index
            sim.crash(node)
        for node in sorted(sim.nodes):
            sim.restart(node)
            # The commit index survives the crash (it never goes back).
            assert sim.core(node).commit_index >= sim.nodes[node].hard_state.commit
            assert sim.core(node).commit_index >= min(
                commits[node], sim.nodes[node].hard_state.commit
            )
        index = sim.one(b"after%d" % r, 3)
        for node in sim.nodes:
            assert sim.core(node).commit_index >= commits[node]
        assert sim.n_applied(index, b"after%d" % r) == 3


def test_snapshot_init() -> None:
    sim = Simulator(3, seed=36, snapshot_every=SNAP_EVERY, config=CONFIG)
    for k in range(25):
        sim.one(b"i%d" % k, 3)
    snaps = {n: sim.nodes[n].snapshot for n in sim.nodes}
    assert all(s is not None and s.meta.index >= 20 for s in snaps.values())
    for node in sorted(sim.nodes):
        sim.crash(node)
    for node in sorted(sim.nodes):
        sim.restart(node)
        core = sim.core(node)
        snap = snaps[node]
        assert snap is not None
        # A restarted node starts from its snapshot: the state machine is
        # restored from it and the core's log begins right after it.
        assert core.first_index == snap.meta.index + 1
        assert core.applied_index >= snap.meta.index
        assert sim.nodes[node].app.index >= snap.meta.index
        assert core.conf == snap.meta.conf
    index = sim.one(b"after", 3)
    # A second crash right after, before any new snapshot, also recovers.
    for node in sorted(sim.nodes):
        sim.crash(node)
        sim.restart(node)
    sim.one(b"after2", 3)
    assert sim.n_applied(index, b"after") == 3


def test_a_snapshot_transfer_finishes_while_the_leader_keeps_compacting() -> None:
    # A follower that was cut off needs a snapshot of ~20 KB sent in 256-byte
    # chunks (about 80 round trips), while steady writes make the leader
    # compact every ~20 ticks. Restarting the transfer with each newer
    # snapshot, it would never finish; the leader keeps streaming the one it
    # began with, and the follower then catches up from there.
    for seed in range(4):
        sim = Simulator(3, seed=seed, snapshot_every=5, config={"snapshot_chunk_size": 256})
        leader = sim.wait_leader()
        lagging = next(n for n in sorted(sim.nodes) if n != leader)
        sim.isolate(lagging)
        for i in range(200):
            sim.one(b"x" * 60 + b"%d" % i, 2, nodes=[leader])
        sim.heal()
        for tick in range(400):
            if tick % 4 == 0:
                sim.propose(sim.leader(), b"y" * 60 + b"%d" % tick)
            sim.tick()
            if sim.nodes[lagging].app.index >= 200:
                break
        else:
            raise AssertionError(
                f"seed {seed}: {lagging} still at applied {sim.nodes[lagging].app.index} "
                "after 400 ticks of steady writes"
            )
