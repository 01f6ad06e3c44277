"""The Trio driver that turns a :class:`~trio_dchan.raft.core.RaftCore` into a running node.

One task (the *loop*) owns the core. Everything else talks to the loop
through queues and wakes it with an event:

* the transport calls :meth:`RaftNode.deliver` with inbound messages (a
  bounded queue; a full queue drops, Raft retries);
* :meth:`RaftNode.propose` and friends queue requests that the loop turns
  into log entries — every command queued since the loop last ran goes
  into the log with ONE ``core.propose_many`` call (batching);
* the loop ticks the core on a timer.

After feeding the core, the loop drains its ``Ready`` records in the order
the core's contract demands: persist (one ``storage.save`` per Ready: that
is group commit, one fsync round for a whole batch), send, install a
snapshot / apply committed entries, advance. Every ``snapshot_every``
applied entries it snapshots the state machine and compacts the log.

Proposal outcomes. A command appended by this node as leader at
``(index, term)`` succeeded iff the entry applied at ``index`` has ``term``:
``propose`` then returns what the state machine's ``apply`` returned. If
another term's entry is applied there (or this node, leader again, appends a
new entry there), the command was overwritten and :class:`ProposalDropped`
is raised: it is safe to retry. If this node stops being leader, it keeps
watching what it applies for ``RaftSettings.outcome_wait`` seconds; if the
index is still not applied by then (or the log is replaced by a snapshot,
or the node stops), the command may or may not commit later under another
leader and :class:`OutcomeUnknown` is raised. A command that never reached
the log raises a "not done" error instead (:class:`NotLeader`,
:class:`ProposalDropped`, :class:`NodeStopped`), so the caller knows it is
safe to retry.

On a follower ``propose`` forwards the command to the leader through the
transport, retrying while the leader is unknown or changing (up to
``RaftSettings.proposal_timeout``), then waits until its own state machine
has applied the entry, so a caller sees its own write locally once
``propose`` returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

import trio

from trio_dchan.errors import DchanError

from .core import RaftConfig, RaftCore
from .errors import NotLeader, ProposalDropped, RaftError
from .storage import MemoryStorage
from .transport import Proposal, ProposalKind, RaftHandler, RaftTransport, Unavailable
from .types import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    HardState,
    Message,
    NodeId,
    PersistedState,
    Ready,
    Role,
    Snapshot,
)

__all__ = [
    "LeadershipTransferFailed",
    "NodeStopped",
    "OutcomeUnknown",
    "RaftNode",
    "RaftSettings",
    "StateMachine",
    "Storage",
    "open_raft_node",
]

logger = logging.getLogger(__name__)


class OutcomeUnknown(RaftError):
    """The proposal reached the log, but whether it commits cannot be known here.

    Raised when the node that appended the entry stopped being leader (or
    stopped altogether) before the entry's fate was decided, or when the
    connection to the leader broke after the proposal was sent. The command
    may still be applied later. Make commands idempotent (the Registry's
    are) and retry, or read the state machine to find out.
    """


class NodeStopped(RaftError):
    """The node is not running (it was never started, has stopped or has crashed)."""


class LeadershipTransferFailed(RaftError):
    """The requested node did not become leader within the transfer timeout."""


class StateMachine(Protocol):
    """The replicated application state the node applies committed entries to."""

    def apply(self, entry: Entry) -> object:
        """Apply one committed entry (NORMAL, NOOP or CONF_CHANGE); deterministic."""
        ...

    def snapshot(self) -> bytes:
        """An image of the whole state at the last applied entry."""
        ...

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a :meth:`snapshot` image."""
        ...


class Storage(Protocol):
    """Durable Raft state (see :mod:`trio_dchan.raft.storage`)."""

    def load(self) -> PersistedState: ...

    def save(
        self, hard_state: HardState | None, entries: Sequence[Entry], snapshot: Snapshot | None
    ) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RaftSettings:
    """Timings and limits of a Raft node.

    The defaults aim at fail-over in well under a second on a loaded machine:
    a tick every 25 ms, a heartbeat every 2 ticks (50 ms) and an election
    timeout drawn from [10, 20) ticks (250-500 ms), so a follower tolerates
    five lost heartbeats before it starts a (pre-)vote.
    """

    #: Seconds between two ticks of the core.
    tick_interval: float = 0.025
    #: Base election timeout, in ticks (the core randomizes it up to twice this).
    election_ticks: int = 10
    #: Heartbeat interval of a leader, in ticks.
    heartbeat_ticks: int = 2
    #: Run a pre-vote before a real election (avoids term inflation by a partitioned node).
    pre_vote: bool = True
    #: A leader that has not heard from a quorum for an election timeout steps down.
    check_quorum: bool = True
    #: Snapshot the state machine and compact the log after this many applied entries.
    snapshot_every: int = 10_000
    #: Most commands turned into log entries by one ``propose_many`` call.
    max_batch: int = 4096
    #: Inbound messages queued before new ones are dropped.
    inbox_size: int = 8192
    #: How long ``propose`` keeps looking for a leader that accepts the proposal.
    proposal_timeout: float = 5.0
    #: Pause between two attempts to reach the leader while it is unknown or changing.
    retry_interval: float = 0.05
    #: How long ``transfer_leadership`` waits for the target to take over.
    transfer_timeout: float = 2.0
    #: How long a deposed leader keeps waiting to learn its proposals' fate.
    outcome_wait: float = 1.0
    #: Run ``storage.save`` in a worker thread (``trio.to_thread``) instead of inline,
    #: so the event loop keeps serving the transport and other nodes while fsync waits.
    #: ``None`` (the default): in a thread, except for an in-memory storage.
    persist_in_thread: bool | None = None
    #: A leader sends appends while its own write is in flight (it still counts
    #: itself towards a commit only once its write is durable).
    leader_parallel_persist: bool = True

    def __post_init__(self) -> None:
        if not (self.tick_interval > 0 and math.isfinite(self.tick_interval)):
            raise ValueError("tick_interval must be a positive number of seconds")
        if self.election_ticks <= self.heartbeat_ticks or self.heartbeat_ticks < 1:
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks")
        for name in ("snapshot_every", "max_batch", "inbox_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("proposal_timeout", "retry_interval", "transfer_timeout", "outcome_wait"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")

    @property
    def election_timeout(self) -> float:
        """The base election timeout in seconds."""
        return self.tick_interval * self.election_ticks


class _Waiter:
    """A one-shot result slot for a caller waiting on the loop."""

    __slots__ = ("abandoned", "error", "event", "result")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.result: object = None
        self.error: BaseException | None = None
        self.abandoned = False

    def succeed(self, result: object) -> None:
        if not self.event.is_set():
            self.result = result
            self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()

    async def wait(self) -> object:
        try:
            await self.event.wait()
        except BaseException:
            self.abandoned = True
            raise
        if self.error is not None:
            raise self.error
        return self.result


#: Readies handled before the loop lets other tasks run (fairness, not correctness).
_MAX_READIES_PER_ROUND = 16

# Request kinds queued for the loop besides plain commands.
_CONF = 0
_TRANSFER = 1


class RaftNode:
    """A running Raft node; create it with :func:`open_raft_node`.

    Implements :class:`~trio_dchan.raft.transport.RaftHandler` for its
    transport.
    """

    def __init__(
        self,
        node_id: NodeId,
        *,
        storage: Storage,
        state_machine: StateMachine,
        settings: RaftSettings,
        initial_conf: ConfState | None,
        rng: random.Random,
    ) -> None:
        self.id = node_id
        self.settings = settings
        self._storage = storage
        self._persist_in_thread = (
            settings.persist_in_thread
            if settings.persist_in_thread is not None
            else not isinstance(storage, MemoryStorage)
        )
        self._sm = state_machine
        persisted = storage.load()
        fresh = (
            persisted.snapshot is None
            and not persisted.entries
            and persisted.hard_state == HardState()
        )
        if fresh and initial_conf is not None:
            persisted = dataclasses.replace(persisted, initial_conf=initial_conf)
        if persisted.snapshot is not None:
            state_machine.restore(persisted.snapshot.data)
        config = RaftConfig(
            id=node_id,
            election_ticks=settings.election_ticks,
            heartbeat_ticks=settings.heartbeat_ticks,
            pre_vote=settings.pre_vote,
            check_quorum=settings.check_quorum,
        )
        self._core = RaftCore(config, persisted, rng)
        # The hard state last handed to storage, and a newer one whose only
        # change is the commit index, waiting to ride along with the next save.
        self._saved_hs = persisted.hard_state
        self._deferred_hs: HardState | None = None
        self._transport: RaftTransport | None = None
        self._inbox: deque[Message] = deque()
        self._commands: list[tuple[bytes, _Waiter]] = []
        self._requests: list[tuple[int, object, _Waiter]] = []
        # index -> (term it was appended in, waiter)
        self._pending: dict[int, tuple[int, _Waiter]] = {}
        self._lead_term = -1
        self._orphan_deadline = math.inf
        self._wakeup = trio.Event()
        self._changed = trio.Event()
        self._running = False
        self._stopped = False
        self._error: Exception | None = None
        self._since_snapshot = 0
        #: Counters for tests and benchmarks.
        self.stats_saves = 0
        self.stats_batches = 0
        self.stats_dropped_inbound = 0

    # -- observable state ------------------------------------------------

    @property
    def role(self) -> Role:
        return self._core.role

    @property
    def term(self) -> int:
        return self._core.term

    @property
    def leader(self) -> NodeId | None:
        return self._core.leader

    @property
    def commit_index(self) -> int:
        return self._core.commit_index

    @property
    def applied_index(self) -> int:
        return self._core.applied_index

    @property
    def members(self) -> ConfState:
        return self._core.conf

    @property
    def running(self) -> bool:
        return self._running

    async def wait_for(self, predicate: Callable[[RaftNode], bool]) -> None:
        """Wait until ``predicate(node)`` holds (checked after every change of state).

        Raises :class:`NodeStopped` if the node stops first.
        """
        while not predicate(self):
            if self._stopped:
                raise NodeStopped(f"raft node {self.id} has stopped")
            await self._changed.wait()

    async def wait_leader_known(self) -> NodeId:
        """Wait until this node knows a leader, and return it."""
        await self.wait_for(lambda node: node.leader is not None)
        leader = self.leader
        if leader is None:  # pragma: no cover - the predicate just held
            raise NodeStopped(f"raft node {self.id} lost its leader")
        return leader

    # -- RaftHandler -------------------------------------------------------

    def deliver(self, message: Message) -> None:
        """Queue an inbound message for the loop (drops when the node is down or full)."""
        if not self._running:
            return
        if len(self._inbox) >= self.settings.inbox_size:
            self.stats_dropped_inbound += 1
            return
        self._inbox.append(message)
        self._wakeup.set()

    async def handle_forward(self, proposal: Proposal) -> object:
        """Run a proposal a follower forwarded here (this node must be the leader).

        Returns ``[index, result]`` — plain data the transport carries back —
        so the follower can wait until it has applied ``index`` itself.
        """
        if self._running and self._core.role is not Role.LEADER:
            leader = self._core.leader
            # Never chain forwards: tell the caller whom to ask instead.
            raise NotLeader(leader if leader != self.id else None)
        try:
            if proposal.kind == ProposalKind.COMMAND:
                return list(await self._propose_local(bytes(proposal.data)))
            if proposal.kind == ProposalKind.CONF_CHANGE:
                try:
                    change = ConfChange.decode(bytes(proposal.data))
                except ValueError as exc:
                    raise ProposalDropped(f"malformed conf change: {exc}") from None
                return list(await self._request_local(_CONF, change))
            if proposal.kind == ProposalKind.TRANSFER_LEADER:
                if proposal.target is None:
                    raise ProposalDropped("leadership transfer without a target")
                await self._transfer_local(proposal.target)
                return [0, None]
        except NodeStopped:
            raise Unavailable(self.id, "node stopped") from None
        raise ProposalDropped(f"unknown proposal kind {proposal.kind!r}")

    # -- public API ----------------------------------------------------------

    async def propose(self, command: bytes) -> object:
        """Replicate ``command``; return the state machine's result once applied here.

        Raises :class:`NotLeader` (no leader could be reached within
        ``proposal_timeout``), :class:`ProposalDropped`,
        :class:`OutcomeUnknown`, :class:`NodeStopped` or
        :class:`~trio_dchan.raft.transport.Unavailable`; see the module docs.
        """
        command = bytes(command)
        if self._running and self._core.role is Role.LEADER:
            # Fast path on the leader: straight into the next batch.
            try:
                return (await self._propose_local(command))[1]
            except NotLeader:
                pass  # deposed before the batch was cut: never appended, retry below
        return await self._submit(Proposal(ProposalKind.COMMAND, command))

    async def add_voter(self, node_id: NodeId, address: str) -> object:
        """Add ``node_id`` (or promote a learner) as a voter; the Registry records ``address``."""
        change = ConfChange(ConfChangeType.ADD_VOTER, node_id, address.encode("utf-8"))
        return await self._submit(Proposal(ProposalKind.CONF_CHANGE, change.encode()))

    async def add_learner(self, node_id: NodeId, address: str) -> object:
        """Add ``node_id`` as a non-voting learner."""
        change = ConfChange(ConfChangeType.ADD_LEARNER, node_id, address.encode("utf-8"))
        return await self._submit(Proposal(ProposalKind.CONF_CHANGE, change.encode()))

    async def remove_node(self, node_id: NodeId) -> object:
        """Remove a voter or learner from the cluster."""
        change = ConfChange(ConfChangeType.REMOVE_NODE, node_id)
        return await self._submit(Proposal(ProposalKind.CONF_CHANGE, change.encode()))

    async def transfer_leadership(self, target: NodeId) -> None:
        """Ask the leader to hand leadership to ``target``; return once it has.

        Raises :class:`LeadershipTransferFailed` if ``target`` is not leader
        within ``transfer_timeout``.
        """
        await self._submit(Proposal(ProposalKind.TRANSFER_LEADER, b"", target))

    # -- proposal plumbing -------------------------------------------------

    async def _submit(self, proposal: Proposal) -> object:
        self._check_running()
        settings = self.settings
        deadline = trio.current_time() + settings.proposal_timeout
        last_error: DchanError | None = None
        while True:
            leader = self._core.leader
            if leader == self.id and self._core.role == Role.LEADER:
                try:
                    return await self._run_local(proposal)
                except NotLeader as exc:
                    # Never reached the log: safe to retry through the new leader.
                    last_error = exc
            elif leader is not None and leader != self.id:
                try:
                    reply = await self._transport_or_raise().forward(leader, proposal)
                except NotLeader as exc:
                    last_error = exc
                except Unavailable as exc:
                    if exc.maybe_delivered and proposal.kind != ProposalKind.TRANSFER_LEADER:
                        raise OutcomeUnknown(
                            f"lost the connection to leader {leader} after sending: {exc}"
                        ) from exc
                    last_error = exc
                else:
                    return await self._after_forward(reply)
            else:
                last_error = NotLeader(leader if leader != self.id else None)
            self._check_running()
            if trio.current_time() >= deadline:
                assert last_error is not None
                raise last_error
            # Wait for news about the leader, or a short pause before retrying.
            with trio.move_on_at(min(deadline, trio.current_time() + settings.retry_interval)):
                await self._wait_leader_change()

    async def _wait_leader_change(self) -> None:
        seen = (self._core.leader, self._core.term)
        await self.wait_for(lambda node: (node.leader, node.term) != seen)

    async def _run_local(self, proposal: Proposal) -> object:
        if proposal.kind == ProposalKind.COMMAND:
            return (await self._propose_local(proposal.data))[1]
        if proposal.kind == ProposalKind.CONF_CHANGE:
            return (await self._request_local(_CONF, ConfChange.decode(proposal.data)))[1]
        if proposal.target is None:
            raise ProposalDropped("leadership transfer without a target")
        await self._transfer_local(proposal.target)
        return None

    async def _after_forward(self, reply: object) -> object:
        if not (isinstance(reply, (list, tuple)) and len(reply) == 2):
            raise ProposalDropped(f"malformed reply to a forwarded proposal: {reply!r}")
        index, result = reply
        if not isinstance(index, int):
            raise ProposalDropped(f"malformed reply to a forwarded proposal: {reply!r}")
        # Read-your-writes: the caller sees its write in the local state machine.
        # (If this node stops meanwhile, the command still committed: say so.)
        with contextlib.suppress(NodeStopped):
            await self.wait_for(lambda node: node.applied_index >= index)
        return result

    async def _propose_local(self, command: bytes) -> tuple[int, object]:
        self._check_running()
        waiter = _Waiter()
        self._commands.append((command, waiter))
        self._wakeup.set()
        result = await waiter.wait()
        assert isinstance(result, tuple)
        return result

    async def _request_local(self, kind: int, arg: object) -> tuple[int, object]:
        self._check_running()
        waiter = _Waiter()
        self._requests.append((kind, arg, waiter))
        self._wakeup.set()
        result = await waiter.wait()
        assert isinstance(result, tuple)
        return result

    async def _transfer_local(self, target: NodeId) -> None:
        await self._request_local(_TRANSFER, target)
        with trio.move_on_after(self.settings.transfer_timeout):
            await self.wait_for(lambda node: node.leader == target)
            return
        raise LeadershipTransferFailed(
            f"{target} did not become leader within {self.settings.transfer_timeout} s"
        )

    def _check_running(self) -> None:
        if not self._running:
            raise NodeStopped(f"raft node {self.id} is not running")

    def _transport_or_raise(self) -> RaftTransport:
        if self._transport is None:
            raise NodeStopped(f"raft node {self.id} has no transport")
        return self._transport

    # -- the loop ----------------------------------------------------------

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        settings = self.settings
        interval = settings.tick_interval
        core = self._core
        self._running = True
        task_status.started()
        try:
            next_tick = trio.current_time() + interval
            while True:
                if self._inbox or self._commands or self._requests or self._wakeup.is_set():
                    await trio.lowlevel.checkpoint()
                else:
                    with trio.move_on_at(next_tick):
                        await self._wakeup.wait()
                if self._wakeup.is_set():
                    self._wakeup = trio.Event()
                now = trio.current_time()
                if now >= next_tick:
                    core.tick()
                    next_tick += interval
                    if now >= next_tick:
                        # Late (a busy loop or a stalled machine): don't replay missed ticks
                        # in a burst, which would time out elections spuriously.
                        next_tick = now + interval
                inbox = self._inbox
                refused = core.refused_snapshots
                while inbox:
                    message = inbox.popleft()
                    try:
                        core.step(message)
                    except DchanError as exc:
                        logger.warning("raft node %s ignored a bad message: %s", self.id, exc)
                if core.refused_snapshots != refused:
                    logger.warning(
                        "raft node %s refused a snapshot larger than %d bytes from the leader",
                        self.id,
                        core.config.max_snapshot_bytes,
                    )
                if self._commands:
                    self._propose_batch()
                if self._requests:
                    self._handle_requests()
                changed = False
                for _ in range(_MAX_READIES_PER_ROUND):
                    if not core.has_ready():
                        break
                    await self._handle_ready(core.ready())
                    changed = True
                else:
                    # Still more to do: come back after letting other tasks run.
                    self._wakeup.set()
                if not self._pending:
                    self._orphan_deadline = math.inf
                elif core.role != Role.LEADER or core.term != self._lead_term:
                    # Deposed: keep watching what gets applied for a while, then give up.
                    if self._orphan_deadline == math.inf:
                        self._orphan_deadline = now + settings.outcome_wait
                    elif now >= self._orphan_deadline:
                        self._fail_pending(
                            OutcomeUnknown(
                                f"raft node {self.id} lost leadership before the entry committed"
                            )
                        )
                if self._since_snapshot >= settings.snapshot_every:
                    self._take_snapshot()
                    changed = True
                if changed:
                    self._notify()
        except Exception as exc:
            self._error = exc
            raise
        finally:
            self._running = False
            self._stopped = True
            self._fail_all()
            self._notify()

    def _propose_batch(self) -> None:
        core = self._core
        commands = self._commands
        batch = [item for item in commands[: self.settings.max_batch] if not item[1].abandoned]
        del commands[: self.settings.max_batch]
        if commands:
            self._wakeup.set()
        if not batch:
            return
        if core.role != Role.LEADER:
            error: DchanError = NotLeader(core.leader)
            for _, waiter in batch:
                waiter.fail(error)
            return
        try:
            last = core.propose_many([command for command, _ in batch])
        except DchanError as exc:
            for _, waiter in batch:
                waiter.fail(exc)
            return
        term = core.term
        self._lead_term = term
        first = last - len(batch) + 1
        for offset, (_, waiter) in enumerate(batch):
            self._track(first + offset, term, waiter)
        self.stats_batches += 1

    def _track(self, index: int, term: int, waiter: _Waiter) -> None:
        old = self._pending.get(index)
        if old is not None:
            # A deposed proposal this node, leader again, has just overwritten.
            old[1].fail(ProposalDropped(f"entry {index} of term {old[0]} was overwritten"))
        self._pending[index] = (term, waiter)

    def _handle_requests(self) -> None:
        core = self._core
        requests, self._requests = self._requests, []
        for kind, arg, waiter in requests:
            if waiter.abandoned:
                continue
            if core.role != Role.LEADER:
                waiter.fail(NotLeader(core.leader))
                continue
            try:
                if kind == _CONF:
                    assert isinstance(arg, ConfChange)
                    index = core.propose_conf_change(arg)
                    self._lead_term = core.term
                    self._track(index, core.term, waiter)
                else:
                    assert isinstance(arg, str)
                    core.transfer_leadership(arg)
                    waiter.succeed((0, None))
            except DchanError as exc:
                waiter.fail(exc)

    async def _handle_ready(self, ready: Ready) -> None:
        # 1. Persist: one save (one fsync round) for everything this Ready carries.
        hard_state = ready.hard_state
        if hard_state is not None:
            saved = self._saved_hs
            if (
                not ready.entries
                and ready.snapshot is None
                and hard_state.term == saved.term
                and hard_state.vote == saved.vote
            ):
                # Only the commit index moved. Nothing sent depends on it being
                # durable (a restarted node relearns it from the leader), so it
                # rides along with the next save instead of costing an fsync now.
                self._deferred_hs = hard_state
                hard_state = None
        elif (ready.entries or ready.snapshot is not None) and self._deferred_hs is not None:
            hard_state = self._deferred_hs
        # A leader whose term and vote are already durable may send its appends
        # while its own write is in flight (Raft thesis, section 10.2.1): the
        # core counts the leader itself towards a commit only once ``advance``
        # reports its entries stable, and nothing a leader sends in its own
        # term promises anything about its disk.
        early = (
            self.settings.leader_parallel_persist
            and self._core.role is Role.LEADER
            and (
                ready.hard_state is None
                or (
                    ready.hard_state.term == self._saved_hs.term
                    and ready.hard_state.vote == self._saved_hs.vote
                )
            )
        )
        if early and ready.messages:
            self._transport_or_raise().send(ready.messages)
        if hard_state is not None or ready.entries or ready.snapshot is not None:
            if self._persist_in_thread:
                await trio.to_thread.run_sync(
                    self._storage.save, hard_state, ready.entries, ready.snapshot
                )
            else:
                self._storage.save(hard_state, ready.entries, ready.snapshot)
            self.stats_saves += 1
            if hard_state is not None:
                self._saved_hs = hard_state
                self._deferred_hs = None
        # 2. Send what depends on it.
        if ready.messages and not early:
            self._transport_or_raise().send(ready.messages)
        # 3. Install a snapshot, apply committed entries.
        if ready.install_snapshot and ready.snapshot is not None:
            self._sm.restore(ready.snapshot.data)
            self._since_snapshot = 0
            covered = ready.snapshot.meta.index
            unknown = [index for index in self._pending if index <= covered]
            for index in unknown:
                _, waiter = self._pending.pop(index)
                waiter.fail(OutcomeUnknown("the log was replaced by a snapshot from the leader"))
        if ready.committed_entries:
            apply = self._sm.apply
            pending = self._pending
            for entry in ready.committed_entries:
                result = apply(entry)
                if pending:
                    slot = pending.pop(entry.index, None)
                    if slot is not None:
                        term, waiter = slot
                        if entry.term == term:
                            waiter.succeed((entry.index, result))
                        else:
                            waiter.fail(
                                ProposalDropped(
                                    f"entry {entry.index} was overwritten by term {entry.term}"
                                )
                            )
            self._since_snapshot += len(ready.committed_entries)
        # 4. Acknowledge.
        self._core.advance(ready)

    def _take_snapshot(self) -> None:
        core = self._core
        index = core.applied_index
        data = self._sm.snapshot()
        core.compact(index, data)
        self._since_snapshot = 0

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _fail_pending(self, error: RaftError) -> None:
        self._orphan_deadline = math.inf
        pending, self._pending = self._pending, {}
        for _, waiter in pending.values():
            waiter.fail(error)

    def _fail_all(self) -> None:
        why = f": {self._error!r}" if self._error is not None else ""
        stopped = NodeStopped(f"raft node {self.id} stopped{why}")
        stopped.__cause__ = self._error
        unknown = OutcomeUnknown(f"raft node {self.id} stopped before the entry committed{why}")
        unknown.__cause__ = self._error
        self._fail_pending(unknown)
        for _, waiter in self._commands:
            waiter.fail(stopped)
        for _, _, waiter in self._requests:
            waiter.fail(stopped)
        self._commands = []
        self._requests = []


@asynccontextmanager
async def open_raft_node(
    node_id: NodeId,
    *,
    storage: Storage,
    state_machine: StateMachine,
    transport: RaftTransport | None = None,
    transport_factory: Callable[[RaftHandler], RaftTransport] | None = None,
    settings: RaftSettings | None = None,
    initial_conf: ConfState | None = None,
    rng: random.Random | None = None,
) -> AsyncIterator[RaftNode]:
    """Run a Raft node for the duration of the ``async with`` block.

    Give either ``transport`` (already wired to deliver to the node some other
    way) or ``transport_factory``, called with the node (its
    :class:`~trio_dchan.raft.transport.RaftHandler`) to build one — e.g.
    ``functools.partial(network.transport_for, node_id)``.

    ``initial_conf`` bootstraps a brand-new cluster (ignored when ``storage``
    already holds state); a node with neither waits to be added by a leader.
    The node runs in a nursery inside this block. Leaving the block stops it;
    an error of the node (e.g. from ``storage.save``) cancels the block and
    is raised from it. The node does not close ``storage``: whoever opened
    it closes it (a restarted node may reuse the same object).
    """
    if (transport is None) == (transport_factory is None):
        raise TypeError("give exactly one of transport and transport_factory")
    node = RaftNode(
        node_id,
        storage=storage,
        state_machine=state_machine,
        settings=settings if settings is not None else RaftSettings(),
        initial_conf=initial_conf,
        rng=rng if rng is not None else random.Random(),
    )
    node._transport = transport if transport is not None else transport_factory(node)  # type: ignore[misc]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(node._run)
            yield node
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The node's own failure is the root cause: what the body saw (its
        # proposals failing because the node stopped) follows from it.
        if node._error is not None:
            raise node._error from None
        # Otherwise surface a single error of the body as itself.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
