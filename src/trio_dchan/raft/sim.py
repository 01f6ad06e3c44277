"""A deterministic simulator of a whole cluster of :class:`RaftCore`.

Every node is a core, a simulated durable storage (whatever a Ready asked to
persist survives a crash; nothing else does) and a small replicated state
machine. A simulated network can delay, drop, duplicate and reorder
messages, split the cluster into arbitrary groups and isolate single nodes.
Nodes can crash and restart from their storage.

All randomness comes from one seed: the network's choices and every core's
RNG derive from it, and nodes are visited in sorted order, so a seed replays
the same trace in any process. After every step the simulator checks Raft's
safety properties and raises :class:`SimulationError` (its message ends with
``SEED=<seed> to replay``) the moment one breaks:

* at most one leader per term;
* log matching (same index and term imply the same entry and the same
  preceding term);
* leader completeness (a new leader holds every committed entry);
* committed entries are never lost or overwritten, and a node's commit index
  never decreases, not even across a crash;
* every node applies the same entry at every index, in order, without gaps.

It is a test utility, importable by any test::

    sim = Simulator(5, seed=7)
    sim.run_until(lambda: sim.leader() is not None, max_ticks=100)
    index = sim.one(b"cmd", expected=5)
"""

from __future__ import annotations

import heapq
import random
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .core import RaftConfig, RaftCore
from .errors import RaftError
from .types import (
    ConfChange,
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
)

__all__ = [
    "TIME_PER_TICK",
    "NetworkConfig",
    "SimApp",
    "SimNode",
    "SimulationError",
    "Simulator",
]

#: Simulated time units per tick; message delays are counted in these units.
TIME_PER_TICK = 10

_NORMAL = EntryType.NORMAL


class SimulationError(AssertionError):
    """A safety invariant broke, or a condition was not met in time."""


@dataclass(slots=True)
class NetworkConfig:
    """How the simulated network misbehaves. Delays are in time units
    (:data:`TIME_PER_TICK` per tick)."""

    min_delay: int = 1
    max_delay: int = 4
    #: Probability that a message is lost.
    drop: float = 0.0
    #: Probability that a message is delivered twice.
    duplicate: float = 0.0
    #: Probability that a message is held back for up to ``long_delay_max``
    #: (this is what reorders messages across many ticks).
    long_delay: float = 0.0
    long_delay_max: int = 20 * TIME_PER_TICK
    #: Whether ordinary delays may reorder the messages of one link. Off, each
    #: link is FIFO like the stream a real transport uses (long delays still
    #: reorder).
    reorder: bool = False


class SimApp:
    """The replicated state machine of a simulated node: it records every
    applied command. ``log[i - 1]`` is the command at index ``i`` (``None``
    for NOOP and CONF_CHANGE entries)."""

    __slots__ = ("index", "log")

    def __init__(self) -> None:
        self.log: list[bytes | None] = []
        self.index = 0

    def apply(self, entries: Sequence[Entry]) -> None:
        self.log.extend([e.data if e.type is _NORMAL else None for e in entries])
        self.index += len(entries)

    def snapshot(self) -> bytes:
        parts = [struct.pack(">Q", self.index)]
        for item in self.log:
            if item is None:
                parts.append(b"\xff\xff\xff\xff")
            else:
                parts.append(struct.pack(">I", len(item)))
                parts.append(item)
        return b"".join(parts)

    @classmethod
    def restore(cls, data: bytes) -> SimApp:
        app = cls()
        (app.index,) = struct.unpack_from(">Q", data, 0)
        pos = 8
        while pos < len(data):
            (size,) = struct.unpack_from(">I", data, pos)
            pos += 4
            if size == 0xFFFFFFFF:
                app.log.append(None)
            else:
                app.log.append(data[pos : pos + size])
                pos += size
        if len(app.log) != app.index:
            raise ValueError("snapshot data does not match its index")
        return app


@dataclass(slots=True)
class SimNode:
    """One simulated node: its core (``None`` while crashed), its durable
    storage and its state machine."""

    id: NodeId
    config: RaftConfig
    initial_conf: ConfState | None
    core: RaftCore | None = None
    app: SimApp = field(default_factory=SimApp)
    hard_state: HardState = field(default_factory=HardState)
    snapshot: Snapshot | None = None
    entries: list[Entry] = field(default_factory=list)
    commit_seen: int = 0
    restarts: int = 0

    @property
    def alive(self) -> bool:
        return self.core is not None

    def persisted(self) -> PersistedState:
        return PersistedState(
            hard_state=self.hard_state,
            snapshot=self.snapshot,
            entries=tuple(self.entries),
            initial_conf=self.initial_conf,
        )


class Simulator:
    """A cluster of cores on a simulated network, driven by one seed.

    ``nodes`` is a count (ids ``n1``, ``n2``, ...) or a list of ids; they
    bootstrap together as the initial voters. ``joiners`` are extra nodes
    started with no state (they wait to be added). ``config`` overrides
    :class:`RaftConfig` fields for every node. ``snapshot_every`` makes each
    node compact its log once that many entries were applied since its last
    snapshot. ``check=False`` skips the invariant checks (benchmarks only).
    """

    def __init__(
        self,
        nodes: int | Sequence[NodeId] = 3,
        seed: int = 0,
        *,
        config: dict[str, Any] | None = None,
        net: NetworkConfig | None = None,
        joiners: Sequence[NodeId] = (),
        snapshot_every: int = 0,
        check: bool = True,
        record_trace: bool = False,
    ) -> None:
        ids = [f"n{i + 1}" for i in range(nodes)] if isinstance(nodes, int) else list(nodes)
        self.seed = seed
        self.rng = random.Random(seed)
        self.net = net if net is not None else NetworkConfig()
        self.snapshot_every = snapshot_every
        self.check = check
        self.trace: list[tuple[Any, ...]] | None = [] if record_trace else None
        self.time = 0
        self.ticks = 0
        self._seq = 0
        self._queue: list[tuple[int, int, Message]] = []
        self._group: dict[NodeId, int] = {}
        self._link_last: dict[tuple[NodeId, NodeId], int] = {}
        overrides = config or {}
        conf = ConfState(voters=frozenset(ids))
        self.nodes: dict[NodeId, SimNode] = {}
        for node_id in sorted([*ids, *joiners]):
            cfg = RaftConfig(node_id, **overrides)
            self.nodes[node_id] = SimNode(node_id, cfg, conf if node_id in ids else None)
        self._order = sorted(self.nodes)
        # Global knowledge for the invariant checks.
        self.leaders: dict[int, NodeId] = {}
        self.committed: dict[int, tuple[int, EntryType, bytes]] = {}
        self.max_commit = 0
        self._seen_entries: dict[tuple[int, int], tuple[EntryType, bytes, int | None]] = {}
        #: Messages handed to the network, by type (for message-count tests).
        self.sent: dict[MessageType, int] = dict.fromkeys(MessageType, 0)
        #: Entries carried by APPEND messages, counted per (recipient, data).
        self.sent_entries = 0
        self.on_send: Callable[[Message], None] | None = None
        #: A targeted fault: messages for which it returns true are lost.
        self.drop_filter: Callable[[Message], bool] | None = None
        for node in self.nodes.values():
            self._start(node)

    # ------------------------------------------------------------------
    # Failures

    def fail(self, what: str) -> SimulationError:
        """An error describing ``what`` that names the seed to replay."""
        return SimulationError(
            f"{what} [time {self.time}, tick {self.ticks}] (SEED={self.seed} to replay)"
        )

    def _record(self, *event: Any) -> None:
        if self.trace is not None:
            self.trace.append((self.time, *event))

    # ------------------------------------------------------------------
    # Node lifecycle

    def _start(self, node: SimNode) -> None:
        rng = random.Random(self.rng.getrandbits(64))
        try:
            node.core = RaftCore(node.config, node.persisted(), rng)
        except RaftError as exc:
            raise self.fail(f"{node.id} cannot restart: {exc}") from exc
        node.app = SimApp.restore(node.snapshot.data) if node.snapshot is not None else SimApp()
        if node.core.commit_index < node.hard_state.commit:
            raise self.fail(f"{node.id} restarted with a lower commit index")
        node.commit_seen = node.core.commit_index
        self._process(node)

    def crash(self, node_id: NodeId) -> None:
        """Stop a node; it loses everything it did not persist."""
        node = self.nodes[node_id]
        if node.core is not None:
            node.core = None
            self._record("crash", node_id)

    def restart(self, node_id: NodeId) -> None:
        """Start a crashed node again from its storage."""
        node = self.nodes[node_id]
        if node.core is None:
            node.restarts += 1
            self._record("restart", node_id)
            self._start(node)

    # ------------------------------------------------------------------
    # Network

    def partition(self, *groups: Iterable[NodeId]) -> None:
        """Split the network: only nodes of the same group can talk. Nodes
        not named form one more group together."""
        self._group = {}
        for k, group in enumerate(groups, start=1):
            for node_id in group:
                self._group[node_id] = k
        self._record("partition", tuple(tuple(sorted(g)) for g in groups))

    def isolate(self, node_id: NodeId) -> None:
        """Cut one node off from everyone (on top of any partition)."""
        self._group[node_id] = -1 - self._order.index(node_id)
        self._record("isolate", node_id)

    def heal(self) -> None:
        """Reconnect everybody."""
        self._group = {}
        self._record("heal")

    def connected(self, a: NodeId, b: NodeId) -> bool:
        return self._group.get(a, 0) == self._group.get(b, 0)

    def _send(self, m: Message) -> None:
        self.sent[m.type] += 1
        if m.entries:
            self.sent_entries += len(m.entries)
        if self.on_send is not None:
            self.on_send(m)
        if not self.connected(m.sender, m.to):
            return
        if self.drop_filter is not None and self.drop_filter(m):
            self._record("filtered", m.sender, m.to, int(m.type))
            return
        net = self.net
        rng = self.rng
        copies = 1
        if net.drop and rng.random() < net.drop:
            copies = 0
        elif net.duplicate and rng.random() < net.duplicate:
            copies = 2
        for _ in range(copies):
            if net.long_delay and rng.random() < net.long_delay:
                at = self.time + rng.randint(net.max_delay, net.long_delay_max)
            else:
                at = self.time + rng.randint(net.min_delay, net.max_delay)
                if not net.reorder:
                    link = (m.sender, m.to)
                    at = max(at, self._link_last.get(link, 0))
                    self._link_last[link] = at
            self._seq += 1
            heapq.heappush(self._queue, (at, self._seq, m))

    def _deliver(self, m: Message) -> None:
        node = self.nodes.get(m.to)
        if node is None or node.core is None or not self.connected(m.sender, m.to):
            return
        self._record("deliver", m.sender, m.to, int(m.type), m.term, m.index, len(m.entries))
        try:
            node.core.step(m)
        except RaftError as exc:
            raise self.fail(f"{m.to} refused {m.type.name} from {m.sender}: {exc}") from exc
        self._process(node)

    # ------------------------------------------------------------------
    # Ready processing and invariant checks

    def _process(self, node: SimNode) -> None:
        core = node.core
        if core is None:
            return
        while core.has_ready():
            rd = core.ready()
            self._persist(node, core, rd)
            for m in rd.messages:
                self._send(m)
            self._apply(node, rd)
            core.advance(rd)
            if (
                self.snapshot_every
                and core.applied_index
                - (node.snapshot.meta.index if node.snapshot is not None else 0)
                >= self.snapshot_every
            ):
                core.compact(core.applied_index, node.app.snapshot())
        if self.check:
            self._check_node(node, core)

    def _persist(self, node: SimNode, core: RaftCore, rd: Ready) -> None:
        if rd.hard_state is not None:
            if self.check and rd.hard_state.commit < node.hard_state.commit:
                raise self.fail(f"{node.id} persisted a decreasing commit index")
            node.hard_state = rd.hard_state
        if rd.snapshot is not None:
            meta = rd.snapshot.meta
            if rd.install_snapshot:
                node.entries = []
            else:
                node.entries = [e for e in node.entries if e.index > meta.index]
            node.snapshot = rd.snapshot
            if self.check:
                known = self.committed.get(meta.index)
                if known is not None and known[0] != meta.term:
                    raise self.fail(f"{node.id} snapshot at {meta.index} has the wrong term")
        if rd.entries:
            first = rd.entries[0].index
            base = node.snapshot.meta.index if node.snapshot is not None else 0
            keep = first - base - 1
            if keep < 0 or keep > len(node.entries):
                raise self.fail(f"{node.id} was asked to persist a gap before {first}")
            del node.entries[keep:]
            node.entries.extend(rd.entries)
            if self.check:
                self._check_entries(node, core, rd.entries)

    def _check_entries(self, node: SimNode, core: RaftCore, entries: list[Entry]) -> None:
        seen = self._seen_entries
        committed = self.committed
        for e in entries:
            key = (e.index, e.term)
            prev = core.log_term(e.index - 1)
            if e.index > 1 and prev is None:
                prev = seen.get(key, (None, None, None))[2]
            rec = (e.type, e.data, prev)
            old = seen.get(key)
            if old is None:
                seen[key] = rec
            elif old != rec:
                raise self.fail(f"log matching broken at index {e.index} term {e.term}")
            # A lagging node may well hold a stale entry at an index committed
            # elsewhere; what must never happen is replacing one it committed.
            c = committed.get(e.index) if e.index <= node.commit_seen else None
            if c is not None and c[0] != e.term:
                raise self.fail(
                    f"{node.id} overwrote committed entry {e.index} with term {e.term}"
                )

    def _apply(self, node: SimNode, rd: Ready) -> None:
        app = node.app
        if rd.install_snapshot and rd.snapshot is not None:
            if rd.snapshot.meta.index < app.index:
                raise self.fail(f"{node.id} installs a snapshot behind its applied index")
            node.app = app = SimApp.restore(rd.snapshot.data)
            if self.check:
                for i, value in enumerate(app.log, start=1):
                    c = self.committed.get(i)
                    if c is not None and (c[2] if c[1] is _NORMAL else None) != value:
                        raise self.fail(f"{node.id} installed a snapshot that differs at {i}")
            self._record("install", node.id, rd.snapshot.meta.index)
        ents = rd.committed_entries
        if not ents:
            return
        if ents[0].index != app.index + 1:
            raise self.fail(
                f"{node.id} applies index {ents[0].index} after {app.index}: gap or repeat"
            )
        if self.check:
            committed = self.committed
            for e in ents:
                c = committed.get(e.index)
                if c is None:
                    committed[e.index] = (e.term, e.type, e.data)
                elif c != (e.term, e.type, e.data):
                    raise self.fail(f"{node.id} applied a different entry at index {e.index}")
        app.apply(ents)
        self._record("apply", node.id, ents[-1].index, ents[-1].term)

    def _check_node(self, node: SimNode, core: RaftCore) -> None:
        commit = core.commit_index
        if commit < node.commit_seen:
            raise self.fail(f"{node.id} commit index went back from {node.commit_seen}")
        if commit > node.commit_seen:
            committed = self.committed
            for i in range(max(node.commit_seen, core.first_index - 1) + 1, commit + 1):
                t = core.log_term(i)
                c = committed.get(i)
                if c is None:
                    entry = core.entries(i, i)
                    if entry:
                        committed[i] = (entry[0].term, entry[0].type, entry[0].data)
                elif t is not None and t != c[0]:
                    raise self.fail(f"{node.id} committed a different entry at index {i}")
            node.commit_seen = commit
            if commit > self.max_commit:
                self.max_commit = commit
        if core.role is Role.LEADER:
            term = core.term
            holder = self.leaders.get(term)
            if holder is None:
                self.leaders[term] = node.id
                self._record("leader", node.id, term)
                self._check_leader_completeness(node, core)
            elif holder != node.id:
                raise self.fail(f"two leaders in term {term}: {holder} and {node.id}")

    def _check_leader_completeness(self, node: SimNode, core: RaftCore) -> None:
        if core.last_index < self.max_commit:
            raise self.fail(
                f"leader {node.id} (term {core.term}) lacks committed entries up to "
                f"{self.max_commit}"
            )
        for i in range(core.first_index, self.max_commit + 1):
            c = self.committed.get(i)
            if c is not None and core.log_term(i) != c[0]:
                raise self.fail(f"leader {node.id} has a different entry at committed index {i}")

    # ------------------------------------------------------------------
    # Driving

    def tick(self) -> None:
        """Deliver the messages due within one tick, then tick every live node."""
        end = self.time + TIME_PER_TICK
        queue = self._queue
        while queue and queue[0][0] <= end:
            t, _, m = heapq.heappop(queue)
            self.time = t
            self._deliver(m)
        self.time = end
        self.ticks += 1
        for node_id in self._order:
            node = self.nodes[node_id]
            if node.core is not None:
                node.core.tick()
                self._process(node)

    def tick_node(self, node_id: NodeId) -> None:
        """Tick one node only (to script who times out first)."""
        node = self.nodes[node_id]
        if node.core is not None:
            node.core.tick()
            self._process(node)

    def run_ticks(self, n: int) -> None:
        for _ in range(n):
            self.tick()

    def run_until(self, cond: Callable[[], bool], max_ticks: int, what: str = "") -> int:
        """Tick until ``cond()`` holds; returns the ticks taken. Raises
        :class:`SimulationError` (naming the seed) after ``max_ticks``."""
        for k in range(max_ticks + 1):
            if cond():
                return k
            self.tick()
        raise self.fail(f"timed out after {max_ticks} ticks waiting for {what or cond}")

    def deliver_all(self) -> None:
        """Deliver every queued message (and those they cause) without ticking."""
        queue = self._queue
        while queue:
            t, _, m = heapq.heappop(queue)
            self.time = max(self.time, t)
            self._deliver(m)

    # ------------------------------------------------------------------
    # Observation and client helpers

    def core(self, node_id: NodeId) -> RaftCore:
        core = self.nodes[node_id].core
        if core is None:
            raise self.fail(f"{node_id} is not running")
        return core

    def alive(self) -> list[NodeId]:
        return [n for n in self._order if self.nodes[n].core is not None]

    def leader(self) -> NodeId | None:
        """The live leader with the highest term, if any."""
        best: tuple[int, NodeId] | None = None
        for node_id in self._order:
            core = self.nodes[node_id].core
            if (
                core is not None
                and core.role is Role.LEADER
                and (best is None or core.term > best[0])
            ):
                best = (core.term, node_id)
        return best[1] if best is not None else None

    def leaders_now(self) -> list[NodeId]:
        """Live nodes that believe they lead (possibly in different terms)."""
        return [
            n
            for n in self._order
            if (c := self.nodes[n].core) is not None and c.role is Role.LEADER
        ]

    def wait_leader(self, max_ticks: int = 200, among: Iterable[NodeId] | None = None) -> NodeId:
        """Tick until a live node of ``among`` (default: all) leads; return it."""
        group = set(among) if among is not None else None

        def found() -> bool:
            lead = self.leader_among(group)
            return lead is not None

        self.run_until(found, max_ticks, "a leader")
        lead = self.leader_among(group)
        if lead is None:  # pragma: no cover - run_until checked it
            raise self.fail("no leader")
        return lead

    def leader_among(self, group: set[NodeId] | None) -> NodeId | None:
        best: tuple[int, NodeId] | None = None
        for node_id in self._order:
            if group is not None and node_id not in group:
                continue
            core = self.nodes[node_id].core
            if (
                core is not None
                and core.role is Role.LEADER
                and (best is None or core.term > best[0])
            ):
                best = (core.term, node_id)
        return best[1] if best is not None else None

    def propose(self, node_id: NodeId, data: bytes) -> tuple[int, int] | None:
        """Propose ``data`` on ``node_id``; ``(index, term)`` or ``None`` if refused."""
        core = self.nodes[node_id].core
        if core is None:
            return None
        try:
            index = core.propose(data)
        except RaftError:
            return None
        self._record("propose", node_id, index, core.term)
        self._process(self.nodes[node_id])
        return index, core.term

    def propose_many(self, node_id: NodeId, datas: Sequence[bytes]) -> tuple[int, int] | None:
        """Propose a batch on ``node_id``; ``(last index, term)`` or ``None``."""
        core = self.nodes[node_id].core
        if core is None:
            return None
        try:
            index = core.propose_many(datas)
        except RaftError:
            return None
        self._record("propose", node_id, index, core.term)
        self._process(self.nodes[node_id])
        return index, core.term

    def conf_change(self, node_id: NodeId, cc: ConfChange) -> tuple[int, int]:
        """Propose a membership change on ``node_id`` (errors propagate)."""
        core = self.core(node_id)
        index = core.propose_conf_change(cc)
        self._record("conf_change", node_id, index, int(cc.type), cc.node_id)
        self._process(self.nodes[node_id])
        return index, core.term

    def transfer(self, node_id: NodeId, target: NodeId) -> None:
        """Ask leader ``node_id`` to hand leadership to ``target`` (errors propagate)."""
        self.core(node_id).transfer_leadership(target)
        self._record("transfer", node_id, target)
        self._process(self.nodes[node_id])

    def applied_at(self, index: int) -> list[tuple[NodeId, bytes | None]]:
        """What each live-or-dead node's state machine holds at ``index``."""
        out = []
        for node_id in self._order:
            app = self.nodes[node_id].app
            if app.index >= index:
                out.append((node_id, app.log[index - 1]))
        return out

    def n_applied(self, index: int, data: bytes | None = None) -> int:
        """How many nodes applied ``index`` (with command ``data`` if given)."""
        n = 0
        for node_id, value in self.applied_at(index):
            if data is not None and value != data:
                raise self.fail(f"{node_id} applied {value!r} at {index}, expected {data!r}")
            n += 1
        return n

    def one(
        self,
        data: bytes,
        expected: int,
        *,
        retry: bool = True,
        max_ticks: int = 400,
        nodes: Iterable[NodeId] | None = None,
    ) -> int:
        """Get ``data`` committed and applied on at least ``expected`` nodes.

        Like a client: find a leader, propose, wait; if the entry is lost
        (leader change), try again (unless ``retry`` is false). Returns the
        index. ``nodes`` restricts which nodes may be asked to propose.
        """
        start = self.ticks
        candidates = list(nodes) if nodes is not None else self._order
        while self.ticks - start < max_ticks:
            placed: tuple[int, int] | None = None
            for node_id in candidates:
                core = self.nodes[node_id].core
                if core is not None and core.role is Role.LEADER:
                    placed = self.propose(node_id, data)
                    if placed is not None:
                        break
            if placed is None:
                self.tick()
                continue
            index, _ = placed
            deadline = self.ticks + 4 * self._election_ticks()
            while self.ticks < deadline:
                got = self.applied_at(index)
                hits = sum(1 for _, value in got if value == data)
                if hits >= expected:
                    return index
                if got and all(value != data for _, value in got):
                    break  # another entry won that index
                self.tick()
            if not retry:
                raise self.fail(f"{data!r} was not applied on {expected} nodes")
        raise self.fail(f"one({data!r}, {expected}) did not agree in {max_ticks} ticks")

    def _election_ticks(self) -> int:
        return next(iter(self.nodes.values())).config.election_ticks

    def add_node(self, node_id: NodeId, **overrides: Any) -> None:
        """Start a new, empty node (a joiner); add it with a conf change."""
        if node_id in self.nodes:
            raise ValueError(f"{node_id} exists")
        base = next(iter(self.nodes.values())).config
        cfg = replace(base, id=node_id, **overrides)
        self.nodes[node_id] = SimNode(node_id, cfg, None)
        self._order = sorted(self.nodes)
        self._start(self.nodes[node_id])
