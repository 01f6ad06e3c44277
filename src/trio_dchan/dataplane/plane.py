"""The data plane of one node: routing, credit, batching, acks and inboxes.

Sending side. Every namespace this node sends into has one
:class:`_NsSender`, shared by all its send channels. It keeps one
:class:`_Slot` per registered receiver (from the Registry) holding the
credit that receiver's node granted this node. ``send()`` encodes the value
in the caller's task, takes one credit from the next slot that has some
(round-robin from a random start) and appends the message to the queue of
that receiver's node (:class:`_PeerOut`). A pump task per peer drains the
queue into one frame per batch; a feedback task reads acks, refusals and
credit grants back. Nothing blocks on the per-message path except waiting for
credit.

Receiving side. Every local receiver has an :class:`_Inbox`. A stream from a
sending node is served by :meth:`DataPlane.serve_stream`, which places
batches into inboxes against the credit it granted and sends acks and fresh
credit back. Credit comes from free buffer space plus the ``receive()`` calls
waiting, so a receiver with ``buffer=0`` behaves like a rendezvous.

A node delivers to its own receivers over an in-process link to itself, so
local and remote receivers follow exactly the same rules.
"""

from __future__ import annotations

import logging
import math
import random
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import trio
from outcome import Error, Value

from trio_dchan import codec
from trio_dchan.raft.types import NodeId
from trio_dchan.registry import (
    ReceiverInfo,
    RegisterReceiver,
    UnregisterReceiver,
    encode_command,
)

from . import _frames as fr
from .errors import MessageTooLargeError, PeerProtocolError
from .link import DataLink, memory_link_pair
from .types import DataPlaneSettings, NamespaceStatistics, Outcome, Receipt

if TYPE_CHECKING:
    from .channels import DistributedReceiveChannel, DistributedSendChannel

__all__ = ["DataPlane", "RegistryView"]

logger = logging.getLogger("trio_dchan.dataplane")

#: Longest receiver id (in UTF-8 bytes) the data plane routes to.
MAX_RID_BYTES = 4096
#: Bytes of a frame that one message must leave free for headers.
_RESERVE = fr.BATCH_OVERHEAD + MAX_RID_BYTES + 64
#: Upper bound of what ``join_encoded`` adds per item.
_ITEM_OVERHEAD = 9


class RegistryView(Protocol):
    """What the data plane reads from the Registry (the replicated state machine)."""

    @property
    def version(self) -> int: ...

    def receivers(self, namespace: str) -> tuple[ReceiverInfo, ...]: ...

    async def wait_changed(self, since_version: int) -> int: ...


class _Owner:
    """Accepted-message accounting of one send channel (or one hand-off)."""

    __slots__ = ("deadline", "delivered", "drained", "failed", "outstanding", "unplaced")

    def __init__(self, deadline: float | None = None) -> None:
        #: Accepted and not yet delivered or failed.
        self.outstanding = 0
        #: Accepted without a receiver's credit (waiting in the namespace queue).
        self.unplaced = 0
        self.delivered = 0
        self.failed = 0
        self.drained: trio.Event | None = None
        #: When its untracked messages fail if no receiver took them (a
        #: hand-off's own deadline); None: ``undeliverable_timeout`` after
        #: each was accepted or taken back.
        self.deadline = deadline

    def settle(self, ok: bool) -> None:
        if ok:
            self.delivered += 1
        else:
            self.failed += 1
        self.outstanding -= 1
        if self.outstanding == 0 and self.drained is not None:
            self.drained.set()

    async def wait_drained(self) -> None:
        if self.outstanding:
            # Tasks closing clones of one channel at once share one event.
            if self.drained is None or self.drained.is_set():
                self.drained = trio.Event()
            await self.drained.wait()


# An accepted message on its way: (slot, encoded, owner, receipt).
_Item = tuple["_Slot", bytes, _Owner, Receipt | None]
# An accepted message waiting for credit: (encoded, owner, receipt, deadline).
_Waiting = tuple[bytes, _Owner, Receipt | None, float]


class _Slot:
    """One receiver as seen by a sending node: where it lives and our credit there."""

    __slots__ = ("credit", "dead", "ns", "peer", "rid", "rid_bytes", "used", "want_sent")

    def __init__(self, ns: _NsSender, rid: str, peer: _PeerOut) -> None:
        self.ns = ns
        self.rid = rid
        self.rid_bytes = rid.encode("utf-8")
        self.peer = peer
        self.credit = 0
        self.want_sent = False
        self.dead = False
        #: A frame carried messages for this receiver, or credit for it came,
        #: since the last sweep.
        self.used = False

    def want(self) -> None:
        if self.peer.connected and not self.dead:
            self.want_sent = True
            self.peer.control.append(
                fr.rid_count(fr.WANT, self.rid, self.ns.plane.settings.credit_window)
            )
            self.peer.kick()

    def retire(self) -> None:
        """The receiver is gone, or leaving: no credit, messages or WANT for it from here."""
        self.dead = True
        self.credit = 0
        self.peer.remove_slot(self)


class _NsSender:
    """Sending state of one namespace on this node, shared by its send channels."""

    def __init__(self, plane: DataPlane, namespace: str) -> None:
        self.plane = plane
        self.namespace = namespace
        self.slots: list[_Slot] = []
        self.by_rid: dict[str, _Slot] = {}
        self.rr = 0
        self.lot = trio.lowlevel.ParkingLot()
        self.waiting: deque[_Waiting] = deque()
        self.open_channels = 0
        self.tasks_waiting = 0
        self.handoffs = 0
        self.queued = 0
        self.in_flight = 0
        self.delivered = 0
        self.failed = 0
        self.retried = 0

    @property
    def active(self) -> bool:
        return bool(self.open_channels or self.waiting or self.handoffs)

    def credit(self) -> int:
        return sum(s.credit for s in self.slots)

    def refresh(self, receivers: tuple[ReceiverInfo, ...]) -> None:
        """Follow the Registry: new receivers get a slot, removed ones lose theirs."""
        old = self.by_rid
        slots: list[_Slot] = []
        by_rid: dict[str, _Slot] = {}
        for info in receivers:
            slot = old.get(info.receiver_id)
            if slot is None:
                if len(info.receiver_id.encode("utf-8")) > MAX_RID_BYTES:
                    logger.warning("ignoring receiver %r: id too long", info.receiver_id[:64])
                    continue
                peer = self.plane._peer(info.node_id)
                slot = _Slot(self, info.receiver_id, peer)
                peer.add_slot(slot)
                if self.active:
                    slot.want()
            slots.append(slot)
            by_rid[info.receiver_id] = slot
        for rid, slot in old.items():
            if rid not in by_rid:
                slot.retire()
        self.slots = slots
        self.by_rid = by_rid
        self.rr = self.plane.rng.randrange(len(slots)) if slots else 0
        self.on_credit()

    def activate(self) -> None:
        for slot in self.slots:
            if not slot.want_sent:
                slot.want()

    def _pick(self) -> _Slot | None:
        slots = self.slots
        n = len(slots)
        i = self.rr
        for _ in range(n):
            slot = slots[i]
            i += 1
            if i == n:
                i = 0
            if slot.credit:
                slot.credit -= 1
                self.rr = i
                return slot
            if not slot.want_sent:
                slot.want()
        return None

    def place(self, encoded: bytes, owner: _Owner, receipt: Receipt | None) -> bool:
        """Accept a message against a receiver's credit; False if nobody has any."""
        if self.waiting and not self._drain_waiting():
            return False
        # Most often the receiver whose turn it is has credit: take it
        # without the round-robin search.
        slots = self.slots
        i = self.rr
        slot = slots[i] if i < len(slots) else None
        if slot is not None and slot.credit:
            slot.credit -= 1
            i += 1
            self.rr = i if i < len(slots) else 0
        else:
            slot = self._pick()
            if slot is None:
                return False
        self.queued += 1
        owner.outstanding += 1
        self.plane._pending += 1
        peer = slot.peer
        peer.enqueue((slot, encoded, owner, receipt))
        if receipt is not None:
            receipt._on_wait = peer.flush_for
        return True

    def hold(
        self, encoded: bytes, owner: _Owner, receipt: Receipt | None, deadline: float
    ) -> None:
        """Accept a message without credit; it waits in this namespace's queue."""
        self.queued += 1
        owner.outstanding += 1
        owner.unplaced += 1
        self.plane._pending += 1
        self.waiting.append((encoded, owner, receipt, deadline))
        self.plane._kick_expiry(deadline)

    def requeue(self, encoded: bytes, owner: _Owner, receipt: Receipt | None) -> None:
        """Take back a message that provably reached no buffer, to try another receiver."""
        self.retried += 1
        self.queued += 1
        owner.unplaced += 1
        if receipt is not None:
            deadline = receipt.deadline
        elif owner.deadline is not None:
            deadline = owner.deadline
        else:
            deadline = trio.current_time() + self.plane.settings.undeliverable_timeout
        self.waiting.append((encoded, owner, receipt, deadline))
        self.plane._kick_expiry(deadline)

    def _drain_waiting(self) -> bool:
        waiting = self.waiting
        while waiting:
            slot = self._pick()
            if slot is None:
                return False
            encoded, owner, receipt, _ = waiting.popleft()
            owner.unplaced -= 1
            slot.peer.enqueue((slot, encoded, owner, receipt))
            if receipt is not None:
                receipt._on_wait = slot.peer.flush_for
        return True

    def blocked(self) -> None:
        """A sender is about to wait: batches being gathered should leave now."""
        for slot in self.slots:
            slot.peer.flush()

    def on_credit(self) -> None:
        if self.waiting:
            self._drain_waiting()
        self.lot.unpark_all()

    def expire(self, now: float) -> float:
        """Fail waiting messages past their deadline; return the next deadline."""
        keep: deque[_Waiting] = deque()
        nearest = math.inf
        outcome = Outcome.TIMED_OUT if self.slots else Outcome.NO_RECEIVER
        for item in self.waiting:
            _, owner, receipt, deadline = item
            if deadline <= now:
                owner.unplaced -= 1
                self.queued -= 1
                self.settle_failed(owner, receipt, outcome)
            else:
                keep.append(item)
                nearest = min(nearest, deadline)
        if len(keep) != len(self.waiting):
            self.waiting = keep
            self.lot.unpark_all()
        return nearest

    def settle_failed(self, owner: _Owner, receipt: Receipt | None, outcome: Outcome) -> None:
        self.failed += 1
        self.plane._settled()
        owner.settle(False)
        if receipt is not None:
            receipt._resolve(outcome)


class _PeerOut:
    """This node's sending side towards one peer: queue, stream, in-flight window."""

    def __init__(self, plane: DataPlane, node_id: NodeId) -> None:
        self.plane = plane
        self.node_id = node_id
        self.slots: dict[str, _Slot] = {}
        self.queue: deque[_Item] = deque()
        self.control: list[bytes] = []
        self.inflight: deque[_Item] = deque()
        self.refused: deque[fr.Refuse] = deque()
        self.acked = 0
        self.next_seq = 1
        #: Last message number of each sent frame not yet fully acknowledged.
        self.unacked_frames: deque[int] = deque()
        self._window_open = trio.Event()
        self.connected = False
        self._wake = trio.Event()
        self._sleeping = False
        self._full = trio.Event()
        self._lingering = False
        #: A sender waits for the batch being gathered: gather no longer.
        self._flushed = False
        self._target = plane.settings.batch_target
        self._target_bytes = plane.settings.batch_target_bytes
        #: Bytes of the encoded messages in ``queue``.
        self.queued_bytes = 0
        #: The most messages credit has let us have queued or on the way
        #: (for namespaces in use, since the last sweep).
        self._reach = 0
        self._needed = trio.Event()

    def add_slot(self, slot: _Slot) -> None:
        self.slots[slot.rid] = slot
        self._needed.set()

    def remove_slot(self, slot: _Slot) -> None:
        if self.slots.get(slot.rid) is slot:
            del self.slots[slot.rid]

    def enqueue(self, item: _Item) -> None:
        queue = self.queue
        queue.append(item)
        self.queued_bytes += len(item[1])
        self.plane._enqueued += 1
        if self._sleeping:
            self._sleeping = False
            self._wake.set()
        elif self._lingering and (
            len(queue) >= self._target or self.queued_bytes >= self._target_bytes
        ):
            self.flush()

    def flush(self) -> None:
        """Send the batch being gathered now (it is full, or its senders wait)."""
        self._flushed = True
        if self._lingering:
            self._lingering = False
            self._full.set()

    def flush_for(self, receipt: Receipt) -> None:
        """A task waits for ``receipt``: if its message is the newest queued, send it now.

        Then nothing else is being added behind it (a sender that keeps
        sending would have queued more), so gathering a batch only delays it.
        """
        queue = self.queue
        if queue and queue[-1][3] is receipt:
            self.flush()

    def kick(self) -> None:
        if self._sleeping:
            self._sleeping = False
            self._wake.set()

    async def run(self) -> None:
        settings = self.plane.settings
        backoff = settings.retry_backoff_min
        while True:
            if not self.slots:
                self._needed = trio.Event()
                await self._needed.wait()
            try:
                link = await self.plane._open(self.node_id)
            except Exception as exc:
                logger.debug("data link to %s failed to open: %r", self.node_id, exc)
                await trio.sleep(backoff * (0.5 + self.plane.rng.random()))
                backoff = min(backoff * 2, settings.retry_backoff_max)
                continue
            backoff = settings.retry_backoff_min
            self.acked = 0
            self.next_seq = 1
            self.unacked_frames.clear()
            self._reach = 0
            self.connected = True
            for slot in self.slots.values():
                if slot.ns.active:
                    slot.want()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, link, nursery.cancel_scope)
                    await self._read_feedback(link)
                    nursery.cancel_scope.cancel()
            finally:
                self.connected = False
                self._disconnected()
                with trio.CancelScope(shield=True):
                    try:
                        await link.aclose()
                    except Exception as exc:
                        logger.debug("closing data link to %s: %r", self.node_id, exc)
            await trio.sleep(settings.retry_backoff_min * (0.5 + self.plane.rng.random()))

    async def _pump(self, link: DataLink, scope: trio.CancelScope) -> None:
        idle = self.plane.settings.credit_idle_return
        window = self.plane.settings.max_unacked_frames
        linger = self.plane.settings.batch_linger
        linger_max = self.plane.settings.batch_linger_max
        most = self.plane.settings.batch_target
        most_bytes = self.plane.settings.batch_target_bytes
        unacked = self.unacked_frames
        sweep_at = trio.current_time() + idle
        try:
            while True:
                if len(unacked) >= window and not self.control:
                    # Let the batch grow while earlier frames are on their way:
                    # the batch size follows the round-trip time.
                    self._window_open = trio.Event()
                    await self._window_open.wait()
                    continue
                if not self.queue and not self.control:
                    self._wake = trio.Event()
                    self._sleeping = True
                    with trio.move_on_after(idle) as timer:
                        await self._wake.wait()
                    self._sleeping = False
                    if timer.cancelled_caught:
                        self._return_idle_credit()
                        if not self.control:
                            continue
                # A sender that keeps adding messages gets a moment to fill
                # this batch: two scheduler rounds tell a busy node (messages
                # were queued, for this peer or another) from a lone message
                # (it leaves at once).
                queue = self.queue
                before = self.plane._enqueued
                await trio.lowlevel.cancel_shielded_checkpoint()
                if not self._flushed:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                # Aim for half of what credit lets us have on the way, so one
                # batch is in flight while the next one gathers.
                reach = len(queue) + len(self.inflight)
                for slot in self.slots.values():
                    # Credit held for a namespace nobody sends into any more
                    # (until it goes back) would set targets no batch meets.
                    if slot.credit and slot.ns.active:
                        reach += slot.credit
                if reach > self._reach:
                    self._reach = reach
                target = max(1, min(most, self._reach // 2))
                # A batch of large messages also leaves at a quarter of the
                # bytes credit allows (at least `most_bytes`): such frames
                # take long to travel and decode, and with four of them in
                # the credit the receiver does not wait for each one while
                # the sender waits for credit.
                target_bytes = most_bytes
                if queue:
                    target_bytes = max(
                        most_bytes, self._reach * self.queued_bytes // (4 * len(queue))
                    )
                busy = self.plane._enqueued != before
                if (
                    linger > 0
                    and busy
                    and len(queue) < target
                    and self.queued_bytes < target_bytes
                    and not self._flushed
                ):
                    # Linger while messages keep coming: the batch leaves when
                    # it is big enough, when a sender waits for it, when
                    # `linger` passes without a message for this peer, or
                    # `linger_max` after it began to wait. On a node short
                    # of CPU the messages for one peer come slowly, and a
                    # batch cut short at the first pause would carry few of
                    # them: every frame costs as much as dozens of messages.
                    self._target = target
                    self._target_bytes = target_bytes
                    self._lingering = True
                    now = trio.current_time()
                    latest = now + linger_max
                    while True:
                        self._full = trio.Event()
                        had = len(queue)
                        with trio.move_on_at(min(now + linger, latest)):
                            await self._full.wait()
                        now = trio.current_time()
                        if not self._lingering or len(queue) == had or now >= latest:
                            break
                    self._lingering = False
                seq = self.next_seq
                frame = self._build()
                self._flushed = False
                if self.next_seq != seq:
                    unacked.append(self.next_seq - 1)
                if frame:
                    await link.send_frame(frame)
                now = trio.current_time()
                if now >= sweep_at:
                    sweep_at = now + idle
                    self._return_unused_credit()
                    # The most seen since the last sweep: follows the
                    # receivers now in use, not the busiest moment ever.
                    self._reach = 0
        except Exception as exc:
            logger.info("data link to %s failed while sending: %r", self.node_id, exc)
            scope.cancel()

    def _return_idle_credit(self) -> None:
        """Nothing was sent to this peer for a while: give all credit back."""
        for slot in self.slots.values():
            slot.used = False
            if slot.credit:
                self._return_credit(slot)

    def _return_unused_credit(self) -> None:
        """Give back the credit of receivers no frame served since the last sweep.

        The peer is busy with other receivers (or it would be idle), and a
        namespace that stopped sending must not keep room that other
        sending nodes could use.
        """
        for slot in self.slots.values():
            if slot.used:
                slot.used = False
            elif slot.credit:
                self._return_credit(slot)

    def _return_credit(self, slot: _Slot) -> None:
        self.control.append(fr.rid_count(fr.RETURN, slot.rid, slot.credit))
        slot.credit = 0
        slot.want_sent = False

    def _build(self) -> list[bytes]:
        parts = self.control
        self.control = []
        budget = self.plane.settings.max_frame_bytes - sum(map(len, parts))
        queue = self.queue
        inflight = self.inflight
        seq = self.next_seq
        sent_bytes = 0
        # The frame leaves in pieces, copied once into the transport's
        # message: each record's header goes in front of its messages once
        # their count is known.
        while queue:
            slot = queue[0][0]
            room = budget - fr.BATCH_OVERHEAD - len(slot.rid_bytes) - 16
            at = len(parts)
            parts.append(b"")
            size = 0
            while queue:
                item = queue[0]
                if item[0] is not slot:
                    break
                encoded = item[1]
                cost = len(encoded) + _ITEM_OVERHEAD
                if cost > room:
                    break
                room -= cost
                size += len(encoded)
                parts.append(encoded)
                inflight.append(queue.popleft())
            n = len(parts) - at - 1
            if not n:
                parts.pop()
                break
            slot.used = True
            head = codec.batch_header(n)
            parts[at] = fr.batch_header(seq, n, slot.rid_bytes, len(head) + size) + head
            budget -= len(parts[at]) + size
            sent_bytes += size
            seq += n
            ns = slot.ns
            ns.queued -= n
            ns.in_flight += n
        self.next_seq = seq
        self.queued_bytes -= sent_bytes
        return parts

    async def _read_feedback(self, link: DataLink) -> None:
        while True:
            try:
                frame = await link.receive_frame()
            except trio.EndOfChannel:
                return
            except Exception as exc:
                logger.info("data link to %s failed while receiving: %r", self.node_id, exc)
                return
            try:
                self._on_feedback(frame)
            except PeerProtocolError as exc:
                logger.warning("dropping the data link to %s: %s", self.node_id, exc)
                return

    def _on_feedback(self, frame: bytes | memoryview) -> None:
        touched: set[_NsSender] = set()
        for rec in fr.parse(frame, fr.TO_SENDER):
            if isinstance(rec, fr.RidCount):
                slot = self.slots.get(rec.rid)
                if slot is None or slot.dead:
                    if rec.n:
                        self.control.append(fr.rid_count(fr.RETURN, rec.rid, rec.n))
                        self.kick()
                    continue
                slot.credit += rec.n
                # Fresh credit counts as use until the next sweep: the
                # senders it unblocks have not had their turn yet.
                slot.used = True
                touched.add(slot.ns)
            elif isinstance(rec, fr.Refuse):
                last = rec.first_seq + rec.count - 1
                floor = self.refused[-1].first_seq + self.refused[-1].count if self.refused else 0
                if rec.first_seq <= max(self.acked, floor - 1) or last >= self.next_seq:
                    raise PeerProtocolError("refusal outside the window of sent messages")
                self.refused.append(rec)
            elif isinstance(rec, fr.Ack):
                if rec.upto < self.acked or rec.upto >= self.next_seq:
                    raise PeerProtocolError("ack outside the window of sent messages")
                self._ack(rec.upto, touched)
        for ns in touched:
            ns.on_credit()

    def _ack(self, upto: int, touched: set[_NsSender]) -> None:
        inflight = self.inflight
        refused = self.refused
        acked = self.acked
        plane = self.plane
        while acked < upto:
            slot, encoded, owner, receipt = inflight.popleft()
            acked += 1
            ns = slot.ns
            ns.in_flight -= 1
            if refused and refused[0].first_seq <= acked:
                rec = refused[0]
                if acked == rec.first_seq + rec.count - 1:
                    refused.popleft()
                if rec.reason is fr.Refusal.INVALID:
                    ns.settle_failed(owner, receipt, Outcome.REFUSED)
                else:
                    slot.credit = 0
                    ns.requeue(encoded, owner, receipt)
                    touched.add(ns)
                continue
            ns.delivered += 1
            plane._pending -= 1
            owner.outstanding -= 1
            owner.delivered += 1
            if not owner.outstanding and owner.drained is not None:
                owner.drained.set()
            if receipt is not None:
                receipt._resolve(Outcome.DELIVERED, slot.rid)
        self.acked = acked
        frames = self.unacked_frames
        if frames and frames[0] <= acked:
            while frames and frames[0] <= acked:
                frames.popleft()
            self._window_open.set()
        if not plane._pending and plane._idle is not None:
            plane._idle.set()

    def _disconnected(self) -> None:
        """The stream ended: sent-but-unacked outcomes are unknown; unsent ones retry."""
        touched: set[_NsSender] = set()
        for slot in self.slots.values():
            slot.credit = 0
            slot.want_sent = False
        self.control.clear()
        self.refused.clear()
        while self.inflight:
            slot, _, owner, receipt = self.inflight.popleft()
            slot.ns.in_flight -= 1
            slot.ns.settle_failed(owner, receipt, Outcome.UNKNOWN)
        self.queued_bytes = 0
        while self.queue:
            slot, encoded, owner, receipt = self.queue.popleft()
            slot.ns.queued -= 1
            slot.ns.requeue(encoded, owner, receipt)
            touched.add(slot.ns)
        for ns in touched:
            ns.on_credit()


class _Inbox:
    """One local receiver: its buffer, its waiting tasks and the credit it granted."""

    def __init__(self, namespace: str, rid: str, buffer: int, prefetch: int, window: int) -> None:
        self.namespace = namespace
        self.rid = rid
        self.buffer = buffer
        self.prefetch = prefetch
        #: Messages this receiver may hold: its buffer, then what was prefetched.
        self.capacity = buffer + prefetch
        self.chunk = max(1, min(self.capacity, window) // 4)
        self.data: deque[Any] = deque()
        self.waiting: OrderedDict[trio.lowlevel.Task, None] = OrderedDict()
        self.open_clones = 1
        self.registered = False
        self.registered_event = trio.Event()
        self.register_done = trio.Event()
        self.closing = False
        self.refusing = False
        self.ended = False
        self.closed_event = trio.Event()
        self.register_scope: trio.CancelScope | None = None
        self.granted_total = 0
        self.wanters: dict[_InStream, int] = {}
        self.freed = 0
        self.received = 0
        self.peak = 0
        self.handed_off = 0
        self.dropped = 0

    def grant(self) -> None:
        """Turn free space into credit for the sending nodes that want some."""
        self.freed = 0
        if self.closing or not self.wanters:
            return
        free = self.capacity + len(self.waiting) - len(self.data) - self.granted_total
        if free <= 0:
            return
        rid = self.rid
        hungry = [
            (stream, want - stream.granted.get(rid, 0))
            for stream, want in self.wanters.items()
            if want > stream.granted.get(rid, 0)
        ]
        while free > 0 and hungry:
            share = max(1, free // len(hungry))
            still: list[tuple[_InStream, int]] = []
            for stream, unmet in hungry:
                given = min(share, unmet, free)
                if given <= 0:
                    break
                before = stream.granted.get(rid, 0)
                stream.granted[rid] = before + given
                unsent = stream.credit_out.get(rid, 0) + given
                stream.credit_out[rid] = unsent
                self.granted_total += given
                free -= given
                if before < self.chunk or 2 * unsent >= self.capacity:
                    # The sender may be about to run dry, or half of this
                    # receiver's room waits here: tell it now. Otherwise it
                    # holds credit or has messages on the way, whose ack will
                    # carry this grant without a frame of its own (an ack
                    # comes once per frame, and waiting for it kept up to a
                    # frame's worth of credit from the sender: 20% less
                    # throughput with exact buffers).
                    stream.urgent = True
                    stream.kick()
                if unmet > given:
                    still.append((stream, unmet - given))
            hungry = still
        # Serve a different sending node first next time.
        if len(self.wanters) > 1:
            first = next(iter(self.wanters))
            self.wanters[first] = self.wanters.pop(first)

    def place(self, values: list[Any]) -> None:
        waiting = self.waiting
        start = 0
        while waiting and start < len(values):
            task, _ = waiting.popitem(last=False)
            task.custom_sleep_data._tasks.discard(task)
            trio.lowlevel.reschedule(task, Value(values[start]))
            start += 1
        if start < len(values):
            self.data.extend(values[start:] if start else values)
            if len(self.data) > self.peak:
                self.peak = len(self.data)
        self.received += len(values)

    def release(self, stream: _InStream) -> None:
        """Forget what ``stream`` was granted (it ended or gave credit back)."""
        granted = stream.granted.pop(self.rid, 0)
        self.granted_total -= granted
        self.wanters.pop(stream, None)

    def end(self) -> None:
        """No message can arrive any more: waiting tasks get EndOfChannel."""
        self.ended = True
        for task in list(self.waiting):
            task.custom_sleep_data._tasks.discard(task)
            trio.lowlevel.reschedule(task, Error(trio.EndOfChannel()))
        self.waiting.clear()


class _InStream:
    """The receiving side of one stream from a sending node."""

    def __init__(self, peer: NodeId, link: DataLink) -> None:
        self.peer = peer
        self.link = link
        self.expected = 1
        self.ack = 0
        self.ack_sent = 0
        self.granted: dict[str, int] = {}
        self.credit_out: dict[str, int] = {}
        self.refusals: list[bytes] = []
        #: Credit that should not wait for the next ack.
        self.urgent = False
        self._wake = trio.Event()
        self._sleeping = False

    def kick(self) -> None:
        if self._sleeping:
            self._sleeping = False
            self._wake.set()

    def has_feedback(self) -> bool:
        return bool(self.refusals or self.urgent or self.ack != self.ack_sent)

    async def feedback_pump(self, scope: trio.CancelScope) -> None:
        try:
            while True:
                if not self.has_feedback():
                    self._wake = trio.Event()
                    self._sleeping = True
                    await self._wake.wait()
                    continue
                parts = self.refusals
                self.refusals = []
                for rid, n in self.credit_out.items():
                    parts.append(fr.rid_count(fr.CREDIT, rid, n))
                self.credit_out.clear()
                self.urgent = False
                if self.ack != self.ack_sent:
                    parts.append(fr.ack(self.ack))
                    self.ack_sent = self.ack
                await self.link.send_frame(b"".join(parts))
        except Exception as exc:
            logger.info("data stream from %s failed while answering: %r", self.peer, exc)
            scope.cancel()


class DataPlane:
    """The data plane of one node.

    It implements :class:`~trio_dchan.dataplane.link.DataPlaneHandler` for the
    transport and makes the node's channels (:meth:`send`, :meth:`receive`).
    Run it with ``async with DataPlane(...) as plane:`` or start
    :meth:`run` in a nursery with ``await nursery.start(plane.run)``.

    ``propose`` runs a Registry command through Raft and returns once it is
    committed and applied on this node; ``open_link`` opens a stream to a peer
    (this node's own receivers are served over an in-process link).
    """

    def __init__(
        self,
        node_id: NodeId,
        *,
        registry: RegistryView,
        propose: Callable[[bytes], Awaitable[object]],
        open_link: Callable[[NodeId], Awaitable[DataLink]],
        settings: DataPlaneSettings | None = None,
        rng: random.Random | None = None,
        no_quorum: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.node_id = node_id
        self.registry = registry
        self.settings = settings if settings is not None else DataPlaneSettings()
        self.rng = rng if rng is not None else random.Random()
        self._propose = propose
        #: Returns once nothing can commit (no leader known for a while): a
        #: node shutting down then stops waiting for its unregistrations.
        self._no_quorum = no_quorum
        self._open_link = open_link
        self._senders: dict[str, _NsSender] = {}
        self._peers: dict[NodeId, _PeerOut] = {}
        self._inboxes: dict[str, _Inbox] = {}
        self._streams: set[_InStream] = set()
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._stopped = trio.Event()
        self._closed = trio.Event()
        self._pending = 0
        #: Messages queued for any peer so far (a busy node's batches linger).
        self._enqueued = 0
        self._idle: trio.Event | None = None
        self._expiry_wake = trio.Event()
        #: When the expiry loop looks at waiting messages next.
        self._expiry_at = -math.inf
        #: The Registry version the routing tables follow, and its change signal.
        self._routed_version = -1
        self._routed = trio.Event()
        self._next_rid = 0
        self._stack: AsyncExitStack | None = None
        self.max_message_bytes = self.settings.max_frame_bytes - _RESERVE

    # -- lifecycle ------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[DataPlane] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the data plane's tasks until :meth:`aclose`; cancelling it stops abruptly."""
        if self._nursery is not None:
            raise RuntimeError("this DataPlane is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_registry)
                nursery.start_soon(self._expire_loop)
                task_status.started(self)
                await self._stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._closing = True
            self._abandon()
            self._closed.set()
            self._routed.set()

    async def __aenter__(self) -> DataPlane:
        stack = AsyncExitStack()
        nursery = await stack.enter_async_context(trio.open_nursery())
        try:
            await nursery.start(self.run)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            if exc is None:
                await self.aclose()
            else:
                self._stopped.set()
        finally:
            stack, self._stack = self._stack, None
            if stack is not None:
                await stack.__aexit__(exc_type, exc, tb)
        return None

    async def aclose(self) -> None:
        """Close every channel of this node gracefully, then stop.

        Blocked ``send()`` calls raise :class:`trio.BrokenResourceError`;
        receivers are unregistered and their buffered messages handed to other
        receivers; accepted messages are delivered or fail. Bounded by the
        settings' timeouts; cancelling it stops at once (unsent messages fail
        with ``CANCELLED``, unacknowledged ones become ``UNKNOWN``).
        """
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        for ns in self._senders.values():
            ns.lot.unpark_all()
        try:
            async with trio.open_nursery() as nursery:
                for inbox in list(self._inboxes.values()):
                    if not inbox.closing:
                        nursery.start_soon(self._close_inbox, inbox)
                    else:
                        nursery.start_soon(inbox.closed_event.wait)
                await self.wait_settled()
        finally:
            self._stopped.set()
        await self._closed.wait()

    async def wait_settled(self) -> None:
        """Wait until every message accepted on this node was delivered or failed."""
        while self._pending:
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()
        await trio.lowlevel.checkpoint()

    @property
    def closing(self) -> bool:
        return self._closing

    def _abandon(self) -> None:
        """Settle whatever is left when the tasks stop (abrupt shutdown)."""
        for peer in self._peers.values():
            peer.connected = False
            while peer.inflight:
                slot, _, owner, receipt = peer.inflight.popleft()
                slot.ns.in_flight -= 1
                slot.ns.settle_failed(owner, receipt, Outcome.UNKNOWN)
            peer.queued_bytes = 0
            while peer.queue:
                slot, _, owner, receipt = peer.queue.popleft()
                slot.ns.queued -= 1
                slot.ns.settle_failed(owner, receipt, Outcome.CANCELLED)
        for ns in self._senders.values():
            while ns.waiting:
                _, owner, receipt, _ = ns.waiting.popleft()
                owner.unplaced -= 1
                ns.queued -= 1
                ns.settle_failed(owner, receipt, Outcome.CANCELLED)
            ns.lot.unpark_all()
        for inbox in self._inboxes.values():
            inbox.closing = True
            inbox.refusing = True
            inbox.registered_event.set()
            inbox.end()
            inbox.closed_event.set()

    def _spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        if self._nursery is None:
            raise RuntimeError("the DataPlane is not running (use 'async with' or run())")
        self._nursery.start_soon(fn, *args)

    def _settled(self) -> None:
        self._pending -= 1
        if not self._pending and self._idle is not None:
            self._idle.set()

    # -- channels -------------------------------------------------------------

    def send(self, namespace: str, buffer: int = 0) -> DistributedSendChannel:
        """A send channel into ``namespace``.

        ``buffer`` messages of this channel may wait on this node for a
        receiver with room before ``send()`` blocks (0: ``send()`` returns only
        once a receiver's credit took the message).
        """
        from .channels import DistributedSendChannel

        _check_namespace(namespace)
        if not isinstance(buffer, int) or buffer < 0:
            raise ValueError("buffer must be an integer >= 0")
        if self._closing:
            raise trio.BrokenResourceError("the node's data plane is closed")
        return DistributedSendChannel._create(self, self._sender(namespace), buffer)

    def receive(
        self, namespace: str, buffer: int = 0, *, prefetch: int = 0
    ) -> DistributedReceiveChannel:
        """A new receiver of ``namespace`` with room for ``buffer`` messages.

        It returns at once; the registration commits in the background
        (``await channel.wait_registered()`` to wait for it). Up to
        ``prefetch`` messages beyond a full buffer may be sent to it; they
        wait on this node and are received like buffered ones.
        """
        from .channels import DistributedReceiveChannel

        _check_namespace(namespace)
        if not isinstance(buffer, int) or buffer < 0:
            raise ValueError("buffer must be an integer >= 0")
        if not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError("prefetch must be an integer >= 0")
        if self._closing:
            raise trio.BrokenResourceError("the node's data plane is closed")
        self._next_rid += 1
        rid = f"{self.node_id}/{self._next_rid}-{self.rng.getrandbits(32):08x}"
        inbox = _Inbox(namespace, rid, buffer, prefetch, self.settings.credit_window)
        self._inboxes[rid] = inbox
        self._spawn(self._register, inbox)
        return DistributedReceiveChannel._create(self, inbox)

    def _sender(self, namespace: str) -> _NsSender:
        ns = self._senders.get(namespace)
        if ns is None:
            ns = self._senders[namespace] = _NsSender(self, namespace)
            ns.refresh(self.registry.receivers(namespace))
        return ns

    def _peer(self, node_id: NodeId) -> _PeerOut:
        peer = self._peers.get(node_id)
        if peer is None:
            peer = self._peers[node_id] = _PeerOut(self, node_id)
            self._spawn(peer.run)
        return peer

    def encode(self, value: object) -> bytes:
        """Encode one message in the caller's task; raise if it cannot be sent."""
        encoded = codec.encode(value)
        if len(encoded) > self.max_message_bytes:
            raise MessageTooLargeError(
                f"the message encodes to {len(encoded)} bytes; at most "
                f"{self.max_message_bytes} fit in one frame (settings.max_frame_bytes="
                f"{self.settings.max_frame_bytes})"
            )
        return encoded

    def statistics(self) -> dict[str, NamespaceStatistics]:
        """Per-namespace totals of this node (sending and receiving side)."""
        names = set(self._senders) | {i.namespace for i in self._inboxes.values()}
        out: dict[str, NamespaceStatistics] = {}
        for name in sorted(names):
            ns = self._senders.get(name)
            inboxes = [i for i in self._inboxes.values() if i.namespace == name]
            out[name] = NamespaceStatistics(
                namespace=name,
                open_send_channels=ns.open_channels if ns else 0,
                receivers_here=len(inboxes),
                buffered=sum(len(i.data) for i in inboxes),
                queued=ns.queued if ns else 0,
                in_flight=ns.in_flight if ns else 0,
                delivered=ns.delivered if ns else 0,
                failed=ns.failed if ns else 0,
                received=sum(i.received for i in inboxes),
            )
        return out

    # -- background tasks -----------------------------------------------------

    async def _watch_registry(self) -> None:
        seen = -1
        while True:
            if self.registry.version == seen:
                await self.registry.wait_changed(seen)
            seen = self.registry.version
            for name, ns in self._senders.items():
                ns.refresh(self.registry.receivers(name))
            for inbox in self._inboxes.values():
                present = any(
                    r.receiver_id == inbox.rid for r in self.registry.receivers(inbox.namespace)
                )
                if present and not inbox.registered:
                    inbox.registered = True
                    inbox.registered_event.set()
                elif not present:
                    inbox.registered = False
            self._routed_version = seen
            self._routed.set()
            self._routed = trio.Event()

    async def wait_routed(self) -> None:
        """Wait until routing follows every Registry change applied so far (or the plane ended)."""
        version = self.registry.version
        while self._routed_version < version and not self._closed.is_set():
            await self._routed.wait()

    def _kick_expiry(self, deadline: float) -> None:
        # Waiting messages mostly get later deadlines than those already
        # waiting: only an earlier one needs the expiry loop to look again.
        if deadline < self._expiry_at:
            self._expiry_at = deadline
            self._expiry_wake.set()

    async def _expire_loop(self) -> None:
        while True:
            now = trio.current_time()
            nearest = math.inf
            for ns in self._senders.values():
                if ns.waiting:
                    nearest = min(nearest, ns.expire(now))
            self._expiry_wake = trio.Event()
            self._expiry_at = nearest
            with trio.move_on_at(nearest):
                await self._expiry_wake.wait()

    async def _propose_until_done(self, command: bytes, what: str) -> None:
        await propose_until_done(self._propose, command, what, self.settings, self.rng)

    async def _register(self, inbox: _Inbox) -> None:
        command = encode_command(
            RegisterReceiver(inbox.namespace, inbox.rid, self.node_id, inbox.buffer)
        )
        try:
            if inbox.closing:
                return
            with trio.CancelScope() as scope:
                inbox.register_scope = scope
                await self._propose_until_done(command, f"receiver {inbox.rid}")
        finally:
            inbox.register_done.set()

    def _start_close(self, inbox: _Inbox) -> None:
        if inbox.closing or self._closed.is_set():
            return
        inbox.closing = True
        self._spawn(self._close_inbox, inbox)

    async def _close_inbox(self, inbox: _Inbox) -> None:
        """Unregister a receiver, refuse what still arrives, hand its buffer to others."""
        inbox.closing = True
        try:
            # A registration that has not been accepted yet is not retried.
            if (
                not inbox.register_done.is_set()
                and not inbox.registered
                and inbox.register_scope is not None
            ):
                inbox.register_scope.cancel()
            limit = self.settings.unregister_timeout
            committed = False
            with trio.move_on_after(limit) as timer:
                committed = await self._unregister(inbox)
            if not committed:
                # No quorum (or no leader) in time. From here on this node
                # refuses the receiver's messages, so their senders retry them
                # elsewhere; the node's next start removes the registration.
                if inbox.register_scope is not None:
                    inbox.register_scope.cancel()
                # Expected when the whole cluster stops at once: not a warning then.
                logger.log(
                    logging.WARNING if timer.cancelled_caught else logging.INFO,
                    "receiver %s: the unregistration did not commit (%s); its "
                    "messages are refused here and the registration is removed when "
                    "this node next starts",
                    inbox.rid,
                    f"not within {limit} s" if timer.cancelled_caught else "no quorum left",
                )
            inbox.refusing = True
            inbox.registered = False
            for stream in list(inbox.wanters):
                inbox.release(stream)
            for stream in self._streams:
                inbox.release(stream)
            if inbox.data:
                leftovers = list(inbox.data)
                inbox.data.clear()
                await self._handoff(inbox, leftovers)
        finally:
            inbox.end()
            inbox.registered_event.set()
            inbox.closed_event.set()
            if self._inboxes.get(inbox.rid) is inbox:
                del self._inboxes[inbox.rid]

    async def _unregister(self, inbox: _Inbox) -> bool:
        """Commit the removal of ``inbox``'s registration; False if there is no quorum.

        Only while the node shuts down does it give up for want of a quorum
        (when the whole cluster stops, the last nodes have none); a receiver
        closed in a running node waits out a leader election.
        """

        async def commit() -> None:
            await inbox.register_done.wait()
            await self._propose_until_done(
                encode_command(UnregisterReceiver(inbox.namespace, inbox.rid)),
                f"removal of receiver {inbox.rid}",
            )

        no_quorum = self._no_quorum
        if not self._closing or no_quorum is None:
            await commit()
            return True
        async with trio.open_nursery() as nursery:

            async def give_up() -> None:
                await no_quorum()
                nursery.cancel_scope.cancel()

            nursery.start_soon(give_up)
            await commit()
            nursery.cancel_scope.cancel()
            return True
        return False

    async def _handoff(self, inbox: _Inbox, values: list[Any]) -> None:
        ns = self._sender(inbox.namespace)
        # This node must not route the messages back to the receiver they
        # leave: its slot here may still hold credit until the Registry's
        # change reaches the router.
        slot = ns.by_rid.get(inbox.rid)
        if slot is not None:
            slot.retire()
        deadline = trio.current_time() + self.settings.handoff_timeout
        owner = _Owner(deadline)
        ns.handoffs += 1
        try:
            for value in values:
                try:
                    encoded = codec.encode(value)
                except Exception as exc:
                    logger.warning("cannot hand off a buffered message: %r", exc)
                    inbox.dropped += 1
                    continue
                ns.hold(encoded, owner, None, deadline)
            ns.activate()
            ns.on_credit()
            await owner.wait_drained()
        finally:
            ns.handoffs -= 1
        inbox.handed_off += owner.delivered
        inbox.dropped += owner.failed
        if owner.failed:
            logger.warning(
                "receiver %s closed: %d buffered messages found no other receiver",
                inbox.rid,
                owner.failed,
            )

    # -- links ----------------------------------------------------------------

    async def _open(self, peer: NodeId) -> DataLink:
        if peer == self.node_id:
            ours, theirs = memory_link_pair(max_frame_bytes=self.settings.max_frame_bytes)
            self._spawn(self._serve_local, theirs)
            return ours
        return await self._open_link(peer)

    async def _serve_local(self, link: DataLink) -> None:
        try:
            await self.serve_stream(self.node_id, link)
        except PeerProtocolError as exc:  # pragma: no cover - our own frames
            logger.error("local data stream failed: %s", exc)

    async def serve_stream(self, peer: NodeId, link: DataLink) -> None:
        """Serve one stream from ``peer`` (the receiving side); called by the transport.

        Returns when the peer ends the stream or the link fails. Raises
        :class:`~trio_dchan.dataplane.errors.PeerProtocolError` after ending
        the stream if the peer broke the protocol; nothing else is affected.
        """
        if self._closing:
            await link.aclose()
            return
        stream = _InStream(peer, link)
        self._streams.add(stream)
        error: PeerProtocolError | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.feedback_pump, nursery.cancel_scope)
                while True:
                    try:
                        frame = await link.receive_frame()
                    except trio.EndOfChannel:
                        break
                    except Exception as exc:
                        logger.info("data stream from %s failed: %r", peer, exc)
                        break
                    try:
                        self._on_frame(stream, frame)
                    except PeerProtocolError as exc:
                        logger.warning("refusing the data stream from %s: %s", peer, exc)
                        error = exc
                        break
                nursery.cancel_scope.cancel()
        finally:
            self._streams.discard(stream)
            for inbox in self._inboxes.values():
                if inbox.rid in stream.granted or stream in inbox.wanters:
                    inbox.release(stream)
                    inbox.grant()
            with trio.CancelScope(shield=True):
                try:
                    await link.aclose()
                except Exception as exc:
                    logger.debug("closing data stream from %s: %r", peer, exc)
        if error is not None:
            raise error

    def _on_frame(self, stream: _InStream, frame: bytes | memoryview) -> None:
        inboxes = self._inboxes
        for rec in fr.parse(frame, fr.TO_RECEIVER):
            if isinstance(rec, fr.Batch):
                first, count, rid = rec.first_seq, rec.count, rec.rid
                if first != stream.expected:
                    raise PeerProtocolError(
                        f"batch starts at message {first}, expected {stream.expected}"
                    )
                stream.expected = first + count
                stream.ack = first + count - 1
                inbox = inboxes.get(rid)
                if inbox is None or inbox.refusing:
                    stream.granted.pop(rid, None)
                    stream.refusals.append(fr.refuse(first, count, fr.Refusal.NO_RECEIVER))
                    continue
                granted = stream.granted.get(rid, 0)
                take = min(count, granted)
                if take == 0:
                    stream.refusals.append(fr.refuse(first, count, fr.Refusal.NO_CREDIT))
                    continue
                stream.granted[rid] = granted - take
                inbox.granted_total -= take
                mixed = False
                values: list[Any] | None
                try:
                    values = codec.decode_batch(rec.payload)
                except Exception as exc:
                    values = _decode_each(stream.peer, rid, rec.payload, count, exc)
                    mixed = True
                if values is None or len(values) != count:
                    stream.refusals.append(fr.refuse(first, count, fr.Refusal.INVALID))
                    inbox.grant()
                    continue
                if take < count:
                    values = values[:take]
                if mixed:
                    # Refuse the bad messages alone; the others are placed.
                    for i, value in enumerate(values):
                        if value is _UNDECODABLE:
                            stream.refusals.append(fr.refuse(first + i, 1, fr.Refusal.INVALID))
                    values = [value for value in values if value is not _UNDECODABLE]
                inbox.place(values)
                if len(values) < take:
                    inbox.grant()  # the refused ones' credit is room again
                if take < count:
                    stream.refusals.append(
                        fr.refuse(first + take, count - take, fr.Refusal.NO_CREDIT)
                    )
            elif not isinstance(rec, fr.RidCount):
                raise PeerProtocolError("unexpected record on a data stream")
            elif rec.kind == fr.WANT:
                inbox = inboxes.get(rec.rid)
                if inbox is None or inbox.closing:
                    continue
                inbox.wanters[stream] = rec.n
                if stream.credit_out.get(rec.rid):
                    # The sender asks while credit for it waits here for an
                    # ack that may never come: it has nothing on the way.
                    stream.urgent = True
                inbox.grant()
            else:  # RETURN
                # The sender gives back what it holds; credit granted to it
                # but not yet told (it waited for an ack) is taken back too,
                # or it would stay counted as granted with nobody to use it.
                granted = stream.granted.get(rec.rid, 0)
                back = min(rec.n + stream.credit_out.pop(rec.rid, 0), granted)
                stream.granted[rec.rid] = granted - back
                inbox = inboxes.get(rec.rid)
                if inbox is not None:
                    inbox.granted_total -= back
                    inbox.wanters.pop(stream, None)
                    inbox.grant()
        stream.kick()


async def propose_until_done(
    propose: Callable[[bytes], Awaitable[object]],
    command: bytes,
    what: str,
    settings: DataPlaneSettings,
    rng: random.Random,
) -> None:
    """Propose a Registry command until it commits; the caller bounds the time.

    For idempotent commands only: one whose outcome is unknown (the leader
    died after it was sent) or that was dropped is proposed again, after a
    growing pause (``retry_backoff_min`` to ``retry_backoff_max``).
    """
    backoff = settings.retry_backoff_min
    while True:
        try:
            await propose(command)
        except Exception as exc:
            logger.info("proposing %s failed, retrying: %r", what, exc)
            await trio.sleep(backoff * (0.5 + rng.random()))
            backoff = min(backoff * 2, settings.retry_backoff_max)
        else:
            return


#: Stands for a message of a batch that did not decode.
_UNDECODABLE: Any = object()


def _decode_each(
    peer: NodeId, rid: str, payload: bytes | memoryview, count: int, exc: Exception
) -> list[Any] | None:
    """Decode a refused batch message by message: one bad message fails alone.

    Returns the values with :data:`_UNDECODABLE` in place of each message
    that does not decode, or None when the batch's framing itself is broken
    (then every message in it fails).
    """
    try:
        parts = codec.split_batch(payload)
    except Exception as broken:
        logger.warning("undecodable batch from %s for %s: %s", peer, rid, broken)
        return None
    if len(parts) != count:
        logger.warning(
            "batch from %s for %s holds %d messages, its header says %d",
            peer,
            rid,
            len(parts),
            count,
        )
        return None
    values: list[Any] = []
    bad = 0
    for part in parts:
        try:
            values.append(codec.decode(part))
        except Exception:
            values.append(_UNDECODABLE)
            bad += 1
    if bad:
        logger.warning(
            "%d of %d messages from %s for %s do not decode, refused: %s",
            bad,
            count,
            peer,
            rid,
            exc,
        )
    return values


def _check_namespace(namespace: str) -> None:
    if not isinstance(namespace, str) or not namespace:
        raise ValueError("a namespace is a non-empty string")
