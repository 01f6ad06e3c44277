"""A 3-node Raft cluster over real gRPC on 127.0.0.1, in one process."""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass, field

import trio
from transport_helpers import address_of, bound_socket

from trio_dchan.raft.node import RaftNode, RaftSettings, open_raft_node
from trio_dchan.raft.storage import MemoryStorage
from trio_dchan.raft.types import ConfState, Role
from trio_dchan.registry import RegisterReceiver, Registry, encode_command
from trio_dchan.transport import GrpcTransport, NodeStatus, open_transport

# Snapshot often, so that the node rejoining after the others moved on is
# brought up to date with InstallSnapshot.
SETTINGS = RaftSettings(tick_interval=0.02, election_ticks=10, heartbeat_ticks=2, snapshot_every=8)


@dataclass
class Member:
    node_id: str
    port: int
    storage: MemoryStorage = field(default_factory=MemoryStorage)
    registry: Registry | None = None
    node: RaftNode | None = None
    transport: GrpcTransport | None = None
    stop: trio.Event = field(default_factory=trio.Event)
    stopped: trio.Event = field(default_factory=trio.Event)


def _socket_on(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def _run(
    member: Member,
    ids: list[str],
    sock: socket.socket,
    seed: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    registry = Registry({i: i for i in ids})
    member.registry = registry
    member.stop = trio.Event()
    member.stopped = trio.Event()
    try:
        async with open_transport(
            member.node_id,
            member.node_id,
            cluster_id="grpc-raft",
            peers={i: i for i in ids},
            sock=sock,
            is_member=lambda n: n in registry.members,
            rng=random.Random(seed),
        ) as transport:
            member.transport = transport
            async with open_raft_node(
                member.node_id,
                storage=member.storage,
                state_machine=registry,
                transport_factory=lambda n: transport.attach(raft_handler=n),
                settings=SETTINGS,
                initial_conf=ConfState(voters=frozenset(ids)),
                rng=random.Random(seed),
            ) as node:
                member.node = node
                transport.attach(status=lambda: _status(node))
                task_status.started()
                await member.stop.wait()
    finally:
        member.node = None
        member.stopped.set()


async def _leader(members: list[Member]) -> Member:
    """Wait until the running members agree on a leader that runs; return it.

    Each round decides on one look at every running node, then waits until
    a node differs from that look. The look must be the one the decision was
    made on: a node may change between the decision and the start of the
    tasks that wait (a follower learning of the new leader, say), and a wait
    that took its own look then would miss that change and, once the
    cluster is quiet, wait forever.
    """
    while True:
        seen = [
            (m, m.node, (m.node.leader, m.node.role, m.node.term))
            for m in members
            if m.node is not None
        ]
        leaders = {state[0] for _, _, state in seen}
        if len(leaders) == 1:
            for m, _, (_, role, _) in seen:
                if role is Role.LEADER and m.node_id in leaders:
                    return m
        async with trio.open_nursery() as nursery:
            for _, node, state in seen:

                async def changed(
                    node: RaftNode = node,
                    state: tuple[str | None, Role, int] = state,
                    nursery: trio.Nursery = nursery,
                ) -> None:
                    await node.wait_for(lambda n: (n.leader, n.role, n.term) != state)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(changed)


def _status(node: RaftNode) -> NodeStatus:
    return NodeStatus(
        node_id=node.id,
        role=node.role.value,
        term=node.term,
        leader=node.leader,
        commit_index=node.commit_index,
        applied_index=node.applied_index,
        voters=node.members.voters,
        learners=node.members.learners,
    )


def _receivers(member: Member) -> set[str]:
    assert member.registry is not None
    return {r.receiver_id for r in member.registry.receivers("orders")}


async def _register(member: Member, receiver: str) -> None:
    assert member.node is not None
    cmd = RegisterReceiver("orders", receiver, member.node_id, 4)
    assert await member.node.propose(encode_command(cmd)) is True


async def test_elect_replicate_fail_over_and_rejoin() -> None:
    socks = [bound_socket() for _ in range(3)]
    ids = [address_of(s) for s in socks]
    members = [Member(i, s.getsockname()[1]) for i, s in zip(ids, socks, strict=True)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for k, m in enumerate(members):
                await nursery.start(_run, m, ids, socks[k], k)
            leader = await _leader(members)
            followers = [m for m in members if m is not leader]
            # Replicate registry commands, proposed on the leader and (forwarded
            # over gRPC) on a follower.
            await _register(leader, "r-leader")
            await _register(followers[0], "r-follower")
            for m in members:
                assert m.registry is not None
                await m.registry.wait_for(lambda r: len(r.receivers("orders")) == 2)
                assert _receivers(m) == {"r-leader", "r-follower"}

            # Close the leader's node: the others elect a new leader and go on.
            old = leader
            old.stop.set()
            await old.stopped.wait()
            leader = await _leader(members)
            assert leader is not old
            other = followers[1] if followers[1] is not leader else followers[0]
            await _register(other, "r-1")
            # Enough entries that the leader compacts past what the old node has.
            for k in range(2, 20):
                await _register(leader, f"r-{k}")
            assert leader.transport is not None
            assert other.transport is not None
            status = await other.transport.status(leader.node_id)
            assert status.role == "leader"
            assert status.node_id == leader.node_id
            assert status.voters == frozenset(ids)

            # The old node comes back on its address, from its storage, and catches up.
            await nursery.start(_run, old, ids, _socket_on(old.port), 7)
            assert old.registry is not None
            await old.registry.wait_for(lambda r: len(r.receivers("orders")) == 21)
            assert _receivers(old) == {"r-leader", "r-follower"} | {f"r-{k}" for k in range(1, 20)}
            # It got there through a snapshot sent over InstallSnapshot.
            assert leader.transport.statistics()[old.node_id]["snapshot_chunks"] >= 1
            await _register(old, "r-from-rejoined")
            for m in members:
                assert m.registry is not None
                await m.registry.wait_for(lambda r: len(r.receivers("orders")) == 22)
            # Every node applied the same registry.
            assert len({tuple(m.registry.receivers("orders")) for m in members if m.registry}) == 1
            for m in members:
                m.stop.set()
