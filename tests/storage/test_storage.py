"""FileStorage and MemoryStorage: the save/load contract and every recovery case."""

from __future__ import annotations

import gc
import logging
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from trio_dchan.errors import DchanError
from trio_dchan.raft.storage import (
    HARD_STATE_NAME,
    META_NAME,
    SNAPSHOT_NAME,
    CorruptStorageError,
    FileStorage,
    MemoryStorage,
    StorageError,
    StorageLockedError,
    StorageMismatchError,
    segment_name,
)
from trio_dchan.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    PersistedState,
    Snapshot,
    SnapshotMeta,
)

CLUSTER = "test-cluster"
NODE = "127.0.0.1:7001"


def entries(first: int, last: int, term: int = 1, tag: bytes = b"") -> list[Entry]:
    return [Entry(term, i, EntryType.NORMAL, tag + b"data-%d" % i) for i in range(first, last + 1)]


def snap(index: int, term: int, data: bytes = b"image") -> Snapshot:
    conf = ConfState(voters=frozenset({"a", "b"}), learners=frozenset({"c"}))
    return Snapshot(SnapshotMeta(index=index, term=term, conf=conf), data)


def open_fs(path: Path, **kwargs: object) -> FileStorage:
    return FileStorage(path, cluster_id=CLUSTER, node_id=NODE, **kwargs)  # type: ignore[arg-type]


def reopen(path: Path, **kwargs: object) -> PersistedState:
    storage = open_fs(path, **kwargs)
    try:
        return storage.load()
    finally:
        storage.close()


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("log-*.seg"))


StorageFactory = Callable[[Path], "FileStorage | MemoryStorage"]


@pytest.fixture(params=["file", "memory"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> StorageFactory:
    def factory(path: Path = tmp_path) -> FileStorage | MemoryStorage:
        if request.param == "memory":
            return MemoryStorage()
        return open_fs(path, segment_bytes=256)

    return factory


# -- the contract, for both implementations ----------------------------------


def test_fresh_storage_is_empty(make: StorageFactory, tmp_path: Path) -> None:
    storage = make(tmp_path)
    state = storage.load()
    assert state == PersistedState()
    storage.close()


def test_append_overwrite_and_hard_state(make: StorageFactory, tmp_path: Path) -> None:
    storage = make(tmp_path)
    storage.load()
    storage.save(HardState(1, "a", 0), entries(1, 10), None)
    storage.save(HardState(2, None, 5), entries(8, 12, term=2), None)
    state = storage.load()
    assert state.hard_state == HardState(2, None, 5)
    assert list(state.entries) == entries(1, 7) + entries(8, 12, term=2)
    storage.close()


def test_overwrite_shorter_suffix(make: StorageFactory, tmp_path: Path) -> None:
    storage = make(tmp_path)
    storage.load()
    storage.save(None, entries(1, 30), None)
    storage.save(None, entries(3, 4, term=2), None)
    assert list(storage.load().entries) == entries(1, 2) + entries(3, 4, term=2)
    storage.close()


def test_gap_is_refused(make: StorageFactory, tmp_path: Path) -> None:
    storage = make(tmp_path)
    storage.load()
    storage.save(None, entries(1, 3), None)
    with pytest.raises(StorageError, match="start at 5"):
        storage.save(None, entries(5, 6), None)
    with pytest.raises(StorageError, match="not contiguous"):
        storage.save(None, [*entries(4, 4), *entries(6, 6)], None)
    assert list(storage.load().entries) == entries(1, 3)
    storage.close()


def test_snapshot_matching_term_keeps_later_entries(make: StorageFactory, tmp_path: Path) -> None:
    storage = make(tmp_path)
    storage.load()
    storage.save(HardState(1, None, 20), entries(1, 40), None)
    storage.save(None, [], snap(25, 1))
    state = storage.load()
    assert state.snapshot == snap(25, 1)
    assert list(state.entries) == entries(26, 40)
    # An older snapshot is ignored; entries at or below the snapshot too.
    storage.save(None, entries(20, 41), snap(10, 1))
    state = storage.load()
    assert state.snapshot == snap(25, 1)
    assert list(state.entries) == entries(26, 41)
    storage.close()


def test_snapshot_with_other_term_discards_log(make: StorageFactory, tmp_path: Path) -> None:
    storage = make(tmp_path)
    storage.load()
    storage.save(None, entries(1, 10), None)
    storage.save(HardState(3, "b", 12), entries(13, 14, term=3), snap(12, 3))
    state = storage.load()
    assert state.snapshot == snap(12, 3)
    assert list(state.entries) == entries(13, 14, term=3)
    assert state.hard_state == HardState(3, "b", 12)
    storage.close()


def test_snapshot_at_last_index(make: StorageFactory, tmp_path: Path) -> None:
    storage = make(tmp_path)
    storage.load()
    storage.save(None, entries(1, 10), None)
    storage.save(None, [], snap(10, 1))
    assert storage.load().entries == ()
    storage.save(None, entries(11, 12), None)
    assert list(storage.load().entries) == entries(11, 12)
    storage.close()


def test_closed_storage_refuses_use(make: StorageFactory, tmp_path: Path) -> None:
    storage = make(tmp_path)
    storage.load()
    storage.close()
    with pytest.raises(StorageError):
        storage.save(None, entries(1, 1), None)
    with pytest.raises(StorageError):
        storage.load()


def test_errors_are_dchan_errors() -> None:
    for cls in (StorageLockedError, CorruptStorageError, StorageMismatchError):
        assert issubclass(cls, StorageError)
    assert issubclass(StorageError, DchanError)


# -- files -------------------------------------------------------------------


def test_survives_reopen_and_compacts_segments(tmp_path: Path) -> None:
    storage = open_fs(tmp_path, segment_bytes=200)
    storage.load()
    for i in range(1, 101, 5):
        storage.save(HardState(1, NODE, i), entries(i, i + 4), None)
    assert len(segments(tmp_path)) > 3
    storage.save(None, [], snap(60, 1))
    storage.close()
    state = reopen(tmp_path)
    assert state.snapshot == snap(60, 1)
    assert list(state.entries) == entries(61, 100)
    assert state.hard_state == HardState(1, NODE, 96)
    # Every remaining segment holds something after the snapshot.
    first_of_second = int(segments(tmp_path)[1].name[4:24])
    assert first_of_second <= 61 + 10


def test_snapshot_discards_all_segments_when_log_disagrees(tmp_path: Path) -> None:
    storage = open_fs(tmp_path, segment_bytes=200)
    storage.load()
    storage.save(None, entries(1, 50), None)
    storage.save(None, [], snap(30, 7))
    assert segments(tmp_path) == []
    storage.save(None, entries(31, 32, term=7), None)
    assert segments(tmp_path) == [tmp_path / segment_name(31)]
    storage.close()
    assert list(reopen(tmp_path).entries) == entries(31, 32, term=7)


def test_overwrite_across_segments(tmp_path: Path) -> None:
    storage = open_fs(tmp_path, segment_bytes=150)
    storage.load()
    for i in range(1, 41, 4):
        storage.save(None, entries(i, i + 3), None)
    before = len(segments(tmp_path))
    storage.save(None, entries(6, 7, term=2), None)
    assert len(segments(tmp_path)) < before
    storage.save(None, entries(8, 9, term=2), None)
    storage.close()
    assert list(reopen(tmp_path).entries) == entries(1, 5) + entries(6, 9, term=2)


def test_lock_held(tmp_path: Path) -> None:
    first = open_fs(tmp_path)
    with pytest.raises(StorageLockedError, match="LOCK"):
        open_fs(tmp_path)
    first.close()
    open_fs(tmp_path).close()


def test_dropped_storage_releases_lock(tmp_path: Path) -> None:
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(HardState(1), entries(1, 3), None)
    del storage
    gc.collect()
    assert list(reopen(tmp_path).entries) == entries(1, 3)


def test_foreign_cluster(tmp_path: Path) -> None:
    open_fs(tmp_path).close()
    with pytest.raises(StorageMismatchError, match=rf"{META_NAME}.*'other'"):
        FileStorage(tmp_path, cluster_id="other", node_id=NODE)
    with pytest.raises(StorageMismatchError, match="node"):
        FileStorage(tmp_path, cluster_id=CLUSTER, node_id="127.0.0.1:9")
    # The failed openers released the lock.
    open_fs(tmp_path).close()


def test_missing_meta_with_raft_files(tmp_path: Path) -> None:
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(HardState(1), entries(1, 2), None)
    storage.close()
    (tmp_path / META_NAME).unlink()
    with pytest.raises(CorruptStorageError, match=META_NAME):
        open_fs(tmp_path)


def test_unreadable_meta(tmp_path: Path) -> None:
    open_fs(tmp_path).close()
    (tmp_path / META_NAME).write_bytes(b"\xff{not json")
    with pytest.raises(CorruptStorageError, match=META_NAME):
        open_fs(tmp_path)


def _write_log(path: Path, n: int = 30, segment_bytes: int = 4096) -> None:
    storage = open_fs(path, segment_bytes=segment_bytes)
    storage.load()
    for i in range(1, n + 1, 3):
        storage.save(HardState(1, None, 0), entries(i, min(n, i + 2)), None)
    storage.close()


@pytest.mark.parametrize("cut", [1, 5, 8, 12, 20])
def test_torn_tail_is_truncated_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cut: int
) -> None:
    _write_log(tmp_path)
    seg = segments(tmp_path)[-1]
    size = seg.stat().st_size
    os.truncate(seg, size - cut)
    with caplog.at_level(logging.WARNING, logger="trio_dchan.raft.storage"):
        state = reopen(tmp_path)
    assert list(state.entries) == entries(1, 29)
    assert "torn tail" in caplog.text
    assert str(seg) in caplog.text
    # The repair is durable: the second open sees a clean file and appends after it.
    caplog.clear()
    storage = open_fs(tmp_path)
    assert list(storage.load().entries) == entries(1, 29)
    assert "torn" not in caplog.text
    storage.save(None, entries(30, 31, term=2), None)
    storage.close()
    assert list(reopen(tmp_path).entries) == entries(1, 29) + entries(30, 31, term=2)


def test_zero_filled_tail_is_torn(tmp_path: Path) -> None:
    _write_log(tmp_path)
    seg = segments(tmp_path)[-1]
    with seg.open("ab") as f:
        f.write(b"\0" * 100)
    assert list(reopen(tmp_path).entries) == entries(1, 30)


def test_damaged_last_record_is_torn(tmp_path: Path) -> None:
    _write_log(tmp_path)
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    data[-2] ^= 0x40
    seg.write_bytes(bytes(data))
    assert list(reopen(tmp_path).entries) == entries(1, 29)


def test_bit_flip_mid_log(tmp_path: Path) -> None:
    _write_log(tmp_path)
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x01
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptStorageError, match=rf"{seg.name}.*checksum"):
        reopen(tmp_path)


def _record_offsets(data: bytes) -> list[int]:
    offsets, pos = [], 16
    while pos < len(data):
        offsets.append(pos)
        pos += 8 + struct.unpack_from("<I", data, pos)[0]
    return offsets


@pytest.mark.parametrize("bit", [12, 20, 31])
@pytest.mark.parametrize("which", ["entry mid-log", "last entry"])
def test_damaged_length_mid_log_is_not_taken_for_a_torn_tail(
    tmp_path: Path, bit: int, which: str
) -> None:
    # A length field that points past the end of the file looks like a
    # record cut by a crash, but records follow it: truncating there would
    # silently drop committed entries (and the commit records telling so).
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(HardState(1, None, 0), entries(1, 1), None)
    for i in range(2, 21):
        storage.save(HardState(1, None, i - 1), entries(i, i), None)
    storage.save(HardState(1, None, 20), [], None)
    storage.close()
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    offsets = _record_offsets(bytes(data))
    # Entry records are those whose type byte is below 0x80.
    entry_at = [o for o in offsets if data[o + 24] < 0x80]
    pos = entry_at[4] if which == "entry mid-log" else entry_at[-1]
    size = struct.unpack_from("<I", data, pos)[0]
    damaged = size ^ (1 << bit)
    assert pos + 8 + damaged > len(data)
    struct.pack_into("<I", data, pos, damaged)
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptStorageError, match=rf"{seg.name}.*length is damaged"):
        reopen(tmp_path)


def test_bit_flip_in_older_segment(tmp_path: Path) -> None:
    _write_log(tmp_path, segment_bytes=200)
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    data[-3] ^= 0x10
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptStorageError, match=seg.name):
        reopen(tmp_path)


def test_truncated_older_segment(tmp_path: Path) -> None:
    _write_log(tmp_path, segment_bytes=200)
    seg = segments(tmp_path)[1]
    os.truncate(seg, seg.stat().st_size - 3)
    with pytest.raises(CorruptStorageError, match=seg.name):
        reopen(tmp_path)


def test_missing_middle_segment(tmp_path: Path) -> None:
    _write_log(tmp_path, segment_bytes=200)
    segs = segments(tmp_path)
    assert len(segs) >= 3
    segs[1].unlink()
    with pytest.raises(CorruptStorageError, match=f"{segs[1].name} is missing"):
        reopen(tmp_path)


def test_missing_first_segment(tmp_path: Path) -> None:
    _write_log(tmp_path, segment_bytes=200)
    segments(tmp_path)[0].unlink()
    with pytest.raises(CorruptStorageError, match=f"{segment_name(1)} is missing"):
        reopen(tmp_path)


def test_missing_last_segment_detected_by_seal(tmp_path: Path) -> None:
    _write_log(tmp_path, segment_bytes=200)
    segs = segments(tmp_path)
    segs[-1].unlink()
    with pytest.raises(CorruptStorageError, match=rf"{segs[-2].name}.*{segs[-1].name}.*missing"):
        reopen(tmp_path)


def test_lost_durable_entries_detected_by_commit(tmp_path: Path) -> None:
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(HardState(2, NODE, 10), entries(1, 10), None)
    storage.close()
    os.truncate(segments(tmp_path)[0], 16)  # only the segment header is left
    with pytest.raises(CorruptStorageError, match="commit index 10"):
        reopen(tmp_path)


def test_record_after_seal(tmp_path: Path) -> None:
    _write_log(tmp_path, segment_bytes=200)
    first = segments(tmp_path)[0]
    with first.open("ab") as f:
        f.write(first.read_bytes()[16:48])  # a copy of its first record
    with pytest.raises(CorruptStorageError, match=first.name):
        reopen(tmp_path)


def test_commit_only_changes_survive_restart(tmp_path: Path) -> None:
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(HardState(3, NODE, 0), entries(1, 5), None)
    hs_file = (tmp_path / HARD_STATE_NAME).read_bytes()
    storage.save(HardState(3, NODE, 2), [], None)
    storage.save(HardState(3, NODE, 4), entries(6, 7), None)
    # A new commit index alone does not rewrite the hard state file.
    assert (tmp_path / HARD_STATE_NAME).read_bytes() == hs_file
    # The commit index never moves back.
    storage.save(HardState(3, NODE, 1), [], None)
    assert storage.load().hard_state == HardState(3, NODE, 4)
    storage.close()
    assert reopen(tmp_path).hard_state == HardState(3, NODE, 4)
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(HardState(4, None, 5), [], None)
    storage.close()
    assert reopen(tmp_path).hard_state == HardState(4, None, 5)


def test_snapshot_checksum_failure(tmp_path: Path) -> None:
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(HardState(1, None, 5), entries(1, 10), snap(5, 1, b"x" * 100))
    storage.close()
    path = tmp_path / SNAPSHOT_NAME
    data = bytearray(path.read_bytes())
    data[60] ^= 0x02
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStorageError, match=rf"{SNAPSHOT_NAME}.*checksum"):
        reopen(tmp_path)


def test_truncated_snapshot(tmp_path: Path) -> None:
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(None, [], snap(5, 1, b"x" * 100))
    storage.close()
    os.truncate(tmp_path / SNAPSHOT_NAME, 50)
    with pytest.raises(CorruptStorageError, match=SNAPSHOT_NAME):
        reopen(tmp_path)


def test_hard_state_checksum_failure(tmp_path: Path) -> None:
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(HardState(4, "someone", 0), [], None)
    storage.close()
    path = tmp_path / HARD_STATE_NAME
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStorageError, match=HARD_STATE_NAME):
        reopen(tmp_path)


def test_leftover_tmp_files_are_ignored(tmp_path: Path) -> None:
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(HardState(2, None, 0), entries(1, 2), snap(1, 1))
    storage.close()
    (tmp_path / (HARD_STATE_NAME + ".tmp")).write_bytes(b"half")
    (tmp_path / (SNAPSHOT_NAME + ".tmp")).write_bytes(b"half a snapshot")
    state = reopen(tmp_path)
    assert state.hard_state == HardState(2, None, 0)
    assert state.snapshot == snap(1, 1)
    assert not list(tmp_path.glob("*.tmp"))


def test_torn_new_segment_header(tmp_path: Path) -> None:
    _write_log(tmp_path, n=10)
    (tmp_path / segment_name(11)).write_bytes(b"DCL")
    storage = open_fs(tmp_path)
    assert list(storage.load().entries) == entries(1, 10)
    storage.save(None, entries(11, 11), None)
    storage.close()
    assert list(reopen(tmp_path).entries) == entries(1, 11)


def test_bad_segment_magic(tmp_path: Path) -> None:
    _write_log(tmp_path, n=10)
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    data[0:4] = b"XXXX"
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptStorageError, match=seg.name):
        reopen(tmp_path)


def test_interrupted_compaction_is_finished_on_load(tmp_path: Path) -> None:
    """A crash after the snapshot was renamed but before old segments were deleted."""
    _write_log(tmp_path, n=60, segment_bytes=200)
    storage = open_fs(tmp_path)
    storage.load()
    before = {p.name: p.read_bytes() for p in segments(tmp_path)}
    storage.save(None, [], snap(40, 1))
    storage.close()
    for name, data in before.items():  # put the deleted segments back
        (tmp_path / name).write_bytes(data)
    state = reopen(tmp_path)
    assert list(state.entries) == entries(41, 60)
    assert len(segments(tmp_path)) < len(before)


def test_crash_during_save_loses_only_unsynced_tail(tmp_path: Path) -> None:
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(HardState(1, None, 3), entries(1, 3), None)

    class Crash(Exception):
        pass

    def crash(fd: int) -> None:
        raise Crash

    storage._datasync = crash
    with pytest.raises(Crash):
        storage.save(HardState(1, None, 5), entries(4, 6), None)
    del storage
    gc.collect()
    seg = segments(tmp_path)[-1]
    # The save wrote entries 4-6 and a 25-byte commit record; lose the record
    # and the end of entry 6.
    os.truncate(seg, seg.stat().st_size - 25 - 7)
    state = reopen(tmp_path)
    assert state.hard_state == HardState(1, None, 3)
    assert list(state.entries) == entries(1, 5)


def test_save_before_load_is_refused(tmp_path: Path) -> None:
    storage = open_fs(tmp_path)
    with pytest.raises(StorageError, match="load"):
        storage.save(None, entries(1, 1), None)
    storage.close()


def test_entry_types_and_empty_data_round_trip(tmp_path: Path) -> None:
    log: Sequence[Entry] = [
        Entry(1, 1, EntryType.NOOP),
        Entry(1, 2, EntryType.CONF_CHANGE, b"\x00\x00\x00\x00\x01a"),
        Entry(2, 3, EntryType.NORMAL, bytes(range(256)) * 50),
    ]
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(HardState(2, "\u00e9t\u00e9", 3), log, None)
    storage.close()
    state = reopen(tmp_path)
    assert list(state.entries) == list(log)
    assert state.hard_state == HardState(2, "\u00e9t\u00e9", 3)


def test_commit_survives_truncation_and_compaction(tmp_path: Path) -> None:
    """A commit record behind entries that a conflict or a compaction removes is kept."""
    storage = open_fs(tmp_path, segment_bytes=150)
    storage.load()
    storage.save(HardState(1, NODE, 0), entries(1, 5), None)
    storage.save(HardState(1, NODE, 2), [], None)  # a commit record after entry 5
    storage.save(None, entries(3, 3, term=2), None)  # cuts the log at entry 3
    storage.close()
    assert reopen(tmp_path).hard_state == HardState(1, NODE, 2)
    storage = open_fs(tmp_path, segment_bytes=150)
    storage.load()
    storage.save(HardState(1, NODE, 3), entries(4, 20, term=2), None)
    storage.save(None, [], snap(18, 2))  # drops the segments holding the commit record
    storage.close()
    state = reopen(tmp_path)
    assert state.hard_state == HardState(1, NODE, 3)
    assert list(state.entries) == entries(19, 20, term=2)


def test_io_error_in_save_is_a_storage_error_and_blocks_later_saves(tmp_path: Path) -> None:
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(HardState(1), entries(1, 2), None)

    def failing_sync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    storage._datasync = failing_sync
    with pytest.raises(StorageError, match="save failed"):
        storage.save(None, entries(3, 4), None)
    # What the failed save left in memory cannot be trusted: no more saves...
    with pytest.raises(StorageError, match="load"):
        storage.save(None, entries(3, 4), None)
    # ...until the disk is read again.
    storage._datasync = os.fdatasync
    assert list(storage.load().entries) == entries(1, 4)
    storage.save(None, entries(5, 5), None)
    storage.close()
    assert list(reopen(tmp_path).entries) == entries(1, 5)


def test_unusable_data_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError):
        open_fs(tmp_path / "file" / "data")


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", range(1, 9))
def test_crash_while_a_snapshot_discards_the_log(tmp_path: Path, crash_at: int) -> None:
    """Whatever sync a crash hits, the log left behind is valid and the snapshot rule holds."""
    storage = open_fs(tmp_path, segment_bytes=100)
    storage.load()
    for i in range(1, 31, 3):
        storage.save(HardState(1, None, 0), entries(i, i + 2), None)
    assert len(segments(tmp_path)) >= 4
    calls = 0

    def sync(target: object) -> None:
        nonlocal calls
        calls += 1
        if calls >= crash_at:
            raise _Crash
        if isinstance(target, int):
            os.fsync(target)

    storage._datasync = storage._fsync = sync
    storage._dirsync = sync
    with pytest.raises(_Crash):
        storage.save(None, [], snap(5, 9))  # the log holds index 5 with term 1: discard it all
    del storage
    gc.collect()
    state = reopen(tmp_path)
    assert state.snapshot in (None, snap(5, 9))
    if state.snapshot is None:
        assert list(state.entries) == entries(1, 30)
    else:
        assert state.entries == ()


def test_unwritten_page_before_written_ones_is_torn(tmp_path: Path) -> None:
    """A crash can persist the later pages of a write but not an earlier one."""
    _write_log(tmp_path, n=3)
    seg = segments(tmp_path)[-1]
    synced = seg.stat().st_size
    storage = open_fs(tmp_path)
    storage.load()
    storage.save(None, entries(4, 200), None)  # ~25 KiB in one write
    storage.close()
    data = bytearray(seg.read_bytes())
    page = (synced // 4096 + 1) * 4096
    data[page : page + 4096] = bytes(4096)  # this page never reached the disk
    seg.write_bytes(bytes(data))
    state = reopen(tmp_path)
    assert state.entries == tuple(entries(1, len(state.entries)))
    assert 3 <= len(state.entries) < 200


def test_bit_flip_mid_newest_segment_with_zero_data_elsewhere(tmp_path: Path) -> None:
    """A flipped bit is corruption even when other records carry zero bytes."""
    storage = open_fs(tmp_path)
    storage.load()
    log = [Entry(1, i, EntryType.NORMAL, bytes(100)) for i in range(1, 30)]
    storage.save(HardState(1, None, 0), log, None)
    storage.close()
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    data[16 + 8] ^= 0x01  # the term of the first record
    seg.write_bytes(bytes(data))
    with pytest.raises(CorruptStorageError, match="checksum"):
        reopen(tmp_path)
