"""``open_cluster()``: one node of a trio_dchan cluster, in one nursery.

This module only wires the layers together; each has its own module:

* storage (:mod:`.raft.storage`) holds the Raft log under ``data_dir``;
* the Raft node (:mod:`.raft.node`) replicates the :class:`~.registry.Registry`
  of who receives what;
* the gRPC transport (:mod:`.transport`) carries Raft traffic and data-plane
  streams between nodes;
* the data plane (:mod:`.dataplane`) makes the channels users hold.

Node ids are addresses: a node is known to the cluster by the ``address``
it is given, spelled exactly as in the other nodes' ``peers`` lists.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from os import PathLike

import trio

from .dataplane import (
    DataPlane,
    DataPlaneSettings,
    DistributedReceiveChannel,
    DistributedSendChannel,
    NamespaceStatistics,
)
from .dataplane.plane import propose_until_done
from .errors import DchanError
from .raft.errors import InvalidConfChange, NotLeader, UnknownNode
from .raft.node import NodeStopped, RaftNode, RaftSettings, open_raft_node
from .raft.storage import FileStorage, MemoryStorage
from .raft.types import ConfState, NodeId
from .registry import Registry, UnregisterNode, encode_command
from .transport import GrpcTransport, NodeStatus, TransportSettings, open_transport

__all__ = ["Cluster", "ClusterStatistics", "ClusterUnavailable", "Settings", "open_cluster"]

log = logging.getLogger(__name__)


class ClusterUnavailable(DchanError):
    """The node could not join its cluster or find a leader in time, or could not leave it."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Every timing and limit of a node, grouped by layer, with production defaults.

    Tests shrink the timings; a node must use the same ``dataplane.max_frame_bytes``
    and ``transport.max_message_bytes`` as its peers.
    """

    raft: RaftSettings = field(default_factory=RaftSettings)
    transport: TransportSettings = field(default_factory=TransportSettings)
    dataplane: DataPlaneSettings = field(default_factory=DataPlaneSettings)
    #: How long ``open_cluster`` waits to join and to learn a leader.
    start_timeout: float = 15.0
    #: How long ``cluster.leave()`` keeps asking the leader to remove this node.
    leave_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("start_timeout", "leave_timeout"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds")
        if self.dataplane.max_frame_bytes > self.transport.max_message_bytes:
            raise ValueError(
                "dataplane.max_frame_bytes must not exceed transport.max_message_bytes"
            )


@dataclass(frozen=True, slots=True)
class ClusterStatistics:
    """A snapshot of one node: its Raft view and its per-namespace traffic."""

    node_id: NodeId
    role: str
    term: int
    leader: NodeId | None
    commit_index: int
    voters: frozenset[NodeId]
    learners: frozenset[NodeId]
    namespaces: dict[str, NamespaceStatistics]


class Cluster:
    """One node's handle on the cluster; made by :func:`open_cluster`.

    ``send()`` and ``receive()`` make Trio channels whose other ends may be
    on any node. Everything the node runs lives in the nursery of the
    ``open_cluster`` block that made this object.
    """

    def __init__(self, node_id: NodeId, node: RaftNode, plane: DataPlane) -> None:
        self._node_id = node_id
        self._node = node
        self._plane = plane
        self._leave = False

    @property
    def node_id(self) -> NodeId:
        """This node's id (its address)."""
        return self._node_id

    @property
    def leader(self) -> NodeId | None:
        """The Raft leader this node knows of, if any."""
        return self._node.leader

    @property
    def members(self) -> ConfState:
        """Voters and learners of the cluster, as this node knows them."""
        return self._node.members

    @property
    def raft(self) -> RaftNode:
        """The Raft node (role, term, commit index; membership operations)."""
        return self._node

    def send(self, namespace: str, buffer: int = 0) -> DistributedSendChannel:
        """A send channel into ``namespace``; each message reaches exactly one receiver.

        ``buffer`` is how many accepted messages may wait on this node for a
        receiver with room before ``send()`` blocks.
        """
        return self._plane.send(namespace, buffer)

    def receive(
        self, namespace: str, buffer: int = 0, *, prefetch: int = 0
    ) -> DistributedReceiveChannel:
        """A new receiver of ``namespace`` holding up to ``buffer`` messages.

        Returns at once; messages arrive once the registration commits
        (``await channel.wait_registered()`` waits for that).

        ``prefetch`` lets up to that many more messages be sent to this
        receiver while its buffer is full, so the next batch is already on
        its way when the buffer drains: a fast consumer gets more
        throughput, at the price of holding up to ``buffer + prefetch``
        messages on this node (see the user guide).
        """
        return self._plane.receive(namespace, buffer, prefetch=prefetch)

    def statistics(self) -> ClusterStatistics:
        conf = self._node.members
        return ClusterStatistics(
            node_id=self._node_id,
            role=self._node.role.value,
            term=self._node.term,
            leader=self._node.leader,
            commit_index=self._node.commit_index,
            voters=conf.voters,
            learners=conf.learners,
            namespaces=self._plane.statistics(),
        )

    def leave(self) -> None:
        """Leave the cluster for good when the ``open_cluster`` block ends.

        On exit the node closes its channels, then asks the leader to remove
        it from the membership, so the remaining nodes' quorum no longer
        counts it. Without ``leave()`` a node that exits stays a member and
        may come back from its ``data_dir``.
        """
        self._leave = True

    async def remove_node(self, node_id: NodeId) -> None:
        """Remove another node, one that is gone for good, from the cluster.

        A node that crashed stays a member (it may come back from its
        ``data_dir``), and so do its receivers: senders route around them
        while the node cannot be reached, but they still count as receivers
        (a tracked send reports ``TIMED_OUT``, not ``NO_RECEIVER``) and the
        node still counts towards the quorum. Removing it commits a
        membership change through Raft (from any node; it needs a majority
        of the current members) that also unregisters all its receivers.
        Returns once the change is applied on this node and its senders no
        longer count those receivers.

        Only for a node that is not running: a running node removed this way
        can no longer talk to the cluster. A node that wants to go calls
        :meth:`leave` itself.

        Raises :class:`ValueError` for this node itself, :class:`UnknownNode`
        for a node that is not a member, and the Raft node's errors if the
        change cannot be committed (``NotLeader`` when no leader answered
        within ``settings.raft.proposal_timeout``).
        """
        if node_id == self._node_id:
            raise ValueError("a node removes itself with cluster.leave()")
        if node_id not in self._node.members.members:
            raise UnknownNode(node_id)
        await self._node.remove_node(node_id)
        await self._node.wait_for(lambda node: node_id not in node.members.members)
        await self._plane.wait_routed()

    def _status(self) -> NodeStatus:
        conf = self._node.members
        return NodeStatus(
            node_id=self._node_id,
            role=self._node.role.value,
            term=self._node.term,
            leader=self._node.leader,
            commit_index=self._node.commit_index,
            applied_index=self._node.applied_index,
            voters=conf.voters,
            learners=conf.learners,
        )


@asynccontextmanager
async def open_cluster(
    address: str,
    *,
    cluster_id: str,
    peers: Iterable[str],
    data_dir: str | PathLike[str] | None = None,
    settings: Settings | None = None,
    ssl_context: ssl.SSLContext | None = None,
    client_ssl_context: ssl.SSLContext | None = None,
    rng: random.Random | None = None,
    sock: socket.socket | None = None,
) -> AsyncIterator[Cluster]:
    """Run one node of the cluster ``cluster_id`` for the duration of the block.

    ``address`` (``host:port``) is where this node listens and also its id.
    Every node given the same ``peers`` list forms one cluster with them;
    a node whose address is not in ``peers`` joins the running cluster
    through any of them. With ``data_dir`` the node keeps its Raft state
    there and restarts from it; ``None`` keeps it in memory.

    TLS: give ``ssl_context`` (the server's; ``verify_mode=CERT_REQUIRED``
    for mutual TLS) together with ``client_ssl_context`` (used to reach peers).

    ``sock``, an already bound TCP socket for ``address``, lets a caller
    (tests, supervisors) pick the port without a race; ``rng`` seeds every
    random choice of the node.

    Returns once the node has joined and knows a leader; raises
    :class:`ClusterUnavailable` after ``settings.start_timeout`` otherwise.
    Leaving the block closes the node's channels (unregistering its
    receivers), leaves the cluster if :meth:`Cluster.leave` was called, and
    stops every task. An error in any of the node's tasks ends the block
    with that error.
    """
    settings = settings if settings is not None else Settings()
    rng = rng if rng is not None else random.Random()
    peer_list = list(dict.fromkeys(peers))
    if not peer_list:
        raise ValueError("peers must name at least one node of the cluster")
    if (ssl_context is None) != (client_ssl_context is None):
        raise ValueError("TLS needs both ssl_context (server) and client_ssl_context")
    node_id = address
    founder = node_id in peer_list
    bootstrap = {p: p for p in peer_list} if founder else {}

    storage: FileStorage | MemoryStorage
    if data_dir is None:
        storage = MemoryStorage()
    else:
        storage = FileStorage(data_dir, cluster_id=cluster_id, node_id=node_id)
    try:
        # Only a node outside the peer list joins, and only on its first start.
        joining = not founder and not _has_state(storage)
        registry = Registry(initial_members=bootstrap)
        async with open_transport(
            node_id,
            address,
            cluster_id=cluster_id,
            peers={p: p for p in peer_list if p != node_id},
            settings=settings.transport,
            ssl_context=ssl_context,
            client_ssl_context=client_ssl_context,
            rng=random.Random(rng.getrandbits(64)),
            sock=sock,
        ) as transport:
            initial = ConfState(voters=frozenset(peer_list)) if founder else None
            async with open_raft_node(
                node_id,
                storage=storage,
                state_machine=registry,
                transport_factory=lambda handler: transport.attach(raft_handler=handler),
                settings=settings.raft,
                initial_conf=initial,
                rng=random.Random(rng.getrandbits(64)),
            ) as node:
                listed = frozenset(peer_list)

                def is_member(peer: NodeId) -> bool:
                    members = node.members.members
                    # A joiner knows no members until the leader's first append
                    # reaches it: until then it accepts its cluster's nodes.
                    return (
                        not members
                        or peer in members
                        or peer in listed
                        or peer in registry.members
                    )

                transport.set_is_member(is_member)
                with trio.move_on_after(settings.start_timeout) as scope:
                    if joining:
                        await _ask_leader(
                            functools.partial(_join, transport, node_id),
                            "joining the cluster",
                            peer_list,
                            rng,
                        )
                    # Receivers this node registered in an earlier life are gone.
                    await propose_until_done(
                        node.propose,
                        encode_command(UnregisterNode(node_id)),
                        "the removal of this node's earlier receivers",
                        settings.dataplane,
                        rng,
                    )
                if scope.cancelled_caught:
                    raise ClusterUnavailable(
                        f"node {node_id} could not join cluster {cluster_id!r} and reach a "
                        f"leader within {settings.start_timeout} s (peers: {peer_list}); "
                        "check that a majority of the peers are running and reachable"
                    )
                plane = DataPlane(
                    node_id,
                    registry=registry,
                    propose=node.propose,
                    open_link=transport.open_link,
                    settings=settings.dataplane,
                    rng=random.Random(rng.getrandbits(64)),
                    no_quorum=functools.partial(
                        _leaderless,
                        node,
                        2 * settings.raft.tick_interval * settings.raft.election_ticks,
                    ),
                )
                left = False
                async with plane:
                    cluster = Cluster(node_id, node, plane)
                    transport.attach(data_handler=plane, status=cluster._status)
                    yield cluster
                if cluster._leave:
                    # The answer comes from the node that ran the removal: a
                    # follower, once removed, may never hear of the commit, so
                    # it asks the leader (itself, if it leads). The members it
                    # knows now are asked too: the peers it was started with
                    # may have left since.
                    others = sorted((set(peer_list) | set(node.members.members)) - {node_id}) or [
                        node_id
                    ]
                    with trio.move_on_after(settings.leave_timeout):
                        try:
                            await _ask_leader(
                                functools.partial(_leave, transport, node_id),
                                "leaving the cluster",
                                others,
                                rng,
                                node.leader,
                            )
                        except InvalidConfChange as exc:
                            raise ClusterUnavailable(
                                f"node {node_id} cannot leave the cluster: {exc}"
                            ) from None
                        left = True
                    if not left:
                        raise ClusterUnavailable(
                            f"node {node_id} could not leave the cluster within "
                            f"{settings.leave_timeout} s: no leader answered"
                        )
    except BaseExceptionGroup as group:
        # The node's nurseries wrap whatever ends the block; a lone error
        # (ours or the body's) is raised as itself so callers can catch it.
        single = _single_error(group)
        if single is None:
            raise
        raise single from None
    finally:
        storage.close()


def _has_state(storage: FileStorage | MemoryStorage) -> bool:
    state = storage.load()
    return bool(state.entries) or state.snapshot is not None or state.hard_state.term > 0


async def _leaderless(node: RaftNode, grace: float) -> None:
    """Return once ``node`` has known no leader for ``grace`` seconds on end.

    A follower forgets its leader when it starts an election, a leader steps
    down when it stops hearing from a majority; an election that can succeed
    ends well within two election timeouts.
    """
    try:
        while True:
            await node.wait_for(lambda n: n.leader is None)
            with trio.move_on_after(grace):
                await node.wait_for(lambda n: n.leader is not None)
                continue
            return
    except NodeStopped:
        return


async def _join(transport: GrpcTransport, node_id: NodeId, to: NodeId) -> None:
    try:
        await transport.join(to, node_id)
    except InvalidConfChange:
        # Already a voter: an earlier run of this node joined, and kept no state.
        pass


async def _leave(transport: GrpcTransport, node_id: NodeId, to: NodeId) -> None:
    try:
        await transport.leave(to, node_id)
    except UnknownNode:
        pass  # already removed


async def _ask_leader(
    call: Callable[[NodeId], Awaitable[object]],
    what: str,
    peers: list[str],
    rng: random.Random,
    hint: NodeId | None = None,
) -> None:
    """Run ``call(node)`` against the leader until it succeeds.

    Tries the hinted leader first, then the listed peers in random order,
    following every ``NotLeader`` answer to the leader it names. Retries
    with capped backoff; the caller bounds the time.
    """
    delay = 0.05
    while True:
        queue = ([hint] if hint else []) + rng.sample(peers, len(peers))
        tried: set[NodeId] = set()
        while queue:
            target = queue.pop(0)
            if target in tried:
                continue
            tried.add(target)
            try:
                await call(target)
            except NotLeader as exc:
                if exc.leader is not None and exc.leader not in tried:
                    queue.insert(0, exc.leader)
            except InvalidConfChange:
                raise  # the leader refused it: asking again cannot help
            except (DchanError, OSError) as exc:
                log.info("%s through %s failed: %r", what, target, exc)
            else:
                return
        await trio.sleep(delay * (0.5 + rng.random()))
        delay = min(delay * 2, 1.0)


def _single_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one error inside (nested) exception groups, or None if there are several."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else None
