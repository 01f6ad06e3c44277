"""A whole-cluster harness for node tests: nodes over a MemoryNetwork, crash and restart."""

from __future__ import annotations

import functools
import os
import random
import struct
from collections.abc import Callable
from typing import Any

import trio

from trio_dchan.raft.node import NodeStopped, RaftNode, RaftSettings, StateMachine, open_raft_node
from trio_dchan.raft.storage import MemoryStorage
from trio_dchan.raft.transport import MemoryNetwork
from trio_dchan.raft.types import ConfState, Entry, EntryType, Message, MessageType, NodeId, Role

#: Fast but realistic timings for tests under MockClock (time is free there).
#: Saves run inline: MockClock would jump while a worker thread runs.
TEST_SETTINGS = RaftSettings(
    tick_interval=0.01, election_ticks=10, heartbeat_ticks=2, persist_in_thread=False
)


class RecordingMachine:
    """A state machine that records every applied command, in order.

    ``apply`` returns ``(index, count)`` so a caller can tell which entry its
    command became. Snapshots carry the whole record.
    """

    def __init__(self) -> None:
        self.applied: list[bytes] = []
        self.last_index = 0
        self.restores = 0

    def apply(self, entry: Entry) -> object:
        if entry.index <= self.last_index:
            raise AssertionError(f"entry {entry.index} applied twice or out of order")
        self.last_index = entry.index
        if entry.type != EntryType.NORMAL:
            return None
        self.applied.append(entry.data)
        return [entry.index, len(self.applied)]

    def snapshot(self) -> bytes:
        parts = [struct.pack(">QI", self.last_index, len(self.applied))]
        for item in self.applied:
            parts.append(struct.pack(">I", len(item)))
            parts.append(item)
        return b"".join(parts)

    def restore(self, data: bytes) -> None:
        last, count = struct.unpack_from(">QI", data, 0)
        pos = 12
        items = []
        for _ in range(count):
            (size,) = struct.unpack_from(">I", data, pos)
            pos += 4
            items.append(data[pos : pos + size])
            pos += size
        self.applied = items
        self.last_index = last
        self.restores += 1


class Cluster:
    """Runs Raft nodes in ``nursery``; each node lives in its own cancel scope."""

    def __init__(
        self,
        nursery: trio.Nursery,
        ids: list[NodeId],
        *,
        seed: int = 0,
        settings: RaftSettings = TEST_SETTINGS,
        machine_factory: Callable[[NodeId], StateMachine] | None = None,
        storage_factory: Callable[[NodeId], Any] | None = None,
    ) -> None:
        self.nursery = nursery
        self.ids = list(ids)
        # NODE_SEED_OFFSET=k replays every scenario with other seeds.
        self.seed = seed + int(os.environ.get("NODE_SEED_OFFSET", "0"))
        self.settings = settings
        self.network = MemoryNetwork(random.Random(self.seed))
        #: term -> the node that sent appends/heartbeats as leader in it.
        self.leader_of_term: dict[int, NodeId] = {}
        self.violations: list[str] = []
        self.network.observers.append(self._observe)
        self.machine_factory = machine_factory or (lambda _id: RecordingMachine())
        self.storage_factory = storage_factory or (lambda _id: MemoryStorage())
        self.storages: dict[NodeId, Any] = {}
        self.machines: dict[NodeId, StateMachine] = {}
        self.nodes: dict[NodeId, RaftNode] = {}
        self.scopes: dict[NodeId, trio.CancelScope] = {}
        self.errors: dict[NodeId, BaseException] = {}
        self.incarnation: dict[NodeId, int] = {}

    def _observe(self, message: Message) -> None:
        """One leader per term, checked from the traffic itself."""
        if message.type in (MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT):
            known = self.leader_of_term.setdefault(message.term, message.sender)
            if known != message.sender:
                self.violations.append(
                    f"term {message.term}: both {known} and {message.sender} acted as leader"
                )

    def check(self) -> None:
        """Fail the test if the traffic ever showed two leaders in one term."""
        if self.violations:
            raise AssertionError("; ".join(self.violations))

    async def start_all(self) -> None:
        conf = ConfState(voters=frozenset(self.ids))
        for node_id in self.ids:
            await self.start(node_id, initial_conf=conf)

    async def start(
        self,
        node_id: NodeId,
        *,
        initial_conf: ConfState | None = None,
        settings: RaftSettings | None = None,
    ) -> RaftNode:
        if node_id not in self.storages:
            self.storages[node_id] = self.storage_factory(node_id)
        machine = self.machine_factory(node_id)
        self.machines[node_id] = machine
        generation = self.incarnation.get(node_id, 0) + 1
        self.incarnation[node_id] = generation
        node: RaftNode = await self.nursery.start(
            functools.partial(
                self._host,
                node_id,
                machine,
                initial_conf,
                settings or self.settings,
                random.Random(f"{self.seed}/{node_id}/{generation}"),
            )
        )
        return node

    async def _host(
        self,
        node_id: NodeId,
        machine: StateMachine,
        initial_conf: ConfState | None,
        settings: RaftSettings,
        rng: random.Random,
        task_status: trio.TaskStatus[RaftNode] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            self.scopes[node_id] = scope
            try:
                async with open_raft_node(
                    node_id,
                    storage=self.storages[node_id],
                    state_machine=machine,
                    transport_factory=functools.partial(self.network.transport_for, node_id),
                    settings=settings,
                    initial_conf=initial_conf,
                    rng=rng,
                ) as node:
                    self.nodes[node_id] = node
                    task_status.started(node)
                    await trio.sleep_forever()
            except Exception as exc:  # a node error: recorded for the test to inspect
                self.errors[node_id] = exc
            finally:
                if self.scopes.get(node_id) is scope:
                    self.nodes.pop(node_id, None)

    def crash(self, node_id: NodeId) -> None:
        """Stop a node abruptly: cancel its scope, no shutdown of any kind."""
        self.scopes[node_id].cancel()
        self.nodes.pop(node_id, None)
        self.network.detach(node_id)

    def leaders(self) -> list[RaftNode]:
        return [n for n in self.nodes.values() if n.running and n.role == Role.LEADER]

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, re-checking on every change of any node."""
        self.check()
        while not predicate():
            self.check()
            nodes = [n for n in self.nodes.values() if n.running]
            if not nodes:
                raise RuntimeError("no node is running")
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(self._watch, node, predicate, nursery.cancel_scope)

    @staticmethod
    async def _watch(
        node: RaftNode, predicate: Callable[[], bool], scope: trio.CancelScope
    ) -> None:
        try:
            await node.wait_for(lambda _node: predicate())
        except NodeStopped:
            pass
        scope.cancel()

    async def wait_leader(self, among: list[NodeId] | None = None) -> RaftNode:
        """Wait until one node of ``among`` leads and every other running one follows it."""
        pool = among if among is not None else self.ids

        def settled() -> bool:
            running = [self.nodes[i] for i in pool if i in self.nodes and self.nodes[i].running]
            leaders = [n for n in running if n.role == Role.LEADER]
            if len(leaders) != 1:
                return False
            lead = leaders[0]
            return all(n.leader == lead.id and n.term == lead.term for n in running)

        await self.wait_until(settled)
        (leader,) = [
            self.nodes[i] for i in pool if i in self.nodes and self.nodes[i].role == Role.LEADER
        ]
        return leader

    async def wait_applied(self, index: int, among: list[NodeId] | None = None) -> None:
        pool = among if among is not None else list(self.nodes)
        await self.wait_until(
            lambda: all(i in self.nodes and self.nodes[i].applied_index >= index for i in pool)
        )
