"""The simulator itself: seed replay, and the seed sweep over churn scenarios."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _raft_scenarios import (
    UNRELIABLE,
    churn,
    membership_churn,
    settle,
    settle_members,
    sweep_seeds,
)

from trio_dchan.raft.sim import SimulationError, Simulator

HERE = Path(__file__).parent

#: Seeds the sweep covers by default (CI); RAFT_SEEDS=N raises it locally.
DEFAULT_SEEDS = 200


def run_churn(seed: int, *, rounds: int = 60, trace: bool = False) -> Simulator:
    """One sweep scenario, chosen by the seed: churn (crashes, restarts,
    partitions) on a reliable or lossy network, with or without snapshots, or
    the same with membership changes and leadership transfers; then heal and
    check that the cluster converges."""
    unreliable = seed % 2 == 1
    net = UNRELIABLE if unreliable else None
    snapshot_every = 8 if seed % 3 == 0 else 0
    config = {"snapshot_chunk_size": 128}
    if seed % 4 == 3:
        sim = Simulator(
            3,
            seed=seed,
            joiners=["n4", "n5", "n6"],
            net=net,
            snapshot_every=snapshot_every,
            config=config,
            record_trace=trace,
        )
        membership_churn(sim, rounds=rounds, unreliable=unreliable)
        settle_members(sim, b"end-%d" % seed)
        return sim
    sim = Simulator(
        5,
        seed=seed,
        net=net,
        snapshot_every=snapshot_every,
        config=config,
        record_trace=trace,
    )
    churn(sim, rounds=rounds, unreliable=unreliable)
    settle(sim, b"end-%d" % seed)
    return sim


def trace_digest(sim: Simulator) -> str:
    return hashlib.sha256(repr(sim.trace).encode()).hexdigest()


def test_seed_replay() -> None:
    a = run_churn(1234, trace=True)
    b = run_churn(1234, trace=True)
    assert a.trace is not None
    assert len(a.trace) > 1000
    assert a.trace == b.trace
    assert a.max_commit == b.max_commit
    assert run_churn(1235, trace=True).trace != a.trace
    # Another process, with another hash seed, replays the very same trace.
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from test_raft_sim import run_churn, trace_digest
        print(trace_digest(run_churn(1234, trace=True)))
        """
    )
    env = dict(os.environ, PYTHONHASHSEED="4321")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == trace_digest(a)


def test_failure_names_the_seed() -> None:
    sim = Simulator(3, seed=987)
    with pytest.raises(SimulationError, match="SEED=987 to replay"):
        sim.run_until(lambda: False, 3, "the impossible")


def test_seed_sweep() -> None:
    seeds = sweep_seeds(DEFAULT_SEEDS)
    committed = 0
    for seed in seeds:
        # A failure raises SimulationError naming the seed to replay.
        sim = run_churn(seed)
        committed += sim.max_commit
    assert committed > 10 * len(seeds)
