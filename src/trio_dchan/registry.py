"""The Registry: the one state machine Raft replicates.

It records who receives what -- for each namespace, the receivers that exist,
on which node, with how much buffer -- and the cluster's members with their
addresses. It is written only by applying committed log entries
(:meth:`Registry.apply`), in log order, on every node; so every node's
Registry goes through the same states. Routers read it and wait for it to
change (:meth:`Registry.wait_for`) without polling.

Applying is pure and deterministic: no I/O, no clock, no RPC. Its only side
effect beyond its own state is waking the tasks waiting for a change. A
command that does not decode, or does not validate, changes nothing and
yields an error result; a duplicate or stale command is a no-op. Results are
plain data because they travel back to the proposer through the codec:

* ``True``: the command changed the state;
* ``False``: it was a harmless no-op (duplicate, stale, already done);
* ``{"error": "..."}``: it was refused (see :func:`result_error`).

Commands are encoded with cbor2 as plain lists so any node version can read
them: ``[kind, field, ...]`` with ``kind`` 1 (register), 2 (unregister) or
3 (unregister node).
"""

from __future__ import annotations

import struct
import types
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import cbor2
import trio

from .errors import DchanError
from .raft.types import ConfChange, ConfChangeType, Entry, EntryType, NodeId

__all__ = [
    "Command",
    "CommandError",
    "ReceiverInfo",
    "RegisterReceiver",
    "Registry",
    "RegistryError",
    "SnapshotError",
    "UnregisterNode",
    "UnregisterReceiver",
    "decode_command",
    "encode_command",
    "result_error",
]

#: Longest namespace, receiver id or node id accepted, in characters.
MAX_NAME_LENGTH = 1024
#: Largest receiver buffer accepted.
MAX_BUFFER = 2**31 - 1

_REGISTER = 1
_UNREGISTER = 2
_UNREGISTER_NODE = 3

SNAPSHOT_VERSION = 1
_SNAP_MAGIC = b"DCRG"
_SNAP_HEADER = struct.Struct("<4sII")  # magic, version, crc32 of the body


class RegistryError(DchanError):
    """Base class of the Registry's errors."""


class CommandError(RegistryError):
    """A Registry command that does not decode or does not validate."""


class SnapshotError(RegistryError):
    """A Registry snapshot that fails its checksum, its version or its validation."""


@dataclass(frozen=True, slots=True)
class ReceiverInfo:
    """One registered receiver, as every node sees it."""

    receiver_id: str
    namespace: str
    node_id: NodeId
    #: how many messages the receiver buffers
    buffer: int
    #: log index of the registration; orders the receivers of a namespace
    index: int


@dataclass(frozen=True, slots=True)
class RegisterReceiver:
    """Add a receiver. The first registration of a receiver id wins; repeats are no-ops."""

    namespace: str
    receiver_id: str
    node_id: NodeId
    buffer: int


@dataclass(frozen=True, slots=True)
class UnregisterReceiver:
    """Remove one receiver (a no-op if it is already gone)."""

    namespace: str
    receiver_id: str


@dataclass(frozen=True, slots=True)
class UnregisterNode:
    """Remove every receiver of a node, e.g. when it restarts; membership is unchanged."""

    node_id: NodeId


Command = RegisterReceiver | UnregisterReceiver | UnregisterNode


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise CommandError(f"{what} must be a string, not {type(value).__name__}")
    if not value:
        raise CommandError(f"{what} must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise CommandError(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    return value


def _check_count(what: str, value: object, low: int, high: int) -> int:
    if type(value) is not int:
        raise CommandError(f"{what} must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise CommandError(f"{what} must be between {low} and {high}, not {value}")
    return value


_C = TypeVar("_C", bound=Command)


def validate_command(cmd: _C) -> _C:
    """Check every field of ``cmd``; raise :class:`CommandError` if one is bad."""
    if isinstance(cmd, RegisterReceiver):
        _check_name("namespace", cmd.namespace)
        _check_name("receiver id", cmd.receiver_id)
        _check_name("node id", cmd.node_id)
        _check_count("buffer", cmd.buffer, 0, MAX_BUFFER)
    elif isinstance(cmd, UnregisterReceiver):
        _check_name("namespace", cmd.namespace)
        _check_name("receiver id", cmd.receiver_id)
    elif isinstance(cmd, UnregisterNode):
        _check_name("node id", cmd.node_id)
    else:
        raise CommandError(f"not a Registry command: {type(cmd).__name__}")
    return cmd


def encode_command(cmd: Command) -> bytes:
    """Encode a command for :meth:`RaftNode.propose`; raises :class:`CommandError` if invalid."""
    validate_command(cmd)
    if isinstance(cmd, RegisterReceiver):
        fields: list[object] = [
            _REGISTER,
            cmd.namespace,
            cmd.receiver_id,
            cmd.node_id,
            cmd.buffer,
        ]
    elif isinstance(cmd, UnregisterReceiver):
        fields = [_UNREGISTER, cmd.namespace, cmd.receiver_id]
    else:
        fields = [_UNREGISTER_NODE, cmd.node_id]
    return bytes(cbor2.dumps(fields))


def decode_command(data: bytes) -> Command:
    """Inverse of :func:`encode_command`; raises :class:`CommandError` on anything malformed."""
    try:
        fields = cbor2.loads(data)
    except Exception as exc:
        raise CommandError(f"command does not decode: {exc}") from None
    if not isinstance(fields, list) or not fields:
        raise CommandError("command must be a non-empty list")
    kind, args = fields[0], fields[1:]
    cmd: Command
    if kind == _REGISTER and type(kind) is int and len(args) == 4:
        cmd = RegisterReceiver(*args)
    elif kind == _UNREGISTER and type(kind) is int and len(args) == 2:
        cmd = UnregisterReceiver(*args)
    elif kind == _UNREGISTER_NODE and type(kind) is int and len(args) == 1:
        cmd = UnregisterNode(*args)
    else:
        raise CommandError(f"unknown command kind {kind!r} with {len(args)} fields")
    return validate_command(cmd)


def result_error(result: object) -> str | None:
    """The reason an apply result is an error, or ``None`` if it is not one."""
    if isinstance(result, dict) and isinstance(result.get("error"), str):
        return str(result["error"])
    return None


def _error(message: str) -> dict[str, str]:
    return {"error": message}


class Registry:
    """The replicated Registry; implements the Raft driver's ``StateMachine``.

    ``initial_members`` seeds the members a cluster is bootstrapped with
    (node id -> address); the log's membership changes update them.

    Readers: :meth:`receivers`, :meth:`namespaces`, :attr:`members`,
    :attr:`version` (bumped by every change, never by a no-op),
    :attr:`applied_index`, and :meth:`wait_changed` / :meth:`wait_for` to wait
    for a change without polling.
    """

    def __init__(self, initial_members: Mapping[NodeId, str] | None = None) -> None:
        self._members: dict[NodeId, str] = dict(initial_members or {})
        #: nodes removed from the cluster: registrations for them are stale
        self._removed: set[NodeId] = set()
        self._namespaces: dict[str, dict[str, ReceiverInfo]] = {}
        self._views: dict[str, tuple[ReceiverInfo, ...]] = {}
        self._applied_index = 0
        self._version = 0
        self._lot = trio.lowlevel.ParkingLot()

    # -- readers --------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def applied_index(self) -> int:
        return self._applied_index

    @property
    def members(self) -> Mapping[NodeId, str]:
        """Current members and their addresses (a read-only live view)."""
        return types.MappingProxyType(self._members)

    def receivers(self, namespace: str) -> tuple[ReceiverInfo, ...]:
        """The receivers of ``namespace``, oldest registration first."""
        view = self._views.get(namespace)
        if view is None:
            table = self._namespaces.get(namespace)
            if not table:
                return ()
            view = tuple(sorted(table.values(), key=lambda r: r.index))
            self._views[namespace] = view
        return view

    def receiver(self, namespace: str, receiver_id: str) -> ReceiverInfo | None:
        table = self._namespaces.get(namespace)
        return table.get(receiver_id) if table else None

    def namespaces(self) -> tuple[str, ...]:
        """Namespaces with at least one receiver, sorted."""
        return tuple(sorted(self._namespaces))

    async def wait_changed(self, since_version: int) -> int:
        """Wait until :attr:`version` exceeds ``since_version``; return the new version."""
        while self._version <= since_version:
            await self._lot.park()
        return self._version

    async def wait_for(self, predicate: Callable[[Registry], bool]) -> None:
        """Wait until ``predicate(registry)`` is true (checked now and after every change)."""
        while True:
            version = self._version
            if predicate(self):
                return
            await self.wait_changed(version)

    # -- the state machine ----------------------------------------------------

    def apply(self, entry: Entry) -> object:
        """Apply one committed entry; see the module docstring for results.

        Entries at or below :attr:`applied_index` were applied already and
        are ignored (result ``False``).
        """
        if entry.index <= self._applied_index:
            return False
        self._applied_index = entry.index
        if entry.type == EntryType.NORMAL:
            try:
                cmd = decode_command(entry.data)
            except CommandError as exc:
                return _error(str(exc))
            changed = self._apply_command(cmd, entry.index)
        elif entry.type == EntryType.CONF_CHANGE:
            try:
                change = ConfChange.decode(entry.data)
                address = change.context.decode("utf-8") or change.node_id
            except (ValueError, UnicodeDecodeError) as exc:
                return _error(f"bad membership change: {exc}")
            changed = self._apply_conf_change(change, address)
        else:
            return None
        if changed:
            self._changed()
        return changed

    def _apply_command(self, cmd: Command, index: int) -> bool:
        if isinstance(cmd, RegisterReceiver):
            if cmd.node_id in self._removed:
                return False
            table = self._namespaces.setdefault(cmd.namespace, {})
            if cmd.receiver_id in table:
                return False
            table[cmd.receiver_id] = ReceiverInfo(
                cmd.receiver_id, cmd.namespace, cmd.node_id, cmd.buffer, index
            )
            self._views.pop(cmd.namespace, None)
            return True
        if isinstance(cmd, UnregisterReceiver):
            found = self._namespaces.get(cmd.namespace)
            if not found or cmd.receiver_id not in found:
                return False
            del found[cmd.receiver_id]
            if not found:
                del self._namespaces[cmd.namespace]
            self._views.pop(cmd.namespace, None)
            return True
        return self._drop_receivers_of(cmd.node_id)

    def _drop_receivers_of(self, node_id: NodeId) -> bool:
        changed = False
        for namespace in list(self._namespaces):
            table = self._namespaces[namespace]
            doomed = [rid for rid, info in table.items() if info.node_id == node_id]
            if not doomed:
                continue
            for rid in doomed:
                del table[rid]
            if not table:
                del self._namespaces[namespace]
            self._views.pop(namespace, None)
            changed = True
        return changed

    def _apply_conf_change(self, change: ConfChange, address: str) -> bool:
        node = change.node_id
        if change.type == ConfChangeType.REMOVE_NODE:
            changed = self._members.pop(node, None) is not None
            if node not in self._removed:
                self._removed.add(node)
                changed = True
            return self._drop_receivers_of(node) or changed
        changed = self._members.get(node) != address or node in self._removed
        self._members[node] = address
        self._removed.discard(node)
        return changed

    def _changed(self) -> None:
        self._version += 1
        if self._lot:
            self._lot.unpark_all()

    # -- snapshots ------------------------------------------------------------

    def snapshot(self) -> bytes:
        """Encode the whole state: a versioned, checksummed image for :meth:`restore`."""
        receivers = [
            [info.namespace, info.receiver_id, info.node_id, info.buffer, info.index]
            for namespace in sorted(self._namespaces)
            for info in self.receivers(namespace)
        ]
        body = bytes(
            cbor2.dumps(
                [
                    self._applied_index,
                    [[node, address] for node, address in sorted(self._members.items())],
                    sorted(self._removed),
                    receivers,
                ]
            )
        )
        return _SNAP_HEADER.pack(_SNAP_MAGIC, SNAPSHOT_VERSION, zlib.crc32(body)) + body

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a :meth:`snapshot` image and wake every waiter.

        Raises :class:`SnapshotError` and leaves the state untouched if the
        image fails its checksum, has another version or does not validate.
        """
        applied, members, removed, namespaces = _decode_snapshot(data)
        self._applied_index = applied
        self._members = members
        self._removed = removed
        self._namespaces = namespaces
        self._views = {}
        self._changed()


def _decode_snapshot(
    data: bytes,
) -> tuple[int, dict[NodeId, str], set[NodeId], dict[str, dict[str, ReceiverInfo]]]:
    if len(data) < _SNAP_HEADER.size:
        raise SnapshotError(f"Registry snapshot is truncated ({len(data)} bytes)")
    magic, version, crc = _SNAP_HEADER.unpack_from(data)
    if magic != _SNAP_MAGIC:
        raise SnapshotError(f"not a Registry snapshot (bad magic {magic!r})")
    if version != SNAPSHOT_VERSION:
        raise SnapshotError(
            f"Registry snapshot version {version} is not supported (this node reads"
            f" version {SNAPSHOT_VERSION})"
        )
    body = data[_SNAP_HEADER.size :]
    if zlib.crc32(body) != crc:
        raise SnapshotError("Registry snapshot checksum mismatch")
    try:
        image: Any = cbor2.loads(body)
    except Exception as exc:
        raise SnapshotError(f"Registry snapshot does not decode: {exc}") from None
    try:
        if not isinstance(image, list) or len(image) != 4:
            raise CommandError("the image must be a list of 4 items")
        raw_applied, raw_members, raw_removed, raw_receivers = image
        applied = _check_count("applied index", raw_applied, 0, 2**64 - 1)
        members: dict[NodeId, str] = {}
        for pair in _as_list("members", raw_members):
            node, address = _as_list("member", pair, 2)
            members[_check_name("node id", node)] = _check_name("address", address)
        removed = {_check_name("node id", n) for n in _as_list("removed", raw_removed)}
        namespaces: dict[str, dict[str, ReceiverInfo]] = {}
        for row in _as_list("receivers", raw_receivers):
            cmd = validate_command(RegisterReceiver(*_as_list("receiver", row, 5)[:4]))
            index = _check_count("registration index", row[4], 1, applied)
            table = namespaces.setdefault(cmd.namespace, {})
            if cmd.receiver_id in table:
                raise CommandError(f"receiver {cmd.receiver_id!r} appears twice")
            table[cmd.receiver_id] = ReceiverInfo(
                cmd.receiver_id, cmd.namespace, cmd.node_id, cmd.buffer, index
            )
    except CommandError as exc:
        raise SnapshotError(f"Registry snapshot is malformed: {exc}") from None
    return applied, members, removed, namespaces


def _as_list(what: str, value: object, size: int | None = None) -> list[Any]:
    if not isinstance(value, list):
        raise CommandError(f"{what} must be a list")
    if size is not None and len(value) != size:
        raise CommandError(f"{what} must have {size} items")
    return value
