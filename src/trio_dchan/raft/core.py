"""The sans-IO Raft state machine.

:class:`RaftCore` implements the algorithm and nothing else: it never reads a
clock, a socket, a file or the global :mod:`random` state. Inputs are method
calls (:meth:`~RaftCore.tick`, :meth:`~RaftCore.step`,
:meth:`~RaftCore.propose`, ...); outputs are collected in a
:class:`~trio_dchan.raft.types.Ready` that the caller acts on and then
acknowledges with :meth:`~RaftCore.advance`. The same inputs always produce
the same outputs, which is what lets :mod:`trio_dchan.raft.sim` replay a whole
faulty cluster from one seed.
"""

from __future__ import annotations

import random
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count, repeat
from operator import attrgetter

from .errors import (
    CompactedError,
    ConfChangeInProgress,
    InvalidConfChange,
    InvalidMessage,
    InvalidPersistedState,
    InvalidRequest,
    LeadershipTransferInProgress,
    NotLeader,
    SnapshotOutOfDate,
    UnknownNode,
)
from .types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    NodeId,
    PersistedState,
    Ready,
    Role,
    Snapshot,
    SnapshotMeta,
    SoftState,
)

__all__ = ["RaftConfig", "RaftCore"]

#: ``Message.context`` of a campaign started by a leadership transfer.
TRANSFER_CONTEXT = b"transfer"

_NORMAL = EntryType.NORMAL
_CONF_CHANGE = EntryType.CONF_CHANGE
_get_term = attrgetter("term")
_get_type = attrgetter("type")
_get_data = attrgetter("data")

# Progress states of a follower, as seen by the leader.
_PROBE = 0  # one append at a time until the follower's match is known
_REPLICATE = 1  # optimistic pipelining of appends
_SNAPSHOT = 2  # a snapshot is being streamed in chunks


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Tunables of one core. Times are in ticks (see :meth:`RaftCore.tick`)."""

    #: This node's id.
    id: NodeId
    #: A follower that hears nothing from a leader for a random number of
    #: ticks in ``[election_ticks, 2 * election_ticks)`` starts an election.
    election_ticks: int = 10
    #: A leader sends heartbeats every ``heartbeat_ticks``.
    heartbeat_ticks: int = 1
    #: Run a pre-vote round before a real election, so that a node that was
    #: partitioned away does not raise the term and disrupt a healthy leader.
    pre_vote: bool = True
    #: A leader that has not heard from a quorum within ``election_ticks``
    #: steps down; followers ignore vote requests while they trust a leader.
    check_quorum: bool = True
    #: Upper bound on entries in one APPEND message.
    max_entries_per_message: int = 4096
    #: Upper bound on entry payload bytes in one APPEND message (an entry
    #: larger than this still goes, alone).
    max_bytes_per_message: int = 1 << 20
    #: APPEND messages in flight to one follower while replicating.
    max_inflight_messages: int = 64
    #: Bytes of snapshot data per SNAPSHOT message.
    snapshot_chunk_size: int = 1 << 20
    #: Largest snapshot this node assembles from chunks: a leader that sends
    #: more is refused (the transfer starts over) instead of filling memory.
    max_snapshot_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("RaftConfig.id must be a non-empty string")
        if self.heartbeat_ticks < 1:
            raise ValueError("heartbeat_ticks must be >= 1")
        if self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("election_ticks must be greater than heartbeat_ticks")
        for name in (
            "max_entries_per_message",
            "max_bytes_per_message",
            "max_inflight_messages",
            "snapshot_chunk_size",
            "max_snapshot_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


class _Progress:
    """What the leader knows about one follower's log."""

    __slots__ = (
        "active",
        "inflight",
        "match",
        "next",
        "paused",
        "sent_commit",
        "snap",
        "snap_offset",
        "stall",
        "state",
    )

    def __init__(self, next_index: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = _PROBE
        self.paused = False
        self.inflight: deque[int] = deque()
        self.active = False
        self.sent_commit = 0
        self.stall = 0
        #: The snapshot being streamed to this follower. It is kept until the
        #: transfer ends even if the leader compacts again meanwhile: starting
        #: over with each newer snapshot, a follower that needs longer to
        #: receive one than the leader takes to compact would never finish.
        self.snap: Snapshot | None = None
        self.snap_offset = 0

    def become_probe(self) -> None:
        self.state = _PROBE
        self.snap = None
        self.next = self.match + 1
        self.paused = False
        self.inflight.clear()
        self.stall = 0

    def become_replicate(self) -> None:
        self.state = _REPLICATE
        self.snap = None
        self.next = self.match + 1
        self.paused = False
        self.inflight.clear()
        self.stall = 0


def _apply_conf_change(conf: ConfState, data: bytes) -> ConfState:
    """The membership after the CONF_CHANGE entry ``data`` (unchanged if malformed)."""
    try:
        cc = ConfChange.decode(data)
    except (ValueError, UnicodeDecodeError):
        return conf
    voters = set(conf.voters)
    learners = set(conf.learners)
    if cc.type == ConfChangeType.ADD_VOTER:
        voters.add(cc.node_id)
        learners.discard(cc.node_id)
    elif cc.type == ConfChangeType.ADD_LEARNER:
        if cc.node_id in voters:
            return conf
        learners.add(cc.node_id)
    else:
        voters.discard(cc.node_id)
        learners.discard(cc.node_id)
    return ConfState(frozenset(voters), frozenset(learners))


class RaftCore:
    """One Raft node as a pure state machine.

    Construction::

        core = RaftCore(RaftConfig(id="n1"), persisted, random.Random(seed))

    ``persisted`` is everything earlier Readies asked to persist (see
    :class:`~trio_dchan.raft.types.PersistedState`). A brand-new member of a
    new cluster passes ``PersistedState(initial_conf=ConfState(voters=...))``:
    the core then writes one committed CONF_CHANGE entry per initial member at
    term 1 (every bootstrapping node writes the same ones), so nodes that join
    later learn the full membership from the log. A node started with neither
    state nor ``initial_conf`` is a *joiner*: it never campaigns and waits for
    a leader to replicate to it (it learns its membership from the log or a
    snapshot). On restart with a snapshot, the caller restores its state
    machine from ``persisted.snapshot.data`` itself; :attr:`applied_index`
    starts at the snapshot's index and the committed entries after it are
    handed out again by the first Readies.

    Inputs:

    * :meth:`tick` — one unit of logical time (elections, heartbeats).
    * :meth:`step` — a :class:`~trio_dchan.raft.types.Message` from a peer.
      Stale, duplicated, reordered messages and messages from removed nodes
      are harmless; a malformed one raises
      :class:`~trio_dchan.raft.errors.InvalidMessage` and changes nothing.
    * :meth:`propose`, :meth:`propose_many`, :meth:`propose_conf_change`
      (leader only, else :class:`~trio_dchan.raft.errors.NotLeader` carrying
      the known leader) return the log index of the new entry. A proposal at
      ``(index, term)`` (``term`` read right after the call) succeeded iff
      the entry later committed at ``index`` has that term.
    * :meth:`transfer_leadership`, :meth:`compact`.

    Output, the Ready contract. When :meth:`has_ready` is true, take
    ``rd = core.ready()`` and, in this order:

    1. Persist durably (fsync) before anything else: ``rd.hard_state`` if
       not ``None``; then ``rd.snapshot`` if not ``None`` (discard stored
       entries up to its index — or *all* stored entries when
       ``rd.install_snapshot`` is true, since an installed snapshot replaces
       the whole log); then append ``rd.entries`` (an entry whose index is
       already stored replaces it and every entry after it).
    2. Send ``rd.messages`` (best effort; Raft retries what is lost).
    3. If ``rd.install_snapshot``, replace the state machine with
       ``rd.snapshot.data``; then apply ``rd.committed_entries`` in order
       (NORMAL and CONF_CHANGE entries are meant for the application; NOOP
       entries carry nothing). Membership changes take effect inside the
       core by themselves (see ``docs/divergence.md``).
    4. Call ``core.advance(rd)``. Until then :meth:`has_ready` is false and
       no new Ready is produced, but the core keeps accepting inputs.

    Observable state: :attr:`id`, :attr:`role`, :attr:`term`,
    :attr:`leader`, :attr:`commit_index`, :attr:`applied_index`,
    :attr:`conf`, :attr:`last_index` (and :meth:`log_term`,
    :meth:`entries` for tests and tools).
    """

    def __init__(self, config: RaftConfig, persisted: PersistedState, rng: random.Random) -> None:
        self._cfg = config
        self._id: NodeId = config.id
        self._rng = rng
        self._max_inflight = config.max_inflight_messages

        hs = persisted.hard_state
        snap = persisted.snapshot
        entries = list(persisted.entries)
        bootstrap: list[Entry] = []
        if snap is not None:
            meta = snap.meta
            base_conf = meta.conf
        else:
            meta = SnapshotMeta()
            base_conf = ConfState()
            fresh = not entries and hs == HardState()
            init = persisted.initial_conf
            if fresh and init is not None and init.voters:
                bootstrap = self._bootstrap_entries(init)
        self._snapshot: Snapshot | None = snap
        self._snap_index = meta.index
        self._snap_term = meta.term
        self._base_conf = base_conf
        if entries:
            first = entries[0].index
            if first != meta.index + 1 or entries[-1].index != meta.index + len(entries):
                raise InvalidPersistedState(
                    f"entries {first}..{entries[-1].index} do not follow the snapshot at "
                    f"{meta.index} contiguously"
                )
        self._log: list[Entry] = entries
        self._conf_hist: list[tuple[int, ConfState]] = []
        self._conf = base_conf
        self._scan_conf(entries)

        self._term = hs.term
        self._vote = hs.vote
        last = self.last_index
        self._commit = min(max(hs.commit, meta.index), last)
        self._stable = last  # the highest index known to be persisted
        self._unstable_from = last + 1  # the first entry not yet handed out in a Ready
        self._applied = meta.index
        self._handed = meta.index  # committed entries handed out (maybe not yet advanced)
        self._prev_hs = HardState(self._term, self._vote, self._commit)

        self._role = Role.FOLLOWER
        self._leader: NodeId | None = None
        self._prev_soft = SoftState(Role.FOLLOWER, None)
        self._msgs: list[Message] = []
        self._pending_snapshot: Snapshot | None = None
        self._pending_install = False
        self._outstanding: Ready | None = None
        self._rd_last: tuple[int, int] | None = None
        self._rd_applied = 0

        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = config.election_ticks
        self._votes: dict[NodeId, bool] = {}

        self._prs: dict[NodeId, _Progress] = {}
        self._transfer_target: NodeId | None = None
        self._pending_conf_index = 0
        self._need_flush = False
        self._recv_snap: tuple[tuple[NodeId, int, int, int], bytearray] | None = None
        #: Snapshot transfers refused for exceeding ``max_snapshot_bytes``.
        self.refused_snapshots = 0

        self._voters: list[NodeId] = []
        self._peers: list[NodeId] = []
        # Leader only: removed nodes still being told about their removal
        # (node -> [index of the removing entry, ticks since it committed]).
        self._departing: dict[NodeId, list[int]] = {}
        self._targets: list[NodeId] = []  # peers plus departing nodes, sorted
        self._conf_updated()
        self._reset_timeout()
        if bootstrap:
            self._term = 1
            self._append(bootstrap)
            self._commit = len(bootstrap)
            self._conf_updated()

    # ------------------------------------------------------------------
    # Observable state

    @property
    def id(self) -> NodeId:
        return self._id

    @property
    def config(self) -> RaftConfig:
        return self._cfg

    @property
    def role(self) -> Role:
        return self._role

    @property
    def term(self) -> int:
        return self._term

    @property
    def vote(self) -> NodeId | None:
        return self._vote

    @property
    def leader(self) -> NodeId | None:
        return self._leader

    @property
    def commit_index(self) -> int:
        return self._commit

    @property
    def applied_index(self) -> int:
        """Entries up to here were handed out and acknowledged by :meth:`advance`."""
        return self._applied

    @property
    def conf(self) -> ConfState:
        """The membership in force (the latest one in the log, committed or not)."""
        return self._conf

    @property
    def last_index(self) -> int:
        return self._snap_index + len(self._log)

    @property
    def last_term(self) -> int:
        return self._log[-1].term if self._log else self._snap_term

    @property
    def first_index(self) -> int:
        """The first index still in the log (after the snapshot)."""
        return self._snap_index + 1

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest snapshot (taken locally or received), if any."""
        return self._snapshot

    @property
    def transfer_target(self) -> NodeId | None:
        return self._transfer_target

    def log_term(self, index: int) -> int | None:
        """The term of the entry at ``index``; ``None`` if compacted or absent."""
        if index == self._snap_index:
            return self._snap_term
        k = index - self._snap_index - 1
        if 0 <= k < len(self._log):
            return self._log[k].term
        return None

    def entries(self, lo: int, hi: int) -> list[Entry]:
        """Entries with ``lo <= index <= hi`` (those beyond the last index are
        simply absent). Raises :class:`~trio_dchan.raft.errors.CompactedError`
        if ``lo`` was compacted into the snapshot."""
        off = self._snap_index + 1
        if lo < off:
            raise CompactedError(f"entries before {off} were compacted into a snapshot")
        return self._log[lo - off : max(hi - off + 1, 0)]

    # ------------------------------------------------------------------
    # Inputs

    def tick(self) -> None:
        """Advance logical time by one tick."""
        if self._role is Role.LEADER:
            self._tick_leader()
            return
        self._election_elapsed += 1
        if self._id in self._conf.voters and self._election_elapsed >= self._timeout:
            self._election_elapsed = 0
            self._campaign(pre=self._cfg.pre_vote)

    def propose(self, data: bytes) -> int:
        """Append an application command; returns its log index."""
        return self.propose_many((data,))

    def propose_many(self, datas: Sequence[bytes]) -> int:
        """Append several commands at once; returns the index of the last."""
        self._check_can_propose()
        if not datas:
            raise InvalidRequest("propose_many() needs at least one command")
        start = self.last_index + 1
        self._append(list(map(Entry, repeat(self._term), count(start), repeat(_NORMAL), datas)))
        self._need_flush = True
        return start + len(datas) - 1

    def propose_conf_change(self, cc: ConfChange) -> int:
        """Append a single-server membership change; returns its log index.

        It takes effect as soon as it is appended (on every node that
        appends it); at most one may be uncommitted at a time.
        """
        self._check_can_propose()
        if self._pending_conf_index > self._commit:
            raise ConfChangeInProgress("a membership change is not committed yet")
        if self.log_term(self._commit) != self._term:
            raise ConfChangeInProgress("the new leader has not committed an entry of its term")
        conf = self._conf
        node = cc.node_id
        if not isinstance(node, str) or not node:
            raise InvalidConfChange("a conf change needs a non-empty node id")
        if cc.type == ConfChangeType.ADD_VOTER:
            if node in conf.voters:
                raise InvalidConfChange(f"{node!r} is already a voter")
        elif cc.type == ConfChangeType.ADD_LEARNER:
            if node in conf.voters:
                raise InvalidConfChange(f"{node!r} is a voter; it cannot be demoted")
            if node in conf.learners:
                raise InvalidConfChange(f"{node!r} is already a learner")
        elif cc.type == ConfChangeType.REMOVE_NODE:
            if node not in conf.members:
                raise UnknownNode(node)
            if conf.voters == {node}:
                raise InvalidConfChange("cannot remove the last voter")
        else:
            raise InvalidConfChange(f"unknown conf change type {cc.type!r}")
        index = self.last_index + 1
        self._append([Entry(self._term, index, _CONF_CHANGE, cc.encode())])
        self._pending_conf_index = index
        self._need_flush = True
        return index

    def transfer_leadership(self, target: NodeId) -> None:
        """Hand leadership to ``target`` once its log is up to date.

        Proposals are refused with
        :class:`~trio_dchan.raft.errors.LeadershipTransferInProgress` until
        the transfer ends (it is abandoned after ``election_ticks``).
        """
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader)
        if target == self._id:
            return
        if target not in self._conf.voters:
            raise UnknownNode(target)
        if self._transfer_target is not None:
            if self._transfer_target == target:
                return
            raise LeadershipTransferInProgress(
                f"leadership is already being transferred to {self._transfer_target!r}"
            )
        self._transfer_target = target
        self._election_elapsed = 0
        pr = self._prs[target]
        if pr.match == self.last_index:
            self._send(MessageType.TIMEOUT_NOW, target)
        else:
            self._need_flush = True

    def compact(self, index: int, data: bytes) -> None:
        """Record the application's snapshot ``data`` taken at ``index``.

        ``index`` must be applied (``<= applied_index``) and newer than the
        current snapshot. The log up to ``index`` is dropped; the next Ready
        carries the snapshot to persist (``install_snapshot`` false).
        """
        if index <= self._snap_index:
            raise SnapshotOutOfDate(
                f"index {index} is not after the current snapshot at {self._snap_index}"
            )
        if index > self._applied:
            raise InvalidRequest(f"index {index} is not applied yet (applied {self._applied})")
        term = self.log_term(index)
        if term is None:  # pragma: no cover - applied entries are in the log
            raise InvalidRequest(f"no entry at index {index}")
        conf = self._conf_at(index)
        snap = Snapshot(SnapshotMeta(index, term, conf), bytes(data))
        del self._log[: index - self._snap_index]
        self._snap_index = index
        self._snap_term = term
        self._base_conf = conf
        self._conf_hist = [(i, c) for i, c in self._conf_hist if i > index]
        self._snapshot = snap
        self._pending_snapshot = snap
        self._pending_install = False

    def step(self, m: Message) -> None:
        """Feed one message from a peer."""
        self._validate(m)
        if m.term > self._term:
            t = m.type
            if t is MessageType.VOTE or t is MessageType.PRE_VOTE:
                in_lease = (
                    self._cfg.check_quorum
                    and self._leader is not None
                    and self._election_elapsed < self._cfg.election_ticks
                    and m.context != TRANSFER_CONTEXT
                )
                if in_lease:
                    return
            if t is MessageType.PRE_VOTE or (t is MessageType.PRE_VOTE_RESP and not m.reject):
                pass  # a pre-vote never changes anyone's term
            elif t in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
                self._become_follower(m.term, m.sender)
            else:
                self._become_follower(m.term, None)
        elif m.term < self._term:
            if m.type in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT) and (
                self._cfg.check_quorum or self._cfg.pre_vote
            ):
                # Tell the stale leader about the newer term so it steps down.
                self._send(MessageType.APPEND_RESP, m.sender)
            elif m.type is MessageType.PRE_VOTE:
                self._send(MessageType.PRE_VOTE_RESP, m.sender, reject=True)
            return

        t = m.type
        if t is MessageType.VOTE or t is MessageType.PRE_VOTE:
            self._handle_vote_request(m)
        elif self._role is Role.LEADER:
            self._step_leader(m)
        elif self._role is Role.PRE_CANDIDATE or self._role is Role.CANDIDATE:
            self._step_candidate(m)
        else:
            self._step_follower(m)

    # ------------------------------------------------------------------
    # Ready / advance

    def has_ready(self) -> bool:
        """Whether :meth:`ready` has something for the caller to do."""
        if self._outstanding is not None:
            return False
        if self._need_flush:
            self._flush()
        return bool(
            self._msgs
            or self._commit > self._handed
            or self._unstable_from <= self.last_index
            or self._pending_snapshot is not None
            or self._prev_hs.term != self._term
            or self._prev_hs.vote != self._vote
            or self._prev_hs.commit != self._commit
            or self._prev_soft.role is not self._role
            or self._prev_soft.leader != self._leader
        )

    def ready(self) -> Ready:
        """Collect what the caller must do now (see the class docstring)."""
        if self._outstanding is not None:
            raise InvalidRequest("the previous Ready was not advanced yet")
        if self._need_flush:
            self._flush()
        rd = Ready()
        hs = self._prev_hs
        if hs.term != self._term or hs.vote != self._vote or hs.commit != self._commit:
            rd.hard_state = HardState(self._term, self._vote, self._commit)
        if self._pending_snapshot is not None:
            rd.snapshot = self._pending_snapshot
            rd.install_snapshot = self._pending_install
            self._pending_snapshot = None
            self._pending_install = False
        off = self._snap_index + 1
        self._rd_last = None
        if self._unstable_from <= self.last_index:
            rd.entries = self._log[self._unstable_from - off :]
            last = rd.entries[-1]
            self._rd_last = (last.index, last.term)
            self._unstable_from = last.index + 1
        if self._commit > self._handed:
            rd.committed_entries = self._log[self._handed + 1 - off : self._commit + 1 - off]
            self._handed = self._commit
        self._rd_applied = self._handed
        rd.messages = self._msgs
        self._msgs = []
        soft = self._prev_soft
        if soft.role is not self._role or soft.leader != self._leader:
            rd.soft_state = SoftState(self._role, self._leader)
            self._prev_soft = rd.soft_state
        if rd.hard_state is not None:
            self._prev_hs = rd.hard_state
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """Acknowledge that everything ``rd`` asked for was done."""
        if rd is not self._outstanding:
            raise InvalidRequest("advance() must be given the Ready returned by ready()")
        self._outstanding = None
        self._applied = max(self._applied, self._rd_applied)
        if self._rd_last is not None:
            index, term = self._rd_last
            if self.log_term(index) == term:
                self._stable = max(self._stable, index)
            self._rd_last = None
        if rd.snapshot is not None and rd.install_snapshot:
            self._stable = max(self._stable, rd.snapshot.meta.index)
        if self._role is Role.LEADER:
            self._maybe_commit()

    # ------------------------------------------------------------------
    # Log and membership bookkeeping

    @staticmethod
    def _bootstrap_entries(conf: ConfState) -> list[Entry]:
        out: list[Entry] = []
        for node in sorted(conf.voters):
            cc = ConfChange(ConfChangeType.ADD_VOTER, node, node.encode("utf-8"))
            out.append(Entry(1, len(out) + 1, _CONF_CHANGE, cc.encode()))
        for node in sorted(conf.learners):
            cc = ConfChange(ConfChangeType.ADD_LEARNER, node, node.encode("utf-8"))
            out.append(Entry(1, len(out) + 1, _CONF_CHANGE, cc.encode()))
        return out

    def _append(self, entries: list[Entry]) -> None:
        self._log.extend(entries)
        if _CONF_CHANGE in map(_get_type, entries):
            self._scan_conf(entries)
            self._conf_updated()

    def _scan_conf(self, entries: Sequence[Entry]) -> None:
        conf = self._conf
        for e in entries:
            if e.type == _CONF_CHANGE:
                conf = _apply_conf_change(conf, e.data)
                self._conf_hist.append((e.index, conf))
        self._conf = conf

    def _truncate(self, index: int) -> None:
        """Drop the entries from ``index`` on (never committed ones)."""
        del self._log[index - self._snap_index - 1 :]
        self._stable = min(self._stable, index - 1)
        self._unstable_from = min(self._unstable_from, index)
        if self._conf_hist and self._conf_hist[-1][0] >= index:
            while self._conf_hist and self._conf_hist[-1][0] >= index:
                self._conf_hist.pop()
            self._conf = self._conf_hist[-1][1] if self._conf_hist else self._base_conf
            self._conf_updated()

    def _conf_at(self, index: int) -> ConfState:
        conf = self._base_conf
        for i, c in self._conf_hist:
            if i > index:
                break
            conf = c
        return conf

    def _conf_updated(self) -> None:
        conf = self._conf
        self._voters = sorted(conf.voters)
        self._peers = sorted(conf.members - {self._id})
        if self._role is Role.LEADER:
            for peer in self._peers:
                self._departing.pop(peer, None)
                if peer not in self._prs:
                    self._prs[peer] = _Progress(self.last_index + 1)
                    self._need_flush = True
            for peer in list(self._prs):
                if peer == self._id:
                    del self._prs[peer]
                elif peer not in conf.members and peer not in self._departing:
                    # Keep replicating to it until it has the entry that
                    # removed it, so that it learns it is no longer a member.
                    self._departing[peer] = [self.last_index, 0]
            if self._transfer_target is not None and self._transfer_target not in conf.voters:
                self._transfer_target = None
            self._update_targets()
        elif self._role is Role.FOLLOWER or self._role is Role.LEARNER:
            self._role = Role.LEARNER if self._id in conf.learners else Role.FOLLOWER
        elif self._id not in conf.voters:
            self._become_follower(self._term, None)

    def _update_targets(self) -> None:
        self._targets = sorted([*self._peers, *self._departing])

    def _depart(self, peer: NodeId) -> None:
        del self._departing[peer]
        self._prs.pop(peer, None)
        self._update_targets()

    # ------------------------------------------------------------------
    # Role changes

    def _reset_timeout(self) -> None:
        n = self._cfg.election_ticks
        self._timeout = self._rng.randrange(n, 2 * n)

    def _become_follower(self, term: int, leader: NodeId | None) -> None:
        if term != self._term:
            self._term = term
            self._vote = None
        self._role = Role.LEARNER if self._id in self._conf.learners else Role.FOLLOWER
        self._leader = leader
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._reset_timeout()
        self._prs = {}
        self._departing = {}
        self._targets = []
        self._votes = {}
        self._transfer_target = None
        self._need_flush = False

    def _campaign(self, pre: bool, transfer: bool = False) -> None:
        if pre:
            self._role = Role.PRE_CANDIDATE
            kind = MessageType.PRE_VOTE
            vote_term = self._term + 1
        else:
            self._role = Role.CANDIDATE
            self._term += 1
            self._vote = self._id
            kind = MessageType.VOTE
            vote_term = self._term
        self._leader = None
        self._election_elapsed = 0
        self._reset_timeout()
        self._votes = {self._id: True}
        if self._poll() is not None:
            return
        last_index = self.last_index
        last_term = self.last_term
        context = TRANSFER_CONTEXT if transfer else b""
        for peer in self._voters:
            if peer != self._id:
                self._msgs.append(
                    Message(
                        kind,
                        peer,
                        self._id,
                        vote_term,
                        log_term=last_term,
                        index=last_index,
                        context=context,
                    )
                )

    def _poll(self) -> bool | None:
        """Count votes; win (True), lose (False) or keep waiting (None)."""
        voters = self._conf.voters
        granted = sum(1 for v, ok in self._votes.items() if ok and v in voters)
        rejected = sum(1 for v, ok in self._votes.items() if not ok and v in voters)
        quorum = len(voters) // 2 + 1
        if granted >= quorum:
            if self._role is Role.PRE_CANDIDATE:
                self._campaign(pre=False)
            else:
                self._become_leader()
            return True
        if rejected >= quorum:
            self._become_follower(self._term, None)
            return False
        return None

    def _become_leader(self) -> None:
        self._role = Role.LEADER
        self._leader = self._id
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._votes = {}
        self._transfer_target = None
        last = self.last_index
        self._prs = {peer: _Progress(last + 1) for peer in self._peers}
        self._departing = {}
        self._update_targets()
        for pr in self._prs.values():
            pr.active = True
        self._pending_conf_index = self._conf_hist[-1][0] if self._conf_hist else 0
        self._append([Entry(self._term, last + 1, EntryType.NOOP)])
        self._need_flush = True
        self._maybe_commit()

    # ------------------------------------------------------------------
    # Messages

    def _send(
        self,
        kind: MessageType,
        to: NodeId,
        *,
        term: int | None = None,
        reject: bool = False,
        index: int = 0,
        reject_hint: int = 0,
        conflict_term: int = 0,
        commit: int = 0,
        snapshot_offset: int = 0,
        context: bytes = b"",
    ) -> None:
        self._msgs.append(
            Message(
                kind,
                to,
                self._id,
                self._term if term is None else term,
                index=index,
                reject=reject,
                reject_hint=reject_hint,
                conflict_term=conflict_term,
                commit=commit,
                snapshot_offset=snapshot_offset,
                context=context,
            )
        )

    def _validate(self, m: Message) -> None:
        if not isinstance(m, Message):
            raise InvalidMessage(f"not a Message: {type(m).__name__}")
        if m.to != self._id:
            raise InvalidMessage(f"message for {m.to!r} delivered to {self._id!r}")
        if not isinstance(m.sender, str) or not m.sender or m.sender == self._id:
            raise InvalidMessage(f"bad sender {m.sender!r}")
        if m.term < 0 or m.index < 0 or m.commit < 0 or m.log_term < 0:
            raise InvalidMessage("negative term or index")
        if not isinstance(m.type, MessageType):
            raise InvalidMessage(f"unknown message type {m.type!r}")
        ents = m.entries
        if ents:
            if m.type is not MessageType.APPEND:
                raise InvalidMessage(f"{m.type.name} cannot carry entries")
            if ents[0].index != m.index + 1 or ents[-1].index != m.index + len(ents):
                raise InvalidMessage("entries are not contiguous after the previous index")
            if ents[-1].term > m.term or ents[0].term < m.log_term:
                raise InvalidMessage("entry terms are out of order")
        if m.type is MessageType.SNAPSHOT and (
            m.snapshot is None or m.snapshot.index < 0 or m.snapshot_offset < 0
        ):
            raise InvalidMessage("a SNAPSHOT message needs snapshot metadata")

    def _handle_vote_request(self, m: Message) -> None:
        pre = m.type is MessageType.PRE_VOTE
        resp = MessageType.PRE_VOTE_RESP if pre else MessageType.VOTE_RESP
        can_vote = (
            self._vote == m.sender
            or (self._vote is None and self._leader is None)
            or (pre and m.term > self._term)
        )
        last_term = self.last_term
        up_to_date = m.log_term > last_term or (
            m.log_term == last_term and m.index >= self.last_index
        )
        if can_vote and up_to_date:
            self._send(resp, m.sender, term=m.term)
            if not pre:
                self._vote = m.sender
                self._election_elapsed = 0
        else:
            self._send(resp, m.sender, reject=True)

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
            # A leader of this term exists.
            self._become_follower(m.term, m.sender)
            self._step_follower(m)
            return
        want = (
            MessageType.PRE_VOTE_RESP
            if self._role is Role.PRE_CANDIDATE
            else MessageType.VOTE_RESP
        )
        if t is want and m.sender in self._conf.voters:
            self._votes[m.sender] = not m.reject
            self._poll()

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t is MessageType.APPEND:
            self._election_elapsed = 0
            self._leader = m.sender
            self._handle_append(m)
        elif t is MessageType.HEARTBEAT:
            self._election_elapsed = 0
            self._leader = m.sender
            commit = min(m.commit, self.last_index)
            if commit > self._commit:
                self._commit = commit
            self._send(MessageType.HEARTBEAT_RESP, m.sender, context=m.context)
        elif t is MessageType.SNAPSHOT:
            self._election_elapsed = 0
            self._leader = m.sender
            self._handle_snapshot(m)
        elif t is MessageType.TIMEOUT_NOW and self._id in self._conf.voters:
            self._campaign(pre=False, transfer=True)

    def _handle_append(self, m: Message) -> None:
        ents = m.entries
        prev = m.index
        commit = self._commit
        if prev < commit:
            skip = commit - prev
            if skip >= len(ents):
                self._send(MessageType.APPEND_RESP, m.sender, index=commit)
                return
            ents = ents[skip:]
            prev = commit
        elif self.log_term(prev) != m.log_term:
            last = self.last_index
            if prev > last:
                hint, conflict = last + 1, 0
            else:
                conflict = self.log_term(prev) or 0
                k = bisect_left(self._log, conflict, key=_get_term)
                hint = max(self._snap_index + 1 + k, commit + 1)
            self._send(
                MessageType.APPEND_RESP,
                m.sender,
                index=m.index,
                reject=True,
                reject_hint=hint,
                conflict_term=conflict,
            )
            return
        if ents:
            log = self._log
            base = prev - self._snap_index  # position of ents[0] in the log
            overlap = min(len(ents), len(log) - base)
            j = 0
            while j < overlap and log[base + j].term == ents[j].term:
                j += 1
            if j < overlap:
                if prev + 1 + j <= self._commit:
                    raise InvalidMessage("append conflicts with committed entries")
                self._truncate(prev + 1 + j)
            if j < len(ents):
                self._append(list(ents[j:]) if j else list(ents))
        new_last = prev + len(ents)
        c = min(m.commit, new_last)
        if c > self._commit:
            self._commit = c
        self._send(MessageType.APPEND_RESP, m.sender, index=new_last)

    def _handle_snapshot(self, m: Message) -> None:
        meta = m.snapshot
        if meta is None:  # pragma: no cover - rejected by _validate
            return
        if meta.index <= self._commit:
            self._recv_snap = None
            self._send(MessageType.APPEND_RESP, m.sender, index=self._commit)
            return
        key = (m.sender, m.term, meta.index, meta.term)
        if m.snapshot_offset == 0 and (self._recv_snap is None or self._recv_snap[0] != key):
            self._recv_snap = (key, bytearray())
        if self._recv_snap is None or self._recv_snap[0] != key:
            self._send_snapshot_resp(m, 0, reject=True)
            return
        buf = self._recv_snap[1]
        if m.snapshot_offset == len(buf):
            if len(buf) + len(m.snapshot_data) > self._cfg.max_snapshot_bytes:
                # More than this node takes: drop what was gathered.
                self._recv_snap = None
                self.refused_snapshots += 1
                self._send_snapshot_resp(m, 0, reject=True)
                return
            buf += m.snapshot_data
            if m.snapshot_done:
                self._recv_snap = None
                self._restore(Snapshot(meta, bytes(buf)))
                self._send(MessageType.APPEND_RESP, m.sender, index=self._commit)
                return
        self._send_snapshot_resp(m, len(buf))

    def _send_snapshot_resp(self, m: Message, offset: int, reject: bool = False) -> None:
        # Name the snapshot, so that a late answer about an earlier transfer
        # cannot be mistaken for progress on the current one.
        self._msgs.append(
            Message(
                MessageType.SNAPSHOT_RESP,
                m.sender,
                self._id,
                self._term,
                snapshot=m.snapshot,
                snapshot_offset=offset,
                reject=reject,
            )
        )

    def _restore(self, snap: Snapshot) -> None:
        meta = snap.meta
        if self.log_term(meta.index) == meta.term:
            # We already hold that entry: keep the log, just commit up to it.
            self._commit = meta.index
            return
        self._log = []
        self._snap_index = meta.index
        self._snap_term = meta.term
        self._base_conf = meta.conf
        self._conf_hist = []
        self._conf = meta.conf
        self._commit = meta.index
        self._handed = meta.index
        self._stable = min(self._stable, meta.index)
        self._unstable_from = meta.index + 1
        self._snapshot = snap
        self._pending_snapshot = snap
        self._pending_install = True
        self._conf_updated()

    # ------------------------------------------------------------------
    # Leader

    def _check_can_propose(self) -> None:
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader)
        if self._transfer_target is not None:
            raise LeadershipTransferInProgress(
                f"leadership is being transferred to {self._transfer_target!r}"
            )

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        cfg = self._cfg
        if self._election_elapsed >= cfg.election_ticks:
            self._election_elapsed = 0
            if cfg.check_quorum and not self._quorum_active():
                self._become_follower(self._term, None)
                return
            self._transfer_target = None
        if self._departing:
            # Stop telling unreachable removed nodes once the removal is old.
            for peer, state in list(self._departing.items()):
                if self._commit >= state[0]:
                    state[1] += 1
                    if state[1] >= 2 * cfg.election_ticks:
                        self._depart(peer)
        if self._heartbeat_elapsed >= cfg.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def _quorum_active(self) -> bool:
        voters = self._conf.voters
        active = 1 if self._id in voters else 0
        for peer, pr in self._prs.items():
            if peer in voters and pr.active:
                active += 1
            pr.active = False
        return active >= len(voters) // 2 + 1

    def _broadcast_heartbeat(self) -> None:
        commit = self._commit
        for peer in self._targets:
            pr = self._prs[peer]
            if pr.state == _SNAPSHOT:
                pr.stall += 1
                if pr.stall >= 2:
                    pr.stall = 0
                    self._send_snapshot_chunk(peer, pr)
                continue
            if pr.inflight:
                pr.stall += 1
            self._send(MessageType.HEARTBEAT, peer, commit=min(pr.match, commit))

    def _step_leader(self, m: Message) -> None:
        pr = self._prs.get(m.sender)
        if pr is None:
            return
        t = m.type
        if t is MessageType.APPEND_RESP:
            if m.index > self.last_index:
                raise InvalidMessage(f"{m.sender!r} acknowledged index {m.index} beyond our log")
            pr.active = True
            self._handle_append_resp(m, pr)
        elif t is MessageType.HEARTBEAT_RESP:
            pr.active = True
            if pr.state == _PROBE:
                pr.paused = False
                self._need_flush = True
            elif pr.state == _REPLICATE and pr.inflight:
                if pr.stall >= max(2, self._cfg.election_ticks // 2):
                    # Appends were lost: fall back to probing from the match.
                    pr.become_probe()
                    self._need_flush = True
            elif pr.match < self.last_index or pr.sent_commit < self._commit:
                self._need_flush = True
        elif t is MessageType.SNAPSHOT_RESP:
            pr.active = True
            snap = pr.snap
            if pr.state != _SNAPSHOT or snap is None or m.snapshot != snap.meta:
                return
            # With one chunk in flight, the offset the follower expects is
            # authoritative (it may be behind us if it lost its buffer).
            offset = 0 if m.reject else m.snapshot_offset
            if offset == pr.snap_offset or offset > len(snap.data):
                return
            pr.snap_offset = offset
            pr.stall = 0
            self._send_snapshot_chunk(m.sender, pr)

    def _handle_append_resp(self, m: Message, pr: _Progress) -> None:
        if m.reject:
            if pr.state == _REPLICATE:
                if m.index <= pr.match:
                    return
            elif pr.state == _PROBE:
                if m.index != pr.next - 1:
                    return
            else:
                return
            nxt = m.reject_hint
            if m.conflict_term > 0:
                k = bisect_right(self._log, m.conflict_term, key=_get_term)
                if k > 0 and self._log[k - 1].term == m.conflict_term:
                    nxt = self._snap_index + k + 1
            pr.state = _PROBE
            pr.inflight.clear()
            pr.paused = False
            pr.stall = 0
            pr.next = max(pr.match + 1, min(nxt, m.index))
            self._need_flush = True
            return
        advanced = m.index > pr.match
        if advanced:
            pr.match = m.index
            pr.stall = 0
            gone = self._departing.get(m.sender)
            if gone is not None and pr.match >= gone[0]:
                self._depart(m.sender)  # it has the entry that removed it
                return
        if pr.state == _PROBE:
            if advanced or m.index == pr.next - 1:
                pr.become_replicate()
            else:
                pr.paused = False
        elif pr.state == _SNAPSHOT:
            if pr.snap is None or pr.match >= pr.snap.meta.index:
                pr.become_replicate()
            else:
                return
        else:
            inflight = pr.inflight
            while inflight and inflight[0] <= m.index:
                inflight.popleft()
            if pr.next <= pr.match:
                pr.next = pr.match + 1
        self._need_flush = True
        if advanced:
            self._maybe_commit()
            if (
                self._role is Role.LEADER
                and m.sender == self._transfer_target
                and pr.match == self.last_index
            ):
                self._send(MessageType.TIMEOUT_NOW, m.sender)

    def _maybe_commit(self) -> None:
        voters = self._voters
        if not voters:
            return
        matches = []
        for v in voters:
            if v == self._id:
                matches.append(self._stable)
            else:
                pr = self._prs.get(v)
                matches.append(pr.match if pr is not None else 0)
        matches.sort(reverse=True)
        q = matches[len(voters) // 2]
        if q > self._commit and self.log_term(q) == self._term:
            self._commit = q
            self._need_flush = True
            if self._id not in self._conf.voters and self._pending_conf_index <= q:
                self._step_down_removed()

    def _step_down_removed(self) -> None:
        """The leader's own removal is committed: hand over and step down."""
        best: tuple[int, NodeId] | None = None
        for v in self._voters:
            pr = self._prs.get(v)
            if pr is not None and (best is None or pr.match > best[0]):
                best = (pr.match, v)
        self._flush()
        if best is not None and best[0] == self.last_index:
            self._send(MessageType.TIMEOUT_NOW, best[1])
        self._become_follower(self._term, None)

    def _flush(self) -> None:
        """Send whatever each follower is due (batched per Ready)."""
        self._need_flush = False
        if self._role is not Role.LEADER:
            return
        last = self.last_index
        commit = self._commit
        for peer in self._targets:
            pr = self._prs[peer]
            if pr.state == _REPLICATE:
                sent = False
                while pr.next <= last and len(pr.inflight) < self._max_inflight:
                    if not self._send_append(peer, pr):
                        break
                    sent = True
                if not sent and pr.sent_commit < commit:
                    self._send_append(peer, pr, empty=True)
            elif pr.state == _PROBE and not pr.paused:
                self._send_append(peer, pr)

    def _send_append(self, peer: NodeId, pr: _Progress, empty: bool = False) -> bool:
        # An empty append only carries the commit index: anchor it at the
        # follower's match so that appends still in flight cannot make it fail.
        prev = pr.match if empty else pr.next - 1
        prev_term = self.log_term(prev)
        if prev_term is None and empty:
            return False
        if prev_term is None:
            if prev > self.last_index:  # cannot happen; keep the invariant anyway
                pr.next = self.last_index + 1
                return False
            self._start_snapshot(peer, pr)
            return False
        ents: tuple[Entry, ...] = ()
        if not empty:
            off = self._snap_index + 1
            lo = pr.next - off
            hi = min(lo + self._cfg.max_entries_per_message, len(self._log))
            chunk = self._log[lo:hi]
            limit = self._cfg.max_bytes_per_message
            if chunk and sum(map(len, map(_get_data, chunk))) > limit:
                size = 0
                n = 0
                for e in chunk:
                    size += len(e.data)
                    if size > limit and n:
                        break
                    n += 1
                chunk = chunk[:n]
            ents = tuple(chunk)
        commit = self._commit
        self._msgs.append(
            Message(
                MessageType.APPEND,
                peer,
                self._id,
                self._term,
                log_term=prev_term,
                index=prev,
                entries=ents,
                commit=commit,
            )
        )
        pr.sent_commit = commit
        if pr.state == _REPLICATE:
            if ents:
                pr.next = ents[-1].index + 1
                pr.inflight.append(ents[-1].index)
        else:
            pr.paused = True
        return True

    def _start_snapshot(self, peer: NodeId, pr: _Progress) -> None:
        snap = self._snapshot
        if snap is None:  # pragma: no cover - compaction always leaves a snapshot
            return
        pr.state = _SNAPSHOT
        pr.inflight.clear()
        pr.snap = snap
        pr.snap_offset = 0
        pr.stall = 0
        self._send_snapshot_chunk(peer, pr)

    def _send_snapshot_chunk(self, peer: NodeId, pr: _Progress) -> None:
        snap = pr.snap
        if snap is None:  # pragma: no cover - set whenever the state is _SNAPSHOT
            return
        off = min(pr.snap_offset, len(snap.data))
        data = snap.data[off : off + self._cfg.snapshot_chunk_size]
        self._msgs.append(
            Message(
                MessageType.SNAPSHOT,
                peer,
                self._id,
                self._term,
                snapshot=snap.meta,
                snapshot_offset=off,
                snapshot_data=data,
                snapshot_done=off + len(data) >= len(snap.data),
            )
        )
