"""Durable storage for a Raft node: the log, the hard state and snapshots.

The driver (:mod:`.node`) hands every :class:`~.types.Ready` to
:meth:`Storage.save` in one call and sends nothing that depends on it until
the call returns: when ``save`` returns, what it was given is on disk. In
the steady state (new entries and a higher commit index) one call costs one
``fdatasync`` however many entries it carries, so a busy node amortises it
over a whole batch of proposals (group commit); a new term or vote adds an
atomic replacement of the hard state file.

Two implementations share one contract:

* :class:`FileStorage` keeps everything under a ``data_dir`` in files the
  project writes itself (the byte layout is in ``docs/storage-format.md``);
* :class:`MemoryStorage` keeps it in memory, for tests, demos and as the model
  the file storage is checked against.

Both are synchronous: plain file I/O and ``os.fsync``. The driver decides
whether to call them from a worker thread.

Recovery is strict. A partial last record (a write cut short by a crash) is
expected and truncated with a warning; anything else that does not check out
-- a checksum failure before the tail, a segment missing from the sequence, a
snapshot or hard state that fails its checksum, files of another cluster --
raises an error naming the file, and the node refuses to start rather than
run on state it cannot trust.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import struct
import weakref
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from ..errors import DchanError
from .types import ConfState, Entry, EntryType, HardState, PersistedState, Snapshot, SnapshotMeta

__all__ = [
    "CorruptStorageError",
    "FileStorage",
    "MemoryStorage",
    "Storage",
    "StorageError",
    "StorageLockedError",
    "StorageMismatchError",
]

logger = logging.getLogger(__name__)

#: Default soft limit of one log segment file.
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024

FORMAT_VERSION = 1

META_NAME = "META"
LOCK_NAME = "LOCK"
HARD_STATE_NAME = "HARDSTATE"
SNAPSHOT_NAME = "SNAPSHOT"
TMP_SUFFIX = ".tmp"
_SEGMENT_RE = re.compile(r"^log-(\d{20})\.seg$")

# Segment header: magic, format version, index of the first record.
_SEG_MAGIC = b"DCLG"
_SEG_HEADER = struct.Struct("<4sIQ")
# Record frame: payload length, crc32 of the payload.
_FRAME = struct.Struct("<II")
# Payload header, followed by the entry data: term, index, entry type.
_ENTRY = struct.Struct("<QQB")
_MAX_DATA = 0xFFFFFFFF - _ENTRY.size
# Record type of a commit record: the payload header holds (term, commit,
# _COMMIT_RECORD) and there is no data. See FileStorage.save.
_COMMIT_RECORD = 0x80
# Record type of the seal that ends a full segment: (0, first index of the
# next segment, _SEAL_RECORD), no data. A sealed last segment means the
# segment after it is missing.
_SEAL_RECORD = 0x81

_HS_MAGIC = b"DCHS"
_HS_HEADER = struct.Struct("<4sIQQB")  # magic, version, term, commit, has_vote
_SNAP_MAGIC = b"DCSN"
_SNAP_HEADER = struct.Struct("<4sIQQ")  # magic, version, index, term
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_CRC = struct.Struct("<I")


class StorageError(DchanError):
    """Base class of every error raised by Raft storage."""


class StorageLockedError(StorageError):
    """Another process (or another open storage object) holds the data directory."""


class CorruptStorageError(StorageError):
    """A file under the data directory does not check out; the node must not start."""


class StorageMismatchError(StorageError):
    """The data directory belongs to another cluster or node, or to another format version."""


class Storage(Protocol):
    """What the driver calls to persist and recover a node's Raft state."""

    def load(self) -> PersistedState:
        """Return everything saved so far (called once, when the node starts)."""
        ...

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        """Persist one Ready, durably, before returning.

        Applied in this order: the snapshot (if any), the entries, the hard
        state (if any). An entry whose index is already stored replaces it and
        every later one. A snapshot at index ``S`` discards the stored
        entries up to ``S`` -- all of them if the log does not hold ``S``
        with the snapshot's term -- and a snapshot older than the stored one
        is ignored. Entries at or below the snapshot index are ignored;
        entries that would leave a gap raise :class:`StorageError`. The
        stored commit index never moves back: a lower one is ignored.
        """
        ...

    def close(self) -> None:
        """Release the storage (for files: close them and drop the lock)."""
        ...


def _merge_hard_state(old: HardState, new: HardState) -> HardState:
    """The hard state to store: ``new``, except that the commit index never moves back."""
    if new.commit < old.commit:
        return HardState(new.term, new.vote, old.commit)
    return new


def _check_entries(entries: Sequence[Entry]) -> None:
    prev = entries[0].index
    for entry in entries[1:]:
        if entry.index != prev + 1:
            raise StorageError(
                f"entries to save are not contiguous: index {entry.index} follows {prev}"
            )
        prev = entry.index


class MemoryStorage:
    """:class:`Storage` in memory: every ``save`` is "durable" for the object's lifetime.

    Used for ``data_dir=None``, by the simulator, and as the model the file
    storage is tested against. :meth:`load` may be called again at any time
    to see what a restarted node would recover.
    """

    def __init__(self) -> None:
        self._hard_state = HardState()
        self._snapshot: Snapshot | None = None
        self._entries: list[Entry] = []
        self._closed = False

    @property
    def snapshot_index(self) -> int:
        return self._snapshot.meta.index if self._snapshot is not None else 0

    @property
    def last_index(self) -> int:
        return self._entries[-1].index if self._entries else self.snapshot_index

    def load(self) -> PersistedState:
        self._check_open()
        return PersistedState(
            hard_state=self._hard_state,
            snapshot=self._snapshot,
            entries=tuple(self._entries),
        )

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        self._check_open()
        if snapshot is not None and snapshot.meta.index > self.snapshot_index:
            meta = snapshot.meta
            offset = meta.index - self.snapshot_index - 1
            if offset < len(self._entries) and self._entries[offset].term == meta.term:
                del self._entries[: offset + 1]
            else:
                self._entries.clear()
            self._snapshot = snapshot
        if entries:
            snap_index = self.snapshot_index
            if entries[0].index <= snap_index:
                entries = [e for e in entries if e.index > snap_index]
        if entries:
            _check_entries(entries)
            first = entries[0].index
            if first > self.last_index + 1:
                raise StorageError(
                    f"entries to save start at {first} but the log ends at {self.last_index}"
                )
            del self._entries[first - self.snapshot_index - 1 :]
            self._entries.extend(entries)
        if hard_state is not None:
            self._hard_state = _merge_hard_state(self._hard_state, hard_state)

    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("storage is closed")


# ---------------------------------------------------------------------------
# Encoding helpers


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _datasync(fd: int) -> None:
    os.fdatasync(fd)


def encode_hard_state(hs: HardState) -> bytes:
    vote = hs.vote.encode("utf-8") if hs.vote is not None else b""
    body = _HS_HEADER.pack(
        _HS_MAGIC, FORMAT_VERSION, hs.term, hs.commit, 1 if hs.vote is not None else 0
    )
    body += _U32.pack(len(vote)) + vote
    return body + _CRC.pack(zlib.crc32(body))


def decode_hard_state(data: bytes, name: str) -> HardState:
    if len(data) < _HS_HEADER.size + _U32.size + _CRC.size:
        raise CorruptStorageError(f"{name}: hard state file is truncated ({len(data)} bytes)")
    body, (crc,) = data[:-4], _CRC.unpack_from(data, len(data) - 4)
    if zlib.crc32(body) != crc:
        raise CorruptStorageError(f"{name}: hard state checksum mismatch")
    magic, version, term, commit, has_vote = _HS_HEADER.unpack_from(body)
    if magic != _HS_MAGIC:
        raise CorruptStorageError(f"{name}: not a hard state file (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise StorageMismatchError(f"{name}: unsupported format version {version}")
    (size,) = _U32.unpack_from(body, _HS_HEADER.size)
    start = _HS_HEADER.size + _U32.size
    if start + size != len(body) or has_vote not in (0, 1):
        raise CorruptStorageError(f"{name}: malformed hard state")
    try:
        vote = body[start:].decode("utf-8") if has_vote else None
    except UnicodeDecodeError:
        raise CorruptStorageError(f"{name}: vote is not valid utf-8") from None
    return HardState(term=term, vote=vote, commit=commit)


def _pack_ids(ids: frozenset[str]) -> bytes:
    parts = [_U32.pack(len(ids))]
    for node in sorted(ids):
        raw = node.encode("utf-8")
        parts.append(_U32.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _unpack_ids(body: bytes, pos: int, name: str) -> tuple[frozenset[str], int]:
    if pos + 4 > len(body):
        raise CorruptStorageError(f"{name}: malformed snapshot membership")
    (count,) = _U32.unpack_from(body, pos)
    pos += 4
    ids = []
    for _ in range(count):
        if pos + 4 > len(body):
            raise CorruptStorageError(f"{name}: malformed snapshot membership")
        (size,) = _U32.unpack_from(body, pos)
        pos += 4
        if pos + size > len(body):
            raise CorruptStorageError(f"{name}: malformed snapshot membership")
        try:
            ids.append(body[pos : pos + size].decode("utf-8"))
        except UnicodeDecodeError:
            raise CorruptStorageError(f"{name}: node id is not valid utf-8") from None
        pos += size
    return frozenset(ids), pos


def encode_snapshot(snapshot: Snapshot) -> bytes:
    meta = snapshot.meta
    body = b"".join(
        (
            _SNAP_HEADER.pack(_SNAP_MAGIC, FORMAT_VERSION, meta.index, meta.term),
            _pack_ids(meta.conf.voters),
            _pack_ids(meta.conf.learners),
            _U64.pack(len(snapshot.data)),
            snapshot.data,
        )
    )
    return body + _CRC.pack(zlib.crc32(body))


def decode_snapshot(data: bytes, name: str) -> Snapshot:
    if len(data) < _SNAP_HEADER.size + _CRC.size:
        raise CorruptStorageError(f"{name}: snapshot file is truncated ({len(data)} bytes)")
    body, (crc,) = data[:-4], _CRC.unpack_from(data, len(data) - 4)
    if zlib.crc32(body) != crc:
        raise CorruptStorageError(f"{name}: snapshot checksum mismatch")
    magic, version, index, term = _SNAP_HEADER.unpack_from(body)
    if magic != _SNAP_MAGIC:
        raise CorruptStorageError(f"{name}: not a snapshot file (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise StorageMismatchError(f"{name}: unsupported format version {version}")
    voters, pos = _unpack_ids(body, _SNAP_HEADER.size, name)
    learners, pos = _unpack_ids(body, pos, name)
    if pos + 8 > len(body):
        raise CorruptStorageError(f"{name}: malformed snapshot")
    (size,) = _U64.unpack_from(body, pos)
    pos += 8
    if pos + size != len(body):
        raise CorruptStorageError(f"{name}: malformed snapshot (data length mismatch)")
    try:
        conf = ConfState(voters=voters, learners=learners)
    except ValueError as exc:
        raise CorruptStorageError(f"{name}: {exc}") from None
    return Snapshot(SnapshotMeta(index=index, term=term, conf=conf), body[pos:])


def encode_entries(entries: Sequence[Entry]) -> tuple[bytes, list[int]]:
    """Frame ``entries`` as log records; also return each record's length."""
    parts: list[bytes] = []
    sizes: list[int] = []
    frame = _FRAME.pack
    head = _ENTRY.pack
    crc32 = zlib.crc32
    for entry in entries:
        data = entry.data
        if len(data) > _MAX_DATA:
            raise StorageError(f"entry {entry.index} is too large ({len(data)} bytes)")
        header = head(entry.term, entry.index, entry.type)
        size = len(header) + len(data)
        parts.append(frame(size, crc32(data, crc32(header))))
        parts.append(header)
        parts.append(data)
        sizes.append(_FRAME.size + size)
    return b"".join(parts), sizes


# ---------------------------------------------------------------------------
# File storage


class _Segment:
    """What the storage remembers about one segment file."""

    __slots__ = ("first_index", "offsets", "path", "sealed", "size", "terms")

    def __init__(self, path: Path, first_index: int) -> None:
        self.path = path
        self.first_index = first_index
        #: offsets[i] is where the record of index ``first_index + i`` starts
        self.offsets = array.array("Q")
        self.terms = array.array("Q")
        #: end of the last complete record (before the seal, if any)
        self.size = _SEG_HEADER.size
        #: whether the segment ends with a seal record
        self.sealed = False

    @property
    def last_index(self) -> int:
        return self.first_index + len(self.offsets) - 1


def _record(term: int, index: int, kind: int) -> bytes:
    body = _ENTRY.pack(term, index, kind)
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


_SECTOR = 512
_ZERO_SECTOR = bytes(_SECTOR)


def _zero_sector_within(view: memoryview, start: int, stop: int) -> bool:
    """Whether an all-zero, sector-aligned block of the file overlaps bytes ``start:stop``."""
    block = start - start % _SECTOR
    while block < stop and block + _SECTOR <= len(view):
        if view[block : block + _SECTOR] == _ZERO_SECTOR:
            return True
        block += _SECTOR
    return False


_INDEX = struct.Struct("<Q")
#: How many places that look like a record's index field are checked.
_MAX_PROBES = 1024


def _intact_record_after(data: bytes, view: memoryview, pos: int, index: int) -> bool:
    """Whether the log goes on, intact, past a record whose length runs past the end.

    A crash cuts the file inside the record it was writing: nothing intact
    follows. A damaged length field makes a whole record look cut; its true
    length then gives back its checksum (for one flipped bit, among 32
    candidates), or intact later records are found behind it (the next
    entry, ``index + 1``, or a commit record naming ``index``).
    """
    end = len(data)
    size, crc = _FRAME.unpack_from(data, pos)
    body = pos + _FRAME.size
    for bit in range(32):
        length = size ^ (1 << bit)
        if _ENTRY.size <= length <= end - body and zlib.crc32(view[body : body + length]) == crc:
            return True
    probes = 0
    for later in (index + 1, index):
        needle = _INDEX.pack(later)
        # A record's index field sits 16 bytes into it (length, crc, term).
        hit = data.find(needle, body + _ENTRY.size + 16)
        while hit != -1 and probes < _MAX_PROBES:
            probes += 1
            start = hit - 16
            length, check = _FRAME.unpack_from(data, start)
            stop = start + _FRAME.size + length
            if (
                _ENTRY.size <= length
                and stop <= end
                and zlib.crc32(view[start + _FRAME.size : stop]) == check
            ):
                return True
            hit = data.find(needle, hit + 1)
    return False


def segment_name(first_index: int) -> str:
    return f"log-{first_index:020d}.seg"


def _close_fds(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


class FileStorage:
    """:class:`Storage` in files under ``data_dir``.

    Opening takes an exclusive lock on ``data_dir/LOCK`` (a second opener,
    in this process or another, gets :class:`StorageLockedError`) and checks
    or creates ``data_dir/META`` (another cluster or node id raises
    :class:`StorageMismatchError`). :meth:`load` reads and checks everything
    and repairs a torn log tail.

    ``segment_bytes`` is a soft limit: a new segment starts when the current
    one has reached it, so one save never spans two segments.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        cluster_id: str,
        node_id: str,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        if segment_bytes < _SEG_HEADER.size:
            raise ValueError(f"segment_bytes must be at least {_SEG_HEADER.size}")
        self.path = Path(data_dir)
        self.cluster_id = cluster_id
        self.node_id = node_id
        self.segment_bytes = segment_bytes
        # Open descriptors live in a list shared with a finalizer, so that a
        # storage object dropped without close() (a simulated crash) still
        # releases its lock when it is garbage collected.
        self._fds: list[int] = []
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)
        # The sync calls, as attributes so that tests can stage a crash at any of them.
        self._datasync: Callable[[int], None] = _datasync
        self._fsync: Callable[[int], None] = os.fsync
        self._dirsync: Callable[[Path], None] = _fsync_dir
        self._segments: list[_Segment] = []
        self._fd: int | None = None  # the last segment, open for writing
        self._hard_state = HardState()
        #: the commit index in the HARDSTATE file (commit records may hold a higher one)
        self._file_commit = 0
        self._snapshot: Snapshot | None = None
        self._loaded = False
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create data directory {self.path}: {exc}") from exc
        try:
            self._lock()
        except OSError as exc:
            raise StorageError(f"cannot lock data directory {self.path}: {exc}") from exc
        try:
            self._check_meta()
        except OSError as exc:
            self.close()
            raise StorageError(f"cannot set up data directory {self.path}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    # -- opening --------------------------------------------------------------

    def _lock(self) -> None:
        lock_path = self.path / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StorageLockedError(
                    f"{lock_path} is locked: another process is using data directory {self.path}"
                ) from None
            raise StorageError(f"cannot lock {lock_path}: {exc}") from exc
        self._fds.append(fd)

    def _check_meta(self) -> None:
        meta_path = self.path / META_NAME
        try:
            raw = meta_path.read_bytes()
        except FileNotFoundError:
            raw = None
        if raw is None:
            stray = [
                p.name
                for p in self.path.iterdir()
                if p.name in (HARD_STATE_NAME, SNAPSHOT_NAME) or _SEGMENT_RE.match(p.name)
            ]
            if stray:
                raise CorruptStorageError(
                    f"{meta_path} is missing but {self.path} holds Raft files ({', '.join(stray)})"
                )
            meta = {
                "format": FORMAT_VERSION,
                "cluster_id": self.cluster_id,
                "node_id": self.node_id,
            }
            text = json.dumps(meta, sort_keys=True) + "\n"
            self._replace_file(META_NAME, text.encode("utf-8"))
            return
        try:
            meta = json.loads(raw.decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
            version = meta["format"]
            cluster_id = meta["cluster_id"]
            node_id = meta["node_id"]
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            raise CorruptStorageError(f"{meta_path}: unreadable metadata ({exc})") from None
        if version != FORMAT_VERSION:
            raise StorageMismatchError(
                f"{meta_path}: format version {version!r}, this version reads {FORMAT_VERSION}"
            )
        if cluster_id != self.cluster_id:
            raise StorageMismatchError(
                f"{meta_path}: data directory belongs to cluster {cluster_id!r},"
                f" not {self.cluster_id!r}"
            )
        if node_id != self.node_id:
            raise StorageMismatchError(
                f"{meta_path}: data directory belongs to node {node_id!r}, not {self.node_id!r}"
            )

    def _replace_file(self, name: str, data: bytes) -> None:
        """Atomically replace ``name``: write a temporary file, fsync, rename, fsync the dir."""
        tmp = self.path / (name + TMP_SUFFIX)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data, 0)
            self._fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path / name)
        self._dirsync(self.path)

    # -- loading --------------------------------------------------------------

    def load(self) -> PersistedState:
        """Read, check and repair what is on disk; see the module docstring."""
        self._check_open()
        self._loaded = False
        try:
            state = self._load()
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot load the Raft state: {exc}") from exc
        self._loaded = True
        return state

    def _load(self) -> PersistedState:
        self._close_segment()
        self._segments = []
        for tmp in self.path.glob("*" + TMP_SUFFIX):
            tmp.unlink()
        hs_path = self.path / HARD_STATE_NAME
        self._hard_state = (
            decode_hard_state(hs_path.read_bytes(), str(hs_path))
            if hs_path.exists()
            else HardState()
        )
        snap_path = self.path / SNAPSHOT_NAME
        self._snapshot = (
            decode_snapshot(snap_path.read_bytes(), str(snap_path)) if snap_path.exists() else None
        )
        self._file_commit = self._hard_state.commit
        entries = self._load_segments()
        if self._segments:
            seg = self._segments[-1]
            fd = os.open(seg.path, os.O_RDWR)
            self._fds.append(fd)
            self._fd = fd
        return PersistedState(
            hard_state=self._hard_state, snapshot=self._snapshot, entries=tuple(entries)
        )

    def _load_segments(self) -> list[Entry]:
        """Read all segments and return the entries after the snapshot."""
        found: list[tuple[int, Path]] = []
        for p in self.path.iterdir():
            match = _SEGMENT_RE.match(p.name)
            if match:
                found.append((int(match.group(1)), p))
        found.sort()
        entries: list[Entry] = []
        segments: list[_Segment] = []
        commit = 0
        for n, (first, path) in enumerate(found):
            last_file = n == len(found) - 1
            seg, seg_entries, seg_commit = self._read_segment(path, first, last_file)
            if seg is None:
                continue
            commit = max(commit, seg_commit)
            if segments and seg.first_index != segments[-1].last_index + 1:
                raise CorruptStorageError(
                    f"{path}: starts at index {seg.first_index} but the previous segment"
                    f" ends at {segments[-1].last_index}: segment"
                    f" {segment_name(segments[-1].last_index + 1)} is missing"
                )
            segments.append(seg)
            entries.extend(seg_entries)
        if segments and segments[-1].sealed:
            seg = segments[-1]
            raise CorruptStorageError(
                f"{seg.path}: the log continues in segment {segment_name(seg.last_index + 1)},"
                " which is missing"
            )
        # Apply the snapshot to the log, as save() does; this finishes a
        # compaction a crash interrupted.
        snap_index = self._snapshot_index
        if self._snapshot is not None and entries:
            meta = self._snapshot.meta
            first = entries[0].index
            if first > snap_index + 1:
                raise CorruptStorageError(
                    f"{segments[0].path}: the log starts at index {first} but the snapshot"
                    f" ends at {snap_index}: segment {segment_name(snap_index + 1)} is missing"
                )
            pos = snap_index - first
            if pos < 0 or (pos < len(entries) and entries[pos].term == meta.term):
                entries = entries[pos + 1 :]
            else:
                entries = []
        elif entries and entries[0].index != 1:
            raise CorruptStorageError(
                f"{segments[0].path}: the log starts at index {entries[0].index} and there is"
                f" no snapshot: segment {segment_name(1)} is missing"
            )
        if commit > self._hard_state.commit:
            hs = self._hard_state
            self._hard_state = HardState(hs.term, hs.vote, commit)
        last = entries[-1].index if entries else snap_index
        if self._hard_state.commit > last:
            raise CorruptStorageError(
                f"{self.path}: the hard state records commit index {self._hard_state.commit}"
                f" but the log ends at {last}: a log segment is missing"
            )
        self._segments = segments
        self._drop_segments_before(snap_index, keep_from=entries[0].index if entries else None)
        return entries

    def _read_segment(
        self, path: Path, first: int, last_file: bool
    ) -> tuple[_Segment | None, list[Entry], int]:
        data = path.read_bytes()
        if len(data) < _SEG_HEADER.size:
            if last_file:
                logger.warning(
                    "%s: removing a segment with a torn header (%d bytes)", path, len(data)
                )
                path.unlink()
                _fsync_dir(self.path)
                return None, [], 0
            raise CorruptStorageError(f"{path}: segment header is truncated")
        magic, version, header_first = _SEG_HEADER.unpack_from(data)
        if magic != _SEG_MAGIC:
            raise CorruptStorageError(f"{path}: not a log segment (bad magic {magic!r})")
        if version != FORMAT_VERSION:
            raise StorageMismatchError(f"{path}: unsupported format version {version}")
        if header_first != first:
            raise CorruptStorageError(
                f"{path}: header says the segment starts at {header_first}, its name says {first}"
            )
        seg = _Segment(path, first)
        entries: list[Entry] = []
        commit = 0
        pos = _SEG_HEADER.size
        end = len(data)
        view = memoryview(data)
        torn: str | None = None
        while pos < end:
            if end - pos < _FRAME.size:
                torn = "a partial record header"
                break
            size, crc = _FRAME.unpack_from(data, pos)
            body_start = pos + _FRAME.size
            body_end = body_start + size
            if body_end > end:
                if _intact_record_after(data, view, pos, first + len(entries)):
                    raise CorruptStorageError(
                        f"{path}: the record at offset {pos} (index {first + len(entries)})"
                        f" claims {size} bytes, past the end of the file, but intact records"
                        " follow it: its length is damaged; the log is corrupt"
                    )
                torn = "a partial record"
                break
            if size < _ENTRY.size or zlib.crc32(view[body_start:body_end]) != crc:
                if body_end == end or not any(view[pos:end]):
                    torn = "a damaged last record"
                    break
                if _zero_sector_within(view, pos, min(body_end, end)):
                    # Pages of an interrupted write that never reached the
                    # disk read back as zeros, possibly before pages that did.
                    torn = "a record cut by unwritten (zeroed) sectors"
                    break
                raise CorruptStorageError(
                    f"{path}: checksum mismatch in the record at offset {pos}"
                    f" (index {first + len(entries)}); the log is corrupt"
                )
            term, index, kind = _ENTRY.unpack_from(data, body_start)
            if kind in (_COMMIT_RECORD, _SEAL_RECORD):
                if size != _ENTRY.size or seg.sealed:
                    raise CorruptStorageError(f"{path}: malformed record at offset {pos}")
                if kind == _COMMIT_RECORD:
                    commit = max(commit, index)
                else:
                    if index != first + len(entries):
                        raise CorruptStorageError(
                            f"{path}: seal at offset {pos} names index {index},"
                            f" expected {first + len(entries)}"
                        )
                    seg.sealed = True
                    seg.size = pos
                pos = body_end
                continue
            if seg.sealed:
                raise CorruptStorageError(f"{path}: record after the seal at offset {pos}")
            expected = first + len(entries)
            if index != expected:
                raise CorruptStorageError(
                    f"{path}: record at offset {pos} has index {index}, expected {expected}"
                )
            try:
                entry_type = EntryType(kind)
            except ValueError:
                raise CorruptStorageError(
                    f"{path}: record at offset {pos} has unknown entry type {kind}"
                ) from None
            entries.append(
                Entry(term, index, entry_type, data[body_start + _ENTRY.size : body_end])
            )
            seg.offsets.append(pos)
            seg.terms.append(term)
            pos = body_end
        if torn is not None:
            if not last_file:
                raise CorruptStorageError(
                    f"{path}: {torn} at offset {pos} in a segment that is not the last one"
                )
            logger.warning(
                "%s: truncating a torn tail at offset %d (%s, %d bytes dropped)",
                path,
                pos,
                torn,
                end - pos,
            )
            fd = os.open(path, os.O_RDWR)
            try:
                os.ftruncate(fd, pos)
                os.fsync(fd)
            finally:
                os.close(fd)
        if not seg.sealed:
            seg.size = pos
        return seg, entries, commit

    # -- saving ---------------------------------------------------------------

    @property
    def _snapshot_index(self) -> int:
        return self._snapshot.meta.index if self._snapshot is not None else 0

    @property
    def _last_index(self) -> int:
        if self._segments and self._segments[-1].offsets:
            return self._segments[-1].last_index
        if self._segments:
            return self._segments[-1].first_index - 1
        return self._snapshot_index

    def _term_at(self, index: int) -> int | None:
        for seg in reversed(self._segments):
            if seg.first_index <= index <= seg.last_index:
                return seg.terms[index - seg.first_index]
        return None

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        """Persist one Ready durably; see :meth:`Storage.save`.

        An I/O error is raised as :class:`StorageError`; after any failure
        other than a refused argument, the storage refuses further saves
        until :meth:`load` has re-read the disk.
        """
        self._check_open()
        if not self._loaded:
            raise StorageError(
                f"{self.path}: save() needs a successful load() first"
                " (after a failed save, load() again)"
            )
        try:
            self._save(hard_state, entries, snapshot)
        except StorageError:
            raise
        except OSError as exc:
            self._loaded = False
            raise StorageError(f"{self.path}: save failed: {exc}") from exc
        except BaseException:
            self._loaded = False
            raise

    def _save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: Snapshot | None,
    ) -> None:
        if snapshot is not None and snapshot.meta.index > self._snapshot_index:
            self._save_snapshot(snapshot)
        if entries:
            snap_index = self._snapshot_index
            if entries[0].index <= snap_index:
                entries = [e for e in entries if e.index > snap_index]
        # A new term or vote replaces the hard state file (after the entries
        # are durable). A new commit index alone travels as a commit record
        # behind the entries, in the same write and the same sync: one sync
        # per save in the steady state instead of three.
        commit_record = None
        rewrite = False
        if hard_state is not None:
            old = self._hard_state
            hard_state = _merge_hard_state(old, hard_state)
            if hard_state.term != old.term or hard_state.vote != old.vote:
                rewrite = True
            elif hard_state.commit > old.commit:
                commit_record = hard_state
        if entries or commit_record is not None:
            self._append(entries, commit_record)
        if hard_state is not None:
            self._hard_state = hard_state
            if rewrite:
                self._write_hard_state()

    def _save_snapshot(self, snapshot: Snapshot) -> None:
        meta = snapshot.meta
        keep = self._term_at(meta.index) == meta.term
        self._replace_file(SNAPSHOT_NAME, encode_snapshot(snapshot))
        self._snapshot = snapshot
        if keep:
            last = self._last_index
            self._drop_segments_before(meta.index, keep_from=meta.index + 1)
            if not self._segments and last > meta.index:
                raise StorageError("internal error: compaction dropped live entries")
        else:
            self._drop_segments_before(meta.index, keep_from=None)

    def _write_hard_state(self) -> None:
        self._replace_file(HARD_STATE_NAME, encode_hard_state(self._hard_state))
        self._file_commit = self._hard_state.commit

    def _preserve_commit(self) -> None:
        """Before log records are deleted: move the commit index they may hold to HARDSTATE."""
        if self._hard_state.commit > self._file_commit:
            self._write_hard_state()

    def _drop_segments_before(self, snap_index: int, keep_from: int | None) -> None:
        """Delete segments holding nothing at or after ``keep_from`` (all if ``None``).

        Either way every step leaves a valid log if a crash interrupts it: a
        prefix goes oldest first (what is left still starts at or before the
        snapshot's successor); the whole log goes newest first, like a cut,
        so that no gap and no dangling seal is ever visible.
        """
        if keep_from is None:
            if self._segments:
                self._truncate_from(self._segments[0].first_index)
            return
        dropped = False
        keep: list[_Segment] = []
        for n, seg in enumerate(self._segments):
            is_last = n == len(self._segments) - 1
            if seg.last_index >= keep_from or (
                is_last and not seg.offsets and seg.first_index == keep_from
            ):
                keep.append(seg)
                continue
            if not dropped:
                self._preserve_commit()
            if is_last:
                self._close_segment()
            seg.path.unlink()
            dropped = True
        self._segments = keep
        if dropped:
            # Not strictly required (a lost unlink is redone on load), but it
            # keeps disk usage honest after a crash.
            self._dirsync(self.path)

    def _append(self, entries: Sequence[Entry], commit_record: HardState | None) -> None:
        last = self._last_index
        if entries:
            _check_entries(entries)
            first = entries[0].index
            if first > last + 1:
                raise StorageError(f"entries to save start at {first} but the log ends at {last}")
            if first <= last:
                self._truncate_from(first)
        else:
            first = last + 1
        data, sizes = encode_entries(entries)
        if commit_record is not None:
            data += _record(commit_record.term, commit_record.commit, _COMMIT_RECORD)
        new_segment = False
        previous: tuple[_Segment, int] | None = None
        if not self._segments or self._segments[-1].size >= self.segment_bytes:
            if self._fd is not None:
                previous = (self._segments[-1], self._fd)
                self._fd = None
            seg = _Segment(self.path / segment_name(first), first)
            fd = os.open(seg.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            self._fd = fd
            data = _SEG_HEADER.pack(_SEG_MAGIC, FORMAT_VERSION, first) + data
            seg.size = 0
            self._segments.append(seg)
            new_segment = True
        seg = self._segments[-1]
        out = self._fd
        if out is None:
            raise StorageError("internal error: no open segment")
        start = seg.size
        _write_all(out, data, start)
        self._datasync(out)
        if new_segment:
            self._dirsync(self.path)
        if previous is not None:
            # Seal the full segment only now that its successor is durable, so
            # a seal always names a segment that exists.
            old, old_fd = previous
            _write_all(old_fd, _record(0, first, _SEAL_RECORD), old.size)
            self._datasync(old_fd)
            old.sealed = True
            self._fds.remove(old_fd)
            os.close(old_fd)
        offset = start + (_SEG_HEADER.size if new_segment else 0)
        offsets = seg.offsets
        terms = seg.terms
        for entry, size in zip(entries, sizes, strict=True):
            offsets.append(offset)
            terms.append(entry.term)
            offset += size
        seg.size = start + len(data)

    def _truncate_from(self, index: int) -> None:
        """Durably remove the records at ``index`` and after (a rare event: a log conflict).

        Every step is synced before the next, so that a crash at any point
        leaves a valid log: the old one cut somewhere at or after ``index``.
        Whole segments go newest first, each after its predecessor has lost
        its seal (a seal naming a deleted segment would read as a missing
        segment); then the segment holding ``index`` is cut.
        """
        self._preserve_commit()
        while self._segments and self._segments[-1].first_index >= index:
            self._close_segment()
            doomed = self._segments.pop()
            if self._segments and self._segments[-1].sealed:
                prev = self._segments[-1]
                fd = os.open(prev.path, os.O_RDWR)
                try:
                    os.ftruncate(fd, prev.size)
                    self._datasync(fd)
                finally:
                    os.close(fd)
                prev.sealed = False
            doomed.path.unlink()
            self._dirsync(self.path)
        if not self._segments:
            return
        if self._fd is None:
            fd = os.open(self._segments[-1].path, os.O_RDWR)
            self._fds.append(fd)
            self._fd = fd
        seg = self._segments[-1]
        pos = index - seg.first_index
        if pos < len(seg.offsets) or seg.sealed:
            cut = seg.offsets[pos] if pos < len(seg.offsets) else seg.size
            del seg.offsets[pos:]
            del seg.terms[pos:]
            seg.size = cut
            seg.sealed = False
            os.ftruncate(self._fd, cut)
            # Synced at once: the next write may go to a new segment, and the
            # dropped records must not come back after a crash.
            self._datasync(self._fd)

    # -- closing --------------------------------------------------------------

    def _close_segment(self) -> None:
        fd = self._fd
        if fd is not None:
            self._fd = None
            self._fds.remove(fd)
            os.close(fd)

    def _check_open(self) -> None:
        if not self._fds:
            raise StorageError(f"storage for {self.path} is closed")

    def close(self) -> None:
        """Close every file and release the lock. Writes nothing: every save is already durable."""
        self._fd = None
        self._finalizer()

    def __enter__(self) -> FileStorage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
