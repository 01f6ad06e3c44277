"""The values that flow in and out of the Raft core.

These records are the contract between the sans-IO core (:mod:`.core`), the
storage that persists what the core asks it to (:mod:`.storage`), the Trio
driver that runs a node (:mod:`.node`) and the transports that carry
:class:`Message` between nodes. They are small, immutable and carry no
behaviour beyond validation, so every layer can share them without
sharing state.

Node ids are strings. The library uses a node's advertised address
(``"127.0.0.1:7001"``) as its id, so every node given the same peer list
agrees on every id without talking first.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

NodeId = str


class EntryType(enum.IntEnum):
    """What an :class:`Entry` carries."""

    #: An application command: ``data`` is handed to the state machine.
    NORMAL = 0
    #: The empty entry a new leader appends to commit entries of older terms.
    NOOP = 1
    #: A membership change: ``data`` is an encoded :class:`ConfChange`.
    CONF_CHANGE = 2


@dataclass(frozen=True, slots=True)
class Entry:
    """One record of the replicated log."""

    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


class ConfChangeType(enum.IntEnum):
    """The single-server membership changes the core supports."""

    #: Add a voter, or promote an existing learner to voter.
    ADD_VOTER = 0
    #: Add a non-voting learner that receives the log but does not vote.
    ADD_LEARNER = 1
    #: Remove a voter or a learner.
    REMOVE_NODE = 2


@dataclass(frozen=True, slots=True)
class ConfChange:
    """A membership change proposed through the log.

    ``context`` is opaque to Raft; the library puts the node's address there
    so that the Registry learns it when the change is applied.
    """

    type: ConfChangeType
    node_id: NodeId
    context: bytes = b""

    def encode(self) -> bytes:
        """Encode for :attr:`Entry.data` (length-prefixed node id, then context)."""
        node = self.node_id.encode("utf-8")
        return bytes((int(self.type),)) + len(node).to_bytes(4, "big") + node + self.context

    @classmethod
    def decode(cls, data: bytes) -> ConfChange:
        """Inverse of :meth:`encode`; raises :class:`ValueError` on malformed input."""
        if len(data) < 5:
            raise ValueError("conf change entry is truncated")
        try:
            kind = ConfChangeType(data[0])
        except ValueError:
            raise ValueError(f"unknown conf change type {data[0]}") from None
        size = int.from_bytes(data[1:5], "big")
        if 5 + size > len(data):
            raise ValueError("conf change entry is truncated")
        node = data[5 : 5 + size].decode("utf-8")
        return cls(kind, node, bytes(data[5 + size :]))


@dataclass(frozen=True, slots=True)
class ConfState:
    """The membership in force: who votes and who only learns."""

    voters: frozenset[NodeId] = frozenset()
    learners: frozenset[NodeId] = frozenset()

    def __post_init__(self) -> None:
        if self.voters & self.learners:
            raise ValueError("a node cannot be both voter and learner")

    @property
    def members(self) -> frozenset[NodeId]:
        return self.voters | self.learners


@dataclass(frozen=True, slots=True)
class HardState:
    """What a node must remember across a crash besides its log."""

    term: int = 0
    vote: NodeId | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """Where a snapshot sits in the log, and the membership at that point."""

    index: int = 0
    term: int = 0
    conf: ConfState = field(default_factory=ConfState)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A state machine image that replaces the log up to ``meta.index``."""

    meta: SnapshotMeta
    data: bytes = b""


class MessageType(enum.IntEnum):
    """Kinds of messages exchanged between cores."""

    VOTE = 0
    VOTE_RESP = 1
    PRE_VOTE = 2
    PRE_VOTE_RESP = 3
    APPEND = 4
    APPEND_RESP = 5
    HEARTBEAT = 6
    HEARTBEAT_RESP = 7
    SNAPSHOT = 8
    SNAPSHOT_RESP = 9
    TIMEOUT_NOW = 10


@dataclass(frozen=True, slots=True)
class Message:
    """One message between two cores; which fields matter depends on ``type``.

    * VOTE / PRE_VOTE: ``index`` and ``log_term`` describe the candidate's
      last entry; ``context`` is ``b"transfer"`` for a campaign started by a
      leadership transfer (it may then bypass the leader-lease check).
    * *_RESP: ``reject`` says whether the request was refused.
    * APPEND: ``index``/``log_term`` locate the entry preceding ``entries``;
      ``commit`` is the leader's commit index.
    * APPEND_RESP: ``index`` is the highest index now matching the leader
      (accept), or the rejected ``index`` (reject) with the hints
      ``reject_hint`` (an index to retry from) and ``conflict_term``.
    * HEARTBEAT: ``commit`` as for APPEND (capped at what the follower
      matches); ``context`` carries read/transfer tokens if any.
    * SNAPSHOT: one chunk of ``snapshot`` at ``snapshot_offset`` with
      ``snapshot_data``; ``snapshot_done`` marks the last chunk.
    * SNAPSHOT_RESP: ``snapshot_offset`` is the next offset the follower
      expects, ``reject`` asks the leader to restart the transfer; on the
      last chunk an APPEND_RESP follows instead.
    """

    type: MessageType
    to: NodeId
    sender: NodeId
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    conflict_term: int = 0
    snapshot: SnapshotMeta | None = None
    snapshot_offset: int = 0
    snapshot_data: bytes = b""
    snapshot_done: bool = False
    context: bytes = b""


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"
    LEARNER = "learner"


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state a caller may want to observe; not persisted."""

    role: Role
    leader: NodeId | None


@dataclass(slots=True)
class Ready:
    """Everything the core needs its caller to do, in the order to do it.

    1. Persist :attr:`hard_state` (if not ``None``), :attr:`snapshot` (if not
       ``None``) and :attr:`entries` (appending them; an entry whose index is
       already stored replaces it and everything after it). Make it durable
       (fsync) before step 2.
    2. Send :attr:`messages`. They may depend on step 1 (a granted vote, an
       accepted append) and must never leave before it is durable.
    3. If :attr:`install_snapshot` is true, replace the state machine with
       ``snapshot.data``; then apply :attr:`committed_entries` in order.
    4. Call ``core.advance(ready)``. No new :class:`Ready` is produced
       before that.
    """

    hard_state: HardState | None = None
    entries: list[Entry] = field(default_factory=list)
    snapshot: Snapshot | None = None
    install_snapshot: bool = False
    messages: list[Message] = field(default_factory=list)
    committed_entries: list[Entry] = field(default_factory=list)
    soft_state: SoftState | None = None


@dataclass(frozen=True, slots=True)
class PersistedState:
    """What storage hands the core on start: everything step 1 of Ready wrote.

    ``entries`` are the stored entries after ``snapshot.meta.index``
    (contiguous). A brand-new node has no snapshot and no entries; it is
    bootstrapped with :attr:`initial_conf` (the voters given by the user).
    """

    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()
    initial_conf: ConfState | None = None
