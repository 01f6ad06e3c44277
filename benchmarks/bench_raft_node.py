"""Benchmark: whole Raft nodes (driver + FileStorage) over the in-memory network.

Three nodes run in one process and one Trio loop, each with a real
``FileStorage`` in a temporary directory (every save is fsynced). Measured:

* throughput: committed proposals per second with 64 concurrent proposers
  (target >= 20,000/s, thanks to batching + group commit);
* latency: p50/p99 commit latency with one proposer (target p50 <= 2 ms);
* both with ``storage.save`` inline and in a worker thread, with in-memory
  storage (``data_dir=None``), and with files on tmpfs (same code, near-free
  fsync: the driver's own cost without this disk's latency);
* fail-over: wall time from crashing the leader to the first new commit, at
  the default settings.

Baseline measured in the same run: the cost of one ``os.write + fsync`` on
the same disk, i.e. what "one fsync per proposal" would allow. Ends with one
JSON line holding every figure.

Run: ``.venv/bin/python benchmarks/bench_raft_node.py`` (about a minute).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from trio_dchan.raft.node import RaftNode, RaftSettings, open_raft_node
from trio_dchan.raft.storage import FileStorage, MemoryStorage
from trio_dchan.raft.transport import MemoryNetwork
from trio_dchan.raft.types import ConfState, Entry, Role

IDS = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]
COMMAND = b"x" * 64
THROUGHPUT_SECONDS = float(os.environ.get("BENCH_SECONDS", "4"))
LATENCY_SAMPLES = int(os.environ.get("BENCH_LATENCY_SAMPLES", "3000"))


class CountingMachine:
    """The cheapest deterministic state machine: counts applied commands."""

    def __init__(self) -> None:
        self.count = 0

    def apply(self, entry: Entry) -> object:
        self.count += 1
        return self.count

    def snapshot(self) -> bytes:
        return self.count.to_bytes(8, "big")

    def restore(self, data: bytes) -> None:
        self.count = int.from_bytes(data, "big")


def fsync_baseline(directory: Path, rounds: int = 2000) -> float:
    """Seconds per (append 100 bytes + fdatasync) on this disk."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(rounds):
            os.write(fd, b"y" * 100)
            os.fdatasync(fd)
        return (time.perf_counter() - start) / rounds
    finally:
        os.close(fd)
        path.unlink()


class Hosted:
    def __init__(self, nursery: trio.Nursery, settings: RaftSettings, data_dir: Path | None):
        self.nursery = nursery
        self.settings = settings
        self.data_dir = data_dir
        self.network = MemoryNetwork(random.Random(1))
        self.nodes: dict[str, RaftNode] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.storages: dict[str, Any] = {}

    async def start_all(self) -> None:
        conf = ConfState(voters=frozenset(IDS))
        for number, node_id in enumerate(IDS):
            if self.data_dir is None:
                storage: Any = MemoryStorage()
            else:
                storage = FileStorage(
                    self.data_dir / f"node{number}", cluster_id="bench", node_id=node_id
                )
            self.storages[node_id] = storage
            await self.nursery.start(functools.partial(self._host, node_id, storage, conf))

    async def _host(
        self,
        node_id: str,
        storage: Any,
        conf: ConfState,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            self.scopes[node_id] = scope
            async with open_raft_node(
                node_id,
                storage=storage,
                state_machine=CountingMachine(),
                transport_factory=functools.partial(self.network.transport_for, node_id),
                settings=self.settings,
                initial_conf=conf,
                rng=random.Random(node_id),
            ) as node:
                self.nodes[node_id] = node
                task_status.started()
                await trio.sleep_forever()
        self.nodes.pop(node_id, None)

    def crash(self, node_id: str) -> None:
        self.scopes[node_id].cancel()
        self.network.detach(node_id)
        self.nodes.pop(node_id, None)

    async def leader(self) -> RaftNode:
        while True:
            leaders = [n for n in self.nodes.values() if n.role == Role.LEADER]
            if len(leaders) == 1 and all(n.leader == leaders[0].id for n in self.nodes.values()):
                return leaders[0]
            await trio.sleep(self.settings.tick_interval)

    def close(self) -> None:
        for storage in self.storages.values():
            storage.close()


async def measure(settings: RaftSettings, data_dir: Path | None) -> dict[str, float]:
    out: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        hosted = Hosted(nursery, settings, data_dir)
        await hosted.start_all()
        leader = await hosted.leader()
        # Warm up.
        for _ in range(200):
            await leader.propose(COMMAND)

        # Throughput: 64 proposers for THROUGHPUT_SECONDS.
        committed = 0
        saves_before = sum(n.stats_saves for n in hosted.nodes.values())
        batches_before = leader.stats_batches
        deadline = time.perf_counter() + THROUGHPUT_SECONDS

        async def proposer() -> None:
            nonlocal committed
            while time.perf_counter() < deadline:
                await leader.propose(COMMAND)
                committed += 1

        start = time.perf_counter()
        async with trio.open_nursery() as proposers:
            for _ in range(64):
                proposers.start_soon(proposer)
        elapsed = time.perf_counter() - start
        out["throughput_per_s"] = committed / elapsed
        batches = leader.stats_batches - batches_before
        out["mean_batch"] = committed / batches if batches else 0.0
        saves = sum(n.stats_saves for n in hosted.nodes.values()) - saves_before
        out["saves_per_s"] = saves / elapsed

        # Latency: one proposer.
        samples = []
        for _ in range(LATENCY_SAMPLES):
            t0 = time.perf_counter()
            await leader.propose(COMMAND)
            samples.append(time.perf_counter() - t0)
        samples.sort()
        out["p50_ms"] = statistics.median(samples) * 1000
        out["p99_ms"] = samples[int(len(samples) * 0.99)] * 1000
        nursery.cancel_scope.cancel()
    hosted.close()
    return out


async def measure_failover(settings: RaftSettings, data_dir: Path, rounds: int = 3) -> float:
    """Mean seconds from crashing the leader to the first commit under a new one."""
    times = []
    for attempt in range(rounds):
        async with trio.open_nursery() as nursery:
            hosted = Hosted(nursery, settings, data_dir / f"failover{attempt}")
            await hosted.start_all()
            leader = await hosted.leader()
            for _ in range(50):
                await leader.propose(COMMAND)
            survivor = next(n for n in hosted.nodes.values() if n is not leader)
            start = time.perf_counter()
            hosted.crash(leader.id)
            while True:
                try:
                    await survivor.propose(COMMAND)
                    break
                except Exception:
                    await trio.sleep(0.005)
            times.append(time.perf_counter() - start)
            nursery.cancel_scope.cancel()
        hosted.close()
    return statistics.mean(times)


def tmpfs_dir() -> Path | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="bench-raft-node-", dir=shm))
    return None


async def main() -> None:
    results: dict[str, float] = {}
    defaults = RaftSettings()
    with tempfile.TemporaryDirectory(prefix="bench-raft-node-") as tmp:
        root = Path(tmp)
        fsync_s = fsync_baseline(root)
        results["baseline_fsync_us"] = fsync_s * 1e6
        results["baseline_one_fsync_per_proposal_per_s"] = 1 / fsync_s
        variants = {
            "file_inline": (dataclasses.replace(defaults, persist_in_thread=False), root / "a"),
            "file_thread": (dataclasses.replace(defaults, persist_in_thread=True), root / "b"),
            "memory": (dataclasses.replace(defaults, persist_in_thread=False), None),
        }
        tmpfs = tmpfs_dir()
        if tmpfs is not None:
            # The same FileStorage code and syscalls with a near-free fsync: separates
            # the driver's own cost from this disk's fsync latency.
            variants["tmpfs_inline"] = (
                dataclasses.replace(defaults, persist_in_thread=False),
                tmpfs / "inline",
            )
            variants["tmpfs_thread"] = (defaults, tmpfs / "thread")
        for name, (settings, data_dir) in variants.items():
            figures = await measure(settings, data_dir)
            for key, value in figures.items():
                results[f"{name}_{key}"] = value
            print(
                f"{name:12s} {figures['throughput_per_s']:9.0f} proposals/s "
                f"(mean batch {figures['mean_batch']:.1f}, {figures['saves_per_s']:.0f} saves/s)  "
                f"p50 {figures['p50_ms']:.3f} ms  p99 {figures['p99_ms']:.3f} ms",
                flush=True,
            )
        results["failover_s"] = await measure_failover(defaults, root / "f")
        if tmpfs is not None:
            shutil.rmtree(tmpfs, ignore_errors=True)
    chosen = "file_inline" if defaults.persist_in_thread is False else "file_thread"
    results["chosen_throughput_per_s"] = results[f"{chosen}_throughput_per_s"]
    results["chosen_p50_ms"] = results[f"{chosen}_p50_ms"]
    results["chosen_p99_ms"] = results[f"{chosen}_p99_ms"]
    results["ratio_throughput_vs_one_fsync_per_proposal"] = (
        results["chosen_throughput_per_s"] / results["baseline_one_fsync_per_proposal_per_s"]
    )
    results["ratio_throughput_vs_target_20000"] = results["chosen_throughput_per_s"] / 20000
    results["ratio_p50_vs_target_2ms"] = results["chosen_p50_ms"] / 2.0
    results["ratio_thread_vs_inline_throughput"] = (
        results["file_thread_throughput_per_s"] / results["file_inline_throughput_per_s"]
    )
    results["ratio_thread_vs_inline_p50"] = (
        results["file_thread_p50_ms"] / results["file_inline_p50_ms"]
    )
    results["ratio_file_vs_memory_throughput"] = (
        results["chosen_throughput_per_s"] / results["memory_throughput_per_s"]
    )
    results["ratio_failover_vs_pysyncobj_0_8s"] = results["failover_s"] / 0.8
    print(
        f"fsync baseline {results['baseline_fsync_us']:.0f} us -> "
        f"{results['baseline_one_fsync_per_proposal_per_s']:.0f}/s with one fsync per proposal; "
        f"chosen ({chosen}) is x{results['ratio_throughput_vs_one_fsync_per_proposal']:.1f} that"
    )
    print(
        f"fail-over after a leader crash: {results['failover_s'] * 1000:.0f} ms (PySyncObj ~800 ms)"
    )
    print(json.dumps({k: round(v, 4) for k, v in results.items()}, sort_keys=True))


if __name__ == "__main__":
    sys.exit(trio.run(main))
