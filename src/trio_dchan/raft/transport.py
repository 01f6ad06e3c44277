"""How Raft nodes reach each other: the transport protocols and an in-memory network.

A :class:`~trio_dchan.raft.node.RaftNode` talks to its peers through a
:class:`RaftTransport` and is reached by them through the
:class:`RaftHandler` it implements. Two kinds of traffic cross:

* Raft messages (:class:`~trio_dchan.raft.types.Message`), fire-and-forget.
  ``send`` never blocks and may drop: the Raft core retries everything it
  needs (heartbeats, appends, votes).
* Forwarded proposals (:class:`Proposal`): a follower that is asked to
  propose runs the proposal on the leader with ``forward`` and gets back the
  leader's result, or the leader's error *with its type kept*
  (:class:`~trio_dchan.raft.errors.NotLeader` with its ``leader``,
  ``OutcomeUnknown``, ``ProposalDropped``, ...). A peer that cannot be
  reached raises :class:`Unavailable`.

:class:`MemoryNetwork` is the in-process implementation used by tests and
benchmarks. It delivers synchronously (``send`` calls the receiver's
``deliver``, which only enqueues), can partition, isolate and heal, and drops
a configurable share of messages using a seeded RNG, so a test run is
reproducible under :class:`trio.testing.MockClock`.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import RaftError
from .types import Message, NodeId

__all__ = [
    "MemoryNetwork",
    "MemoryTransport",
    "Proposal",
    "ProposalKind",
    "RaftHandler",
    "RaftTransport",
    "Unavailable",
]


class Unavailable(RaftError):
    """A peer could not be reached (down, partitioned, or not listening).

    Raised by :meth:`RaftTransport.forward`. ``maybe_delivered`` says whether
    the request may have reached the peer before the failure (a connection
    lost mid-call): ``False`` means the proposal certainly did not run there,
    so the caller may retry it elsewhere; ``True`` means its outcome is
    unknown, and the node reports ``OutcomeUnknown`` for it.
    """

    def __init__(
        self, peer: NodeId, reason: str = "unreachable", *, maybe_delivered: bool = False
    ) -> None:
        super().__init__(f"raft peer {peer} is unavailable: {reason}")
        self.peer = peer
        self.reason = reason
        self.maybe_delivered = maybe_delivered


class ProposalKind(enum.IntEnum):
    """What a forwarded :class:`Proposal` asks the leader to do."""

    #: ``data`` is an application command (bytes for the state machine).
    COMMAND = 0
    #: ``data`` is an encoded :class:`~trio_dchan.raft.types.ConfChange`.
    CONF_CHANGE = 1
    #: Hand leadership to ``target``; ``data`` is empty.
    TRANSFER_LEADER = 2


@dataclass(frozen=True, slots=True)
class Proposal:
    """A request a follower forwards to the leader.

    The leader's :meth:`RaftHandler.handle_forward` runs it exactly like a
    local ``propose`` / ``add_voter`` / ``transfer_leadership`` call and
    returns the same result (the state machine's apply result for commands
    and conf changes, ``None`` for a transfer).
    """

    kind: ProposalKind
    data: bytes = b""
    target: NodeId | None = None


class RaftTransport(Protocol):
    """What a Raft node uses to reach its peers."""

    def send(self, messages: Sequence[Message]) -> None:
        """Queue ``messages`` for their ``to`` nodes.

        Never blocks and never raises for an unreachable peer: a message
        that cannot be delivered is dropped (Raft retries). Messages to one
        peer should keep their order when they are delivered.
        """
        ...

    async def forward(self, to: NodeId, proposal: Proposal) -> object:
        """Run ``proposal`` on node ``to`` and return its result.

        Errors raised by the remote :meth:`RaftHandler.handle_forward` are
        re-raised here with their type and attributes (at least the
        :class:`~trio_dchan.errors.DchanError` subclasses of the Raft layer).
        An unreachable peer raises :class:`Unavailable`. Cancellation is
        honoured; the remote call may still complete in that case.
        """
        ...


class RaftHandler(Protocol):
    """What a Raft node offers its transport for inbound traffic."""

    def deliver(self, message: Message) -> None:
        """Hand an inbound message to the node. Never blocks; may drop when full."""
        ...

    async def handle_forward(self, proposal: Proposal) -> object:
        """Run a proposal forwarded by a peer; see :meth:`RaftTransport.forward`."""
        ...


class MemoryNetwork:
    """An in-process network connecting Raft nodes, for tests and benchmarks.

    Every node attaches with :meth:`transport_for`; attaching the same id
    again (a restarted node) replaces the old handler. Faults:

    * :meth:`partition` splits the nodes into groups that cannot talk across;
    * :meth:`isolate` cuts one node off from everyone;
    * :meth:`cut` / :meth:`heal` cut or restore single directed links,
      :meth:`heal` with no arguments restores everything;
    * :attr:`drop_rate` drops that share of Raft messages (not forwards),
      drawn from ``rng`` so that a seed reproduces a run.

    Delivery is synchronous: ``send`` calls the receiver's ``deliver`` (which
    only enqueues), so no task is needed and the network works unchanged
    under :class:`trio.testing.MockClock`.
    """

    def __init__(self, rng: random.Random | None = None, *, drop_rate: float = 0.0) -> None:
        self._rng = rng if rng is not None else random.Random(0)
        self._handlers: dict[NodeId, RaftHandler] = {}
        self._cut: set[tuple[NodeId, NodeId]] = set()
        self._groups: dict[NodeId, int] | None = None
        self.drop_rate = drop_rate
        #: Called with every message a node sends (before faults apply), e.g.
        #: by a test checker that verifies "one leader per term" from traffic.
        self.observers: list[Callable[[Message], None]] = []
        #: Messages handed to ``deliver`` / dropped, for tests' curiosity.
        self.delivered = 0
        self.dropped = 0

    # -- wiring ----------------------------------------------------------

    def transport_for(self, node_id: NodeId, handler: RaftHandler) -> MemoryTransport:
        """Attach ``handler`` as node ``node_id`` and return its transport."""
        self._handlers[node_id] = handler
        return MemoryTransport(self, node_id)

    def detach(self, node_id: NodeId, handler: RaftHandler | None = None) -> None:
        """Forget node ``node_id`` (only if it is still ``handler``, when given)."""
        current = self._handlers.get(node_id)
        if current is not None and (handler is None or current is handler):
            del self._handlers[node_id]

    @property
    def nodes(self) -> frozenset[NodeId]:
        return frozenset(self._handlers)

    # -- faults ----------------------------------------------------------

    def partition(self, *groups: Iterable[NodeId]) -> None:
        """Split nodes into ``groups``; nodes in no group are cut off from all."""
        mapping: dict[NodeId, int] = {}
        for number, group in enumerate(groups):
            for node in group:
                mapping[node] = number
        self._groups = mapping

    def isolate(self, node: NodeId) -> None:
        """Cut every link to and from ``node``."""
        for other in self._handlers:
            if other != node:
                self._cut.add((node, other))
                self._cut.add((other, node))
        self._cut.add((node, "*"))

    def cut(self, source: NodeId, dest: NodeId, *, both_ways: bool = True) -> None:
        """Cut the link from ``source`` to ``dest`` (and back, by default)."""
        self._cut.add((source, dest))
        if both_ways:
            self._cut.add((dest, source))

    def heal(self, source: NodeId | None = None, dest: NodeId | None = None) -> None:
        """Restore one link (both ways) or, with no arguments, the whole network."""
        if source is None:
            self._cut.clear()
            self._groups = None
            return
        if dest is None:
            self._cut = {link for link in self._cut if source not in link}
            return
        self._cut.discard((source, dest))
        self._cut.discard((dest, source))

    def connected(self, source: NodeId, dest: NodeId) -> bool:
        """Whether a message from ``source`` can reach ``dest`` right now."""
        if source == dest:
            return True
        if (source, dest) in self._cut or (source, "*") in self._cut or (dest, "*") in self._cut:
            return False
        groups = self._groups
        if groups is not None:
            group = groups.get(source)
            if group is None or group != groups.get(dest):
                return False
        return True

    # -- traffic -----------------------------------------------------------

    def _send(self, source: NodeId, messages: Sequence[Message]) -> None:
        drop_rate = self.drop_rate
        for observe in self.observers:
            for message in messages:
                observe(message)
        for message in messages:
            dest = message.to
            handler = self._handlers.get(dest)
            if handler is None or not self.connected(source, dest):
                self.dropped += 1
                continue
            if drop_rate and self._rng.random() < drop_rate:
                self.dropped += 1
                continue
            self.delivered += 1
            handler.deliver(message)

    async def _forward(self, source: NodeId, to: NodeId, proposal: Proposal) -> object:
        handler = self._handlers.get(to)
        if handler is None:
            raise Unavailable(to, "not attached to the network")
        if not self.connected(source, to):
            raise Unavailable(to, "network partitioned")
        return await handler.handle_forward(proposal)


class MemoryTransport:
    """One node's view of a :class:`MemoryNetwork` (a :class:`RaftTransport`)."""

    def __init__(self, network: MemoryNetwork, node_id: NodeId) -> None:
        self.network = network
        self.node_id = node_id

    def send(self, messages: Sequence[Message]) -> None:
        self.network._send(self.node_id, messages)

    async def forward(self, to: NodeId, proposal: Proposal) -> object:
        return await self.network._forward(self.node_id, to, proposal)
