"""Crash consistency with real files: three nodes, repeated crashes, one history.

Each node keeps its log in a real ``FileStorage`` under a temporary
directory. Client tasks keep proposing unique commands through random nodes
while nodes crash in two ways, then restart from their directories:

* the node's cancel scope is cancelled, with no shutdown of any kind;
* a save is cut short: the entries it wrote reach the file but the fsync
  never "returns" — the newest segment is truncated at a random byte offset
  past the last completed fsync, and the hard state of that save is never
  written (storage writes entries before the hard state).

At the end every node must hold the same applied sequence (one is a prefix
of the other before they catch up; identical after), with no duplicates, and
every command whose ``propose`` returned must be in it.
"""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from _node_harness import TEST_SETTINGS, Cluster, RecordingMachine

from trio_dchan.errors import DchanError
from trio_dchan.raft.storage import FileStorage
from trio_dchan.raft.types import Entry, HardState, Snapshot

IDS = ["n1", "n2", "n3"]
SEGMENT_HEADER_BYTES = 16
TORN_SAVES: list[str] = []


class SimulatedCrash(Exception):
    """The process "died" inside ``save``."""


class CrashableStorage(FileStorage):
    """A FileStorage whose next save can be cut short like a power loss."""

    def __init__(self, path: Path, node_id: str, rng: random.Random) -> None:
        super().__init__(path, cluster_id="crash-test", node_id=node_id, segment_bytes=4096)
        self.rng = rng
        self.armed = False

    def _newest_segment(self) -> tuple[Path, int] | None:
        segments = sorted(self.path.glob("log-*.seg"))
        if not segments:
            return None
        return segments[-1], segments[-1].stat().st_size

    def save(
        self, hard_state: HardState | None, entries: list[Entry], snapshot: Snapshot | None
    ) -> None:  # type: ignore[override]
        if not (self.armed and entries and snapshot is None):
            super().save(hard_state, entries, snapshot)
            return
        before = self._newest_segment()
        # Entries are written (and would be fsynced) before the hard state:
        # dying in between loses the hard state of this save.
        super().save(None, entries, None)
        after = self._newest_segment()
        assert after is not None
        path, size = after
        floor = before[1] if before is not None and before[0] == path else SEGMENT_HEADER_BYTES
        if size > floor:
            cut = self.rng.randrange(floor, size)
            os.truncate(path, cut)
        TORN_SAVES.append(self.node_id)
        raise SimulatedCrash(f"torn save on {self.node_id}")


@pytest.fixture
def data_root() -> Iterator[Path]:
    """A temporary directory, on tmpfs when there is one.

    The crashes here are process crashes simulated in-process (the page
    cache survives them), so what matters is the files' content, not how
    long fsync takes on a disk shared with other work.
    """
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="raft-crash-", dir=base) as tmp:
        yield Path(tmp)


#: ``CRASH_SEEDS=N`` runs N seeds instead of the two CI runs.
SEEDS = list(range(int(os.environ.get("CRASH_SEEDS", "2"))))


@pytest.mark.parametrize("seed", SEEDS)
async def test_crashes_never_lose_or_duplicate_committed_proposals(
    autojump_clock: trio.testing.MockClock, data_root: Path, seed: int
) -> None:
    TORN_SAVES.clear()
    rng = random.Random(2024 + seed)
    settings = dataclasses.replace(TEST_SETTINGS, snapshot_every=40, proposal_timeout=2.0)
    acknowledged: list[bytes] = []
    outcomes: dict[str, int] = {}

    def open_storage(node_id: str) -> CrashableStorage:
        return CrashableStorage(data_root / node_id, node_id, random.Random(rng.random()))

    async with trio.open_nursery() as nursery:
        cluster = Cluster(
            nursery, IDS, seed=99 + seed, settings=settings, storage_factory=open_storage
        )
        await cluster.start_all()
        stop = trio.Event()

        async def client(worker: int) -> None:
            seq = 0
            local = random.Random(worker)
            while not stop.is_set():
                running = [n for n in cluster.nodes.values() if n.running]
                if not running:
                    await trio.sleep(0.01)
                    continue
                node = local.choice(running)
                command = b"w%d-%d" % (worker, seq)
                seq += 1
                try:
                    await node.propose(command)
                except DchanError as exc:
                    name = type(exc).__name__
                    outcomes[name] = outcomes.get(name, 0) + 1
                else:
                    acknowledged.append(command)
                # Think time: under MockClock, time only moves when every task waits.
                await trio.sleep(local.uniform(0.002, 0.02))

        async def restart(node_id: str) -> None:
            storage = cluster.storages[node_id]
            storage.close()  # the "process" is gone: its lock goes with it
            cluster.storages[node_id] = open_storage(node_id)
            await cluster.start(node_id)

        with trio.fail_after(120):
            await cluster.wait_leader()
            async with trio.open_nursery() as clients:
                for worker in range(6):
                    clients.start_soon(client, worker)
                for round_ in range(12):
                    await trio.sleep(rng.uniform(0.05, 0.4))
                    victim = rng.choice(IDS)
                    if round_ % 2 == 0:
                        cluster.crash(victim)
                    else:
                        storage = cluster.storages[victim]
                        assert isinstance(storage, CrashableStorage)
                        storage.armed = True
                        await cluster.wait_until(lambda v=victim: v not in cluster.nodes)
                        cluster.network.detach(victim)
                        assert isinstance(cluster.errors.pop(victim), SimulatedCrash)
                    await trio.sleep(rng.uniform(0.0, 0.3))
                    await restart(victim)
                stop.set()
            leader = await cluster.wait_leader()
            await leader.propose(b"final")
            await cluster.wait_applied(leader.commit_index, among=IDS)

        histories = {}
        for node_id in IDS:
            machine = cluster.machines[node_id]
            assert isinstance(machine, RecordingMachine)
            histories[node_id] = machine.applied
        reference = histories[leader.id]
        for node_id, history in histories.items():
            assert history == reference, f"{node_id} applied a different history"
        assert len(set(reference)) == len(reference), "a command was applied twice"
        cluster.check()
        assert len(cluster.leader_of_term) >= 2, "the crashes should have forced elections"
        missing = set(acknowledged) - set(reference)
        assert not missing, f"acknowledged but lost: {sorted(missing)[:5]} ({outcomes=})"
        assert len(acknowledged) > 100
        assert len(TORN_SAVES) == 6, "every armed save should have been torn"
        for storage in cluster.storages.values():
            storage.close()
        nursery.cancel_scope.cancel()
