"""Property test: FileStorage behaves like MemoryStorage across crashes and restarts.

Hypothesis drives random sequences of saves (appends, suffix overwrites,
snapshots with and without a matching term, hard states, all combined in
one call), clean restarts, crashes between saves (the object is dropped
without ``close``) and crashes in the middle of a save (the data sync never
happens and the newest segment loses a random amount of what was written
after the last sync). After every restart the file storage must hold what
the model holds; after a crash in a save it must hold the model's state
before that save plus a prefix of the entries the save was writing.

The generated histories respect what Raft guarantees the storage: the commit
index never goes back, committed entries are never overwritten and a
snapshot whose term disagrees with the log never sits below the commit
index.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from trio_dchan.raft.storage import FileStorage, MemoryStorage
from trio_dchan.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    PersistedState,
    Snapshot,
    SnapshotMeta,
)

CLUSTER = "model"
NODE = "n1"


class Crash(Exception):
    """Stands for the process dying inside a save."""


def _crash(fd: int) -> None:
    raise Crash


def model_from(state: PersistedState) -> MemoryStorage:
    model = MemoryStorage()
    model.save(state.hard_state, [], state.snapshot)
    model.save(None, list(state.entries), None)
    return model


class StorageMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # tmpfs when there is one: the crashes are simulated on file contents,
        # so the test needs no real disk, and fsync on a shared disk is slow.
        shm = Path("/dev/shm")
        base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix="dchan-storage-", dir=base))
        self.segment_bytes = 160
        self.storage: FileStorage | None = self._open()
        self.model = MemoryStorage()
        self.model.load()

    def _open(self) -> FileStorage:
        storage = FileStorage(
            self.dir, cluster_id=CLUSTER, node_id=NODE, segment_bytes=self.segment_bytes
        )
        storage.load()
        return storage

    @property
    def fs(self) -> FileStorage:
        assert self.storage is not None
        return self.storage

    def teardown(self) -> None:
        try:
            if self.storage is not None:
                self.storage.close()
                self.storage = None
                self._reopen_and_check()
                assert self.storage is not None
                self.storage.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- generating one Ready ---------------------------------------------------

    def _term_at(self, index: int) -> int | None:
        state = self.model.load()
        if state.snapshot is not None and state.snapshot.meta.index == index:
            return state.snapshot.meta.term
        for entry in state.entries:
            if entry.index == index:
                return entry.term
        return None

    def _draw_save(
        self, data: st.DataObject, with_snapshot: bool
    ) -> tuple[HardState | None, list[Entry], Snapshot | None]:
        m = self.model
        commit = m.load().hard_state.commit
        snap_index, last = m.snapshot_index, m.last_index
        snapshot = None
        if with_snapshot:
            index = data.draw(st.integers(snap_index + 1, last + 3), label="snapshot index")
            term = self._term_at(index)
            if term is None or (index >= commit and data.draw(st.booleans(), label="mismatch")):
                term = data.draw(st.integers(1, 9).filter(lambda t: t != term), label="snap term")
            conf = ConfState(voters=frozenset({"n1", "n2"}), learners=frozenset({"n3"}))
            image = data.draw(st.binary(max_size=40), label="snapshot data")
            snapshot = Snapshot(SnapshotMeta(index, term, conf), image)
            if self._term_at(index) != term:
                last = index
            snap_index = max(snap_index, index)
            last = max(last, index)
        entries: list[Entry] = []
        if data.draw(st.booleans(), label="with entries"):
            first = data.draw(st.integers(max(snap_index, commit) + 1, last + 1), label="first")
            count = data.draw(st.integers(1, 6), label="count")
            term = data.draw(st.integers(1, 9), label="term")
            kinds = st.sampled_from(list(EntryType))
            for index in range(first, first + count):
                payload = data.draw(st.binary(max_size=30), label="entry data")
                entries.append(Entry(term, index, data.draw(kinds, label="kind"), payload))
            last = first + count - 1
        hard_state = None
        if data.draw(st.booleans(), label="with hard state"):
            hard_state = HardState(
                term=data.draw(st.integers(0, 9), label="hs term"),
                vote=data.draw(st.sampled_from([None, "n1", "n2", ""]), label="vote"),
                commit=data.draw(st.integers(commit, last), label="commit"),
            )
        return hard_state, entries, snapshot

    # -- rules --------------------------------------------------------------------

    @precondition(lambda self: self.storage is not None)
    @rule(data=st.data(), with_snapshot=st.booleans())
    def save(self, data: st.DataObject, with_snapshot: bool) -> None:
        hard_state, entries, snapshot = self._draw_save(data, with_snapshot)
        self.fs.save(hard_state, entries, snapshot)
        self.model.save(hard_state, entries, snapshot)

    @precondition(lambda self: self.storage is not None)
    @rule()
    def restart(self) -> None:
        self.fs.close()
        self._reopen_and_check()

    @precondition(lambda self: self.storage is not None)
    @rule()
    def crash_between_saves(self) -> None:
        self.storage = None
        # CPython frees the dropped object (and its lock) at once.
        self._reopen_and_check()

    @precondition(lambda self: self.storage is not None)
    @rule(data=st.data(), with_snapshot=st.booleans())
    def crash_inside_save(self, data: st.DataObject, with_snapshot: bool) -> None:
        hard_state, entries, snapshot = self._draw_save(data, with_snapshot)
        # Files are told apart by inode: a cut may delete a segment and a new
        # one may take its name in the same save.
        before = {p.stat().st_ino: p.read_bytes() for p in self.dir.glob("log-*.seg")}
        old = self.model.load()
        crash_at = data.draw(st.integers(1, 8), label="crash at sync number")
        # (kind, inode, size, path) of each completed sync of a file
        synced: list[tuple[str, int, int, str]] = []
        calls: list[str] = []

        def staged(kind: str, real: Callable[[Any], None]) -> Callable[[Any], None]:
            def sync(target: Any) -> None:
                calls.append(kind)
                if len(calls) >= crash_at:
                    raise Crash
                real(target)
                if isinstance(target, int):
                    info = os.fstat(target)
                    path = os.readlink(f"/proc/self/fd/{target}")
                    synced.append((kind, info.st_ino, info.st_size, path))
                else:
                    # Deletions are made durable here: forget files now gone,
                    # whose inode numbers a new file could reuse.
                    synced[:] = [
                        rec
                        for rec in synced
                        if os.path.exists(rec[3]) and os.stat(rec[3]).st_ino == rec[1]
                    ]

            return sync

        fs = self.fs
        fs._datasync = staged("data", fs._datasync)
        fs._fsync = staged("file", fs._fsync)
        fs._dirsync = staged("dir", fs._dirsync)
        try:
            fs.save(hard_state, entries, snapshot)
        except Crash:
            pass
        del fs
        self.storage = None  # CPython frees the dropped object (and its lock) at once.
        # Lose a random part of what the newest segment received since it was
        # last synced (possibly the whole file, if it is new and never synced).
        segments = sorted(self.dir.glob("log-*.seg"))
        if segments:
            newest = segments[-1]
            written = newest.read_bytes()
            inode = newest.stat().st_ino
            previous = before.get(inode, b"")
            lower = 0
            while lower < min(len(previous), len(written)) and previous[lower] == written[lower]:
                lower += 1
            data_syncs = [size for kind, ino, size, _ in synced if (kind, ino) == ("data", inode)]
            if data_syncs:
                # Durable up to its last sync in this save, unless it was cut
                # short after that sync (a cut whose own sync is where we crashed).
                lower = min(max(lower, data_syncs[-1]), len(written))
            if inode not in before and not data_syncs and data.draw(st.booleans()):
                newest.unlink()
            else:
                os.truncate(newest, data.draw(st.integers(lower, len(written)), label="cut"))
        self.storage = self._open()
        state = self.fs.load()
        assert state in self._outcomes(old, hard_state, entries, snapshot)
        self.model = model_from(state)

    @staticmethod
    def _outcomes(
        old: PersistedState,
        hard_state: HardState | None,
        entries: list[Entry],
        snapshot: Snapshot | None,
    ) -> list[PersistedState]:
        """What a crash inside a save may leave: the save's effects, in order, up to a point."""
        outcomes = [old]
        model = model_from(old)
        if snapshot is not None:
            model.save(None, [], snapshot)
            outcomes.append(model.load())
        new = [e for e in entries if e.index > model.snapshot_index]
        if new:
            state = model.load()
            # A log cut is done in synced steps, newest segment first: any
            # cut at or after the first new entry may be left.
            for cut in range(new[0].index, model.last_index + 1):
                kept = tuple(e for e in state.entries if e.index < cut)
                outcomes.append(PersistedState(state.hard_state, state.snapshot, kept))
            for k in range(1, len(new) + 1):
                partial = model_from(state)
                partial.save(None, new[:k], None)
                outcomes.append(partial.load())
            model.save(None, new, None)
        model.save(hard_state, [], None)
        outcomes.append(model.load())
        return outcomes

    def _reopen_and_check(self) -> None:
        self.storage = self._open()
        state = self.fs.load()
        expected = self.model.load()
        assert state == expected
        # Compaction left no segment that lies wholly at or before the snapshot.
        snap_index = self.model.snapshot_index
        segments = self.fs._segments
        for n, seg in enumerate(segments):
            empty_tail = n == len(segments) - 1 and not seg.offsets
            assert seg.last_index > snap_index or (empty_tail and seg.first_index > snap_index)


StorageMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None
)
TestStorageAgainstModel = StorageMachine.TestCase
