"""Throughput of the pure Raft core: committed entries per CPU-second.

A 3-node and a 5-node cluster run in the deterministic simulator on a
perfect network (no loss, tiny delays, invariant checks off, so that what is
measured is the core plus the minimal persist/send/apply loop). Commands are
64 bytes. "batched" proposes 1,000 commands per ``propose_many`` call (what
the Trio driver does with queued proposals); "unbatched" proposes one
command per Ready and lets the cluster settle before the next, the baseline
the ratios are taken against. Time is ``time.process_time()``.

Run: ``.venv/bin/python benchmarks/bench_raft_core.py``. The last line is one
JSON object with every figure.
"""

from __future__ import annotations

import json
import time

from trio_dchan.raft.sim import NetworkConfig, Simulator

COMMAND = b"x" * 64
TARGET = 100_000  # committed entries per CPU-second, 3 nodes, batched


def make_cluster(n: int) -> tuple[Simulator, str]:
    sim = Simulator(n, seed=1, net=NetworkConfig(min_delay=1, max_delay=1), check=False)
    lead = sim.wait_leader()
    sim.run_until(lambda: all(sim.core(x).leader == lead for x in sim.nodes), 50)
    return sim, lead


def wait_applied(sim: Simulator, index: int) -> None:
    while any(node.app.index < index for node in sim.nodes.values()):
        sim.deliver_all()
        if any(node.app.index < index for node in sim.nodes.values()):
            sim.tick()


def run_batched(n: int, total: int, batch: int = 1000) -> float:
    sim, lead = make_cluster(n)
    commands = [COMMAND] * batch
    start = time.process_time()
    last = 0
    for _ in range(total // batch):
        placed = sim.propose_many(lead, commands)
        if placed is None:
            raise RuntimeError("leader lost during the benchmark")
        last = placed[0]
        sim.deliver_all()
    wait_applied(sim, last)
    elapsed = time.process_time() - start
    return total / elapsed


def run_unbatched(n: int, total: int) -> float:
    sim, lead = make_cluster(n)
    start = time.process_time()
    last = 0
    for _ in range(total):
        placed = sim.propose(lead, COMMAND)
        if placed is None:
            raise RuntimeError("leader lost during the benchmark")
        last = placed[0]
        sim.deliver_all()
    wait_applied(sim, last)
    elapsed = time.process_time() - start
    return total / elapsed


def best_of(runs: int, fn: object, *args: int) -> float:
    return max(fn(*args) for _ in range(runs))  # type: ignore[operator]


def main() -> None:
    results: dict[str, float] = {}
    for n in (3, 5):
        unbatched = best_of(3, run_unbatched, n, 5_000)
        batched = best_of(3, run_batched, n, 200_000)
        results[f"nodes{n}_unbatched_entries_per_cpu_s"] = round(unbatched)
        results[f"nodes{n}_batched_entries_per_cpu_s"] = round(batched)
        results[f"nodes{n}_batched_vs_unbatched"] = round(batched / unbatched, 2)
        print(
            f"{n} nodes: unbatched {unbatched:>10,.0f} entries/CPU-s (baseline)   "
            f"batched {batched:>10,.0f} entries/CPU-s   ratio {batched / unbatched:.1f}x"
        )
    ratio = results["nodes3_batched_entries_per_cpu_s"] / TARGET
    results["nodes3_batched_vs_target"] = round(ratio, 2)
    print(f"3 nodes batched vs the {TARGET:,}/CPU-s target: {ratio:.2f}x")
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
