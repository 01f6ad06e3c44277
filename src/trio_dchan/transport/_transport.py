"""The gRPC transport of a node: one grpclib server, one grpclib channel per peer.

grpclib runs on asyncio; the node runs it through trio-asyncio. All decisions
are made in Trio tasks; the asyncio side (:mod:`._grpc`) is a thin shell that
Trio calls once per batch or call. Data-plane frames skip asyncio when grpclib
need not wait (room in the HTTP/2 window, bytes already buffered): see
``_LinkBase``. See ``docs/transport.md``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.client import Stream as ClientStream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol
from grpclib.server import Server
from h2.exceptions import ProtocolError as H2ProtocolError

from trio_dchan._proto.dchan import v1 as pb
from trio_dchan.errors import DchanError
from trio_dchan.raft.transport import Proposal, ProposalKind, RaftHandler, Unavailable
from trio_dchan.raft.types import ConfChange, ConfChangeType, Message, MessageType, NodeId

from . import _grpc
from ._errors_wire import decode_result, encode_result, error_from_pb, error_to_pb
from ._wire import batch_from_pb, message_from_pb, message_to_pb
from .errors import CallRefused, MessageTooLarge, PeerProtocolError, TransportError

__all__ = [
    "DataLinkHandler",
    "GrpcTransport",
    "NodeStatus",
    "TransportSettings",
    "open_transport",
]

log = logging.getLogger("trio_dchan.transport")

_RAFT_STREAM = "/dchan.v1.Raft/Stream"
_RAFT_SNAPSHOT = "/dchan.v1.Raft/InstallSnapshot"
_PROPOSE = "/dchan.v1.Cluster/Propose"
_JOIN = "/dchan.v1.Cluster/Join"
_LEAVE = "/dchan.v1.Cluster/Leave"
_STATUS = "/dchan.v1.Cluster/Status"
_DATA_STREAM = "/dchan.v1.DataPlane/Stream"

# Errors that mean "the peer or the connection failed", as opposed to a bug.
_LINK_ERRORS = (
    OSError,
    GRPCError,
    StreamTerminatedError,
    ProtocolError,
    H2ProtocolError,
    TimeoutError,
    TransportError,
    trio.TooSlowError,
)


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """Every knob of the transport; the defaults suit a LAN cluster."""

    #: Largest gRPC message accepted from a peer, and sent to one (bytes).
    max_message_bytes: int = 4 * 1024 * 1024
    #: Raft messages queued per peer before ``send`` starts dropping.
    outbound_queue: int = 4096
    #: Most Raft messages in one stream message.
    max_batch_messages: int = 512
    #: Deadline of a forwarded proposal (the node bounds it further).
    forward_timeout: float = 10.0
    #: Deadline of the other unary calls (join, leave, status).
    call_timeout: float = 5.0
    #: A single stream write that takes longer fails the stream.
    send_timeout: float = 5.0
    #: Deadline of the long-lived Raft streams; the pump replaces a stream
    #: after half of it, so the deadline never cuts a healthy stream.
    stream_lifetime: float = 600.0
    #: Deadline of a data-plane stream opened with ``open_link``.
    data_stream_lifetime: float = 24 * 3600.0
    #: How long ``DataLink.aclose`` waits for the peer to finish before resetting.
    close_timeout: float = 2.0
    #: Reconnection backoff: first delay, cap, and the exponential factor.
    backoff_initial: float = 0.02
    backoff_max: float = 1.0
    backoff_factor: float = 2.0
    #: HTTP/2 keepalive ping interval (detects silently dead connections).
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 10.0
    #: HTTP/2 flow-control window of each connection and stream, in bytes:
    #: how much a peer may send before this node has read it. The data
    #: plane keeps several frames of up to ``max_message_bytes`` on their way
    #: (its credit decides how many); a smaller window throttles them.
    flow_control_window: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise ValueError("max_message_bytes must be at least 1024")
        if not 65_535 <= self.flow_control_window <= 2**31 - 1:
            raise ValueError("flow_control_window must be between 65535 and 2**31 - 1")
        if self.outbound_queue < 1 or self.max_batch_messages < 1:
            raise ValueError("outbound_queue and max_batch_messages must be positive")
        for name in (
            "forward_timeout",
            "call_timeout",
            "send_timeout",
            "stream_lifetime",
            "data_stream_lifetime",
            "close_timeout",
            "backoff_initial",
            "backoff_max",
            "keepalive_interval",
            "keepalive_timeout",
        ):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds")
        if self.backoff_factor < 1:
            raise ValueError("backoff_factor must be >= 1")


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What ``Cluster.Status`` reports about a node."""

    node_id: NodeId
    role: str
    term: int
    leader: NodeId | None
    commit_index: int
    applied_index: int
    voters: frozenset[NodeId] = frozenset()
    learners: frozenset[NodeId] = frozenset()


class DataLinkHandler:  # pragma: no cover - documentation of the expected shape
    """Shape of the data-plane handler (``trio_dchan.dataplane.link.DataPlaneHandler``)."""

    async def serve_stream(self, peer: NodeId, link: Any) -> None: ...


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not of the form host:port")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"address {address!r}: the port must be between 0 and 65535")
    return host.strip("[]"), int(port)


def _ascii(value: str, what: str) -> str:
    if not value or not value.isascii() or not value.isprintable():
        raise ValueError(f"{what} must be a non-empty printable ASCII string, not {value!r}")
    return value


@dataclass(eq=False)
class _Peer:
    node_id: NodeId
    address: str
    raft_send: trio.MemorySendChannel[Message]
    raft_recv: trio.MemoryReceiveChannel[Message]
    snap_send: trio.MemorySendChannel[Message]
    snap_recv: trio.MemoryReceiveChannel[Message]
    channel: Channel | None = None
    pumps_started: bool = False
    failures: int = 0
    dropped: int = 0
    sent: int = 0
    snapshot_chunks: int = 0
    closed: bool = False
    retry_at: float = 0.0
    #: Set (and replaced) when the peer shows it is back before ``retry_at``:
    #: the pumps waiting out the backoff retry at once.
    revived: trio.Event = field(default_factory=trio.Event)
    #: The early retry of the current run of failures was used.
    revival_used: bool = False
    links: set[_ClientLink] = field(default_factory=set)


class _LinkBase:
    """Shared part of the data-plane link ends over a grpclib stream."""

    def __init__(self, stream: Any, *, peer: NodeId, limit: int, loop: Any) -> None:
        self._loop = loop
        self._stream = stream
        self._peer = peer
        self._limit = limit
        self._send_busy = False
        self._recv_busy = False
        self._broken: BaseException | None = None
        self._closed = False
        self._remote_ended = False

    def _aio(self, fn: Callable[..., Any]) -> Any:
        return trio_asyncio.aio_as_trio(fn, loop=self._loop)

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the data link was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"the data link to {self._peer} is broken") from (
                self._broken
            )

    async def send_frame(self, frame: bytes | memoryview | list[bytes]) -> None:
        if isinstance(frame, memoryview):
            frame = frame.tobytes()
        self._check()
        size = len(frame) if isinstance(frame, bytes) else sum(map(len, frame))
        if size + 16 > self._limit:
            raise MessageTooLarge(size, self._limit - 16)
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this data link")
        self._send_busy = True
        try:
            head = _grpc.data_frame_head(size)
            pieces = [head, frame] if isinstance(frame, bytes) else [head, *frame]
            await trio.lowlevel.checkpoint_if_cancelled()
            if _grpc.send_now(self._stream, pieces, len(head) + size):
                await trio.lowlevel.cancel_shielded_checkpoint()
            else:
                payload = frame if isinstance(frame, bytes) else b"".join(frame)
                await self._aio(_grpc.send)(self._stream, pb.DataFrame(payload=payload))
        except trio.Cancelled:
            await self._break(ConnectionAbortedError("send cancelled mid-frame"))
            raise
        except _LINK_ERRORS as exc:
            await self._break(exc)
            raise trio.BrokenResourceError(f"the data link to {self._peer} broke") from exc
        except asyncio.CancelledError as exc:
            # The transport closed its event loop under a wait on it.
            self._broken = exc
            raise trio.BrokenResourceError(f"the transport of {self._peer} closed") from exc
        finally:
            self._send_busy = False

    async def receive_frame(self) -> bytes | memoryview:
        if self._remote_ended:
            raise trio.EndOfChannel
        self._check()
        if self._recv_busy:
            raise trio.BusyResourceError("another task is receiving on this data link")
        self._recv_busy = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            payload = await self._read_frame()
        except trio.Cancelled:
            await self._break(ConnectionAbortedError("receive cancelled mid-frame"))
            raise
        except _LINK_ERRORS as exc:
            await self._break(exc)
            raise trio.BrokenResourceError(f"the data link to {self._peer} broke") from exc
        except asyncio.CancelledError as exc:
            # The transport closed its event loop under a wait on it.
            self._broken = exc
            raise trio.BrokenResourceError(f"the transport of {self._peer} closed") from exc
        finally:
            self._recv_busy = False
        if payload is None:
            await self._on_remote_end()
            raise trio.EndOfChannel
        return payload

    async def _read_frame(self) -> bytes | memoryview | None:
        # Bytes grpclib already holds are taken without a trip through
        # asyncio; only a wait for more crosses over.
        waited = False
        prefix = _grpc.read_now(self._stream, 5)
        while prefix is None:
            waited = True
            waiter = _grpc.data_waiter(self._stream, trio.lowlevel.current_task())
            if waiter is None:
                prefix = await self._aio(_grpc.read_data)(self._stream, 5)
                break
            try:
                # Woken by bytes or by the stream failing (the ordinary read
                # below then reports how).
                await trio.lowlevel.wait_task_rescheduled(waiter.abort)
            finally:
                _grpc.drop_waiter(self._stream, waiter)
            prefix = _grpc.read_now(self._stream, 5)
        if not prefix:
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return None
        size = _grpc.parse_prefix(prefix, self._limit)
        body: bytes | memoryview | None = b""
        if size:
            body = _grpc.take_view(self._stream, size)
            if body is None:
                body = _grpc.read_now(self._stream, size)
        if body is None:
            waited = True
            body = await self._aio(_grpc.read_data)(self._stream, size)
        if len(body) != size:
            raise PeerProtocolError("truncated gRPC message")
        payload = _grpc.decode_data_frame(body, pb.DataFrame)
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return payload

    async def _on_remote_end(self) -> None:
        self._remote_ended = True

    async def _break(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc
            if self._reset_on(exc):
                with trio.CancelScope(shield=True):
                    await self._reset()

    def _reset_on(self, exc: BaseException) -> bool:
        return True

    async def _reset(self) -> None:
        raise NotImplementedError


class _ServerLink(_LinkBase):
    """The receiving node's end of a data-plane stream."""

    async def _reset(self) -> None:
        await self._aio(_grpc.cancel_server_stream)(self._stream)

    def _reset_on(self, exc: BaseException) -> bool:
        # Bad input from the peer is answered with a status once the handler
        # returns; only a broken or abandoned stream is reset.
        return not isinstance(exc, MessageTooLarge | PeerProtocolError)

    async def aclose(self) -> None:
        # Returning from the handler ends the call with the trailers.
        self._closed = True
        await trio.lowlevel.checkpoint()


class _ClientLink(_LinkBase):
    """The sending node's end of a data-plane stream, made by ``open_link``."""

    def __init__(
        self, stream: Any, *, peer: _Peer, limit: int, close_timeout: float, loop: Any
    ) -> None:
        super().__init__(stream, peer=peer.node_id, limit=limit, loop=loop)
        self._owner = peer
        self._close_timeout = close_timeout
        self._ended = False
        self._finished = False

    async def _on_remote_end(self) -> None:
        self._remote_ended = True
        # The server finished: its trailers say whether it refused the stream.
        try:
            if not self._ended:
                self._ended = True
                await self._aio(_grpc.end)(self._stream)
            self._finished = True
            await self._aio(_grpc.finish_bidi_stream)(self._stream)
        except trio.Cancelled:
            raise
        except _LINK_ERRORS as exc:
            self._broken = exc
            raise trio.BrokenResourceError(f"peer {self._peer} failed the data link") from exc
        finally:
            self._owner.links.discard(self)

    async def _reset(self) -> None:
        self._owner.links.discard(self)
        if not self._finished:
            self._finished = True
            await self._aio(_grpc.abort)(self._stream)

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        self._owner.links.discard(self)
        if self._finished or self._broken is not None:
            await trio.lowlevel.checkpoint()
            return
        clean = False
        try:
            with trio.move_on_after(self._close_timeout) as scope:
                scope.shield = True
                try:
                    if not self._ended:
                        self._ended = True
                        await self._aio(_grpc.end)(self._stream)
                    # Drain whatever the peer still sends, then read its trailers.
                    while not self._remote_ended:
                        frame = await self._aio(_grpc.recv_limited)(
                            self._stream, pb.DataFrame, self._limit
                        )
                        if frame is None:
                            self._remote_ended = True
                    self._finished = True
                    await self._aio(_grpc.finish_bidi_stream)(self._stream)
                    clean = True
                except _LINK_ERRORS:
                    pass
        finally:
            if not clean:
                self._finished = True
                with trio.CancelScope(shield=True):
                    await self._aio(_grpc.abort)(self._stream)


class GrpcTransport:
    """A node's gRPC endpoint; implements :class:`~trio_dchan.raft.transport.RaftTransport`.

    Made by :func:`open_transport`, which owns its tasks. ``send`` queues Raft
    messages per peer (bounded; a full queue drops, Raft retries); a pump
    task per peer batches them onto one long-lived stream. ``forward`` is a
    unary call with a deadline. ``open_link`` opens a data-plane stream.
    """

    def __init__(
        self,
        node_id: NodeId,
        *,
        cluster_id: str,
        settings: TransportSettings,
        peers: Mapping[NodeId, str],
        ssl_context: ssl.SSLContext | None,
        client_ssl_context: ssl.SSLContext | None,
        rng: random.Random,
        is_member: Callable[[NodeId], bool],
    ) -> None:
        self.node_id = _ascii(node_id, "node id")
        self.cluster_id = _ascii(cluster_id, "cluster id")
        self.settings = settings
        self._server_ssl = ssl_context
        self._client_ssl = client_ssl_context
        self._rng = rng
        self._is_member = is_member
        self._peers: dict[NodeId, _Peer] = {}
        self._addresses: dict[NodeId, str] = {}
        for peer_id, address in peers.items():
            if peer_id != node_id:
                self.add_peer(peer_id, address)
        self._metadata = {"cluster-id": self.cluster_id, "node-id": self.node_id}
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self.port: int = 0
        #: Calls refused by this node's server, by reason: ``cluster``, ``node``,
        #: ``size``, ``input``.
        self.refused: dict[str, int] = {}
        self._refused_changed = trio.Event()
        self._service = _Service(self, None, None, None)
        self._loop: Any = None
        #: Errors asyncio reported through its exception handler (leaks); 0 when healthy.
        self.asyncio_errors = 0
        self._server: _TrackingServer | None = None

    def _asyncio_error(self, loop: Any, context: dict[str, Any]) -> None:
        self.asyncio_errors += 1
        log.error(
            "%s: asyncio reported: %s",
            self.node_id,
            context.get("message", "unhandled error"),
            exc_info=context.get("exception"),
        )

    def _aio(self, fn: Callable[..., Any]) -> Any:
        """``fn`` (an asyncio coroutine function) made callable from Trio, on our loop."""
        return trio_asyncio.aio_as_trio(fn, loop=self._loop)

    def attach(
        self,
        *,
        raft_handler: RaftHandler | None = None,
        data_handler: Any | None = None,
        status: Callable[[], NodeStatus] | None = None,
    ) -> GrpcTransport:
        """Set the handlers of inbound traffic (those given); returns the transport.

        Lets the Raft node be built after the transport:
        ``open_raft_node(..., transport_factory=lambda n: transport.attach(raft_handler=n))``.
        """
        if raft_handler is not None:
            self._service._raft = raft_handler
        if data_handler is not None:
            self._service._data = data_handler
        if status is not None:
            self._service._status = status
        return self

    def set_is_member(self, is_member: Callable[[NodeId], bool]) -> None:
        """Replace the membership check (e.g. once the Registry exists)."""
        self._is_member = is_member

    # ------------------------------------------------------------ peers --

    def add_peer(self, node_id: NodeId, address: str) -> None:
        """Learn (or update) the address of a peer."""
        _split_address(address)
        _ascii(node_id, "node id")
        old = self._addresses.get(node_id)
        self._addresses[node_id] = address
        peer = self._peers.get(node_id)
        if peer is not None and old != address:
            self._drop_channel(peer)
            peer.address = address

    def remove_peer(self, node_id: NodeId) -> None:
        """Forget a peer: stop its pumps and close its connection."""
        self._addresses.pop(node_id, None)
        peer = self._peers.pop(node_id, None)
        if peer is not None:
            peer.closed = True
            peer.raft_send.close()
            peer.snap_send.close()
            self._drop_channel(peer)

    def _peer(self, node_id: NodeId) -> _Peer:
        peer = self._peers.get(node_id)
        if peer is not None:
            return peer
        address = self._addresses.get(node_id)
        if address is None:
            # Node ids are advertised addresses unless told otherwise.
            _split_address(node_id)
            address = node_id
            self._addresses[node_id] = address
        raft_send, raft_recv = trio.open_memory_channel[Message](self.settings.outbound_queue)
        snap_send, snap_recv = trio.open_memory_channel[Message](64)
        peer = _Peer(node_id, address, raft_send, raft_recv, snap_send, snap_recv)
        self._peers[node_id] = peer
        return peer

    async def _channel(self, peer: _Peer) -> Channel:
        if peer.channel is None:
            host, port = _split_address(peer.address)
            config = Configuration(
                _keepalive_time=self.settings.keepalive_interval,
                _keepalive_timeout=self.settings.keepalive_timeout,
                _keepalive_permit_without_calls=True,
                http2_connection_window_size=self.settings.flow_control_window,
                http2_stream_window_size=self.settings.flow_control_window,
            )
            channel = await self._aio(_grpc.make_channel)(
                host, port, ssl=self._client_ssl, config=config
            )
            # Another task may have made one meanwhile: keep a single channel per
            # peer (an unused Channel holds no connection and needs no close).
            if peer.channel is None:
                peer.channel = channel
        return peer.channel

    def _drop_channel(self, peer: _Peer) -> None:
        channel, peer.channel = peer.channel, None
        if channel is not None:
            channel.close()

    def _backoff(self, peer: _Peer) -> None:
        """Record a failure to reach ``peer`` and schedule the next attempt."""
        peer.failures += 1
        s = self.settings
        try:
            delay = min(s.backoff_max, s.backoff_initial * s.backoff_factor ** (peer.failures - 1))
        except OverflowError:  # a peer down for a long time: thousands of failures
            delay = s.backoff_max
        peer.retry_at = trio.current_time() + delay * self._rng.uniform(0.5, 1.0)

    def _reached(self, peer: _Peer) -> None:
        """A call to ``peer`` went through: its backoff is over."""
        if peer.failures or peer.retry_at:
            peer.failures = 0
            peer.revival_used = False
            self._revive(peer)

    def _heard_from(self, node_id: NodeId) -> None:
        """``node_id`` called this node: if we are backing off from it, retry now.

        A restarted peer calls its peers as soon as it runs (Raft votes and
        replies), usually well before our backoff to it ends. Only the
        first sign of life in a run of failures cuts the backoff short: a
        peer that reaches us while we cannot reach it (a wrong address,
        say) costs one extra attempt, not one per call it makes.
        """
        peer = self._peers.get(node_id)
        if peer is None or not peer.failures or peer.revival_used:
            return
        peer.revival_used = True
        self._revive(peer)

    def _revive(self, peer: _Peer) -> None:
        peer.retry_at = 0.0
        peer.revived.set()
        peer.revived = trio.Event()

    # ------------------------------------------------------ raft traffic --

    def send(self, messages: Sequence[Message]) -> None:
        """Queue Raft messages for their peers; never blocks, drops when a queue is full."""
        for m in messages:
            if m.to == self.node_id or self._closing:
                continue
            try:
                peer = self._peer(m.to)
            except ValueError:
                log.warning("dropping raft message for %r: no known address", m.to)
                continue
            if peer.closed:
                continue
            if not peer.pumps_started and self._nursery is not None:
                peer.pumps_started = True
                self._nursery.start_soon(self._raft_pump, peer)
                self._nursery.start_soon(self._snapshot_pump, peer)
            lane = peer.snap_send if m.type is MessageType.SNAPSHOT else peer.raft_send
            try:
                lane.send_nowait(m)
            except (trio.WouldBlock, trio.ClosedResourceError):
                peer.dropped += 1

    async def _open(
        self, peer: _Peer, path: str, send_type: type, recv_type: type, lifetime: float
    ) -> ClientStream[Any, Any]:
        channel = await self._channel(peer)
        stream: ClientStream[Any, Any] = channel.request(
            path,
            Cardinality.STREAM_UNARY if path != _DATA_STREAM else Cardinality.STREAM_STREAM,
            send_type,
            recv_type,
            timeout=lifetime,
            metadata=self._metadata,
        )
        try:
            with trio.fail_after(self.settings.send_timeout):
                await self._aio(_grpc.open_stream)(stream)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._aio(_grpc.abort)(stream)
            raise
        return stream

    async def _wait_retry(self, peer: _Peer) -> None:
        """Wait out the backoff of ``peer``, or until it shows it is back.

        Failures noticed meanwhile (calls to the peer failing) do not
        postpone the attempt: they only make the next wait longer.
        """
        with trio.move_on_at(peer.retry_at):
            await peer.revived.wait()

    def _drain(self, recv: trio.MemoryReceiveChannel[Message], batch: list[Message]) -> None:
        limit = self.settings.max_batch_messages
        budget = self.settings.max_message_bytes // 2
        size = sum(_estimate(m) for m in batch)
        while len(batch) < limit and size < budget:
            try:
                m = recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            batch.append(m)
            size += _estimate(m)

    def _to_batch(self, peer: _Peer, batch: list[Message]) -> pb.RaftBatch:
        out = pb.RaftBatch(messages=[])
        for m in batch:
            if _estimate(m) > self.settings.max_message_bytes - 1024:
                peer.dropped += 1
                log.warning(
                    "dropping a %s message to %s larger than max_message_bytes",
                    m.type.name,
                    peer.node_id,
                )
                continue
            out.messages.append(message_to_pb(m))
        return out

    async def _raft_pump(self, peer: _Peer) -> None:
        """Move ``peer``'s queued Raft messages onto one long-lived stream.

        A batch whose send failed is retried once on the next stream (it
        certainly did not arrive); messages queued while the peer was
        unreachable are dropped, since Raft resends what still matters.
        """
        s = self.settings
        recv = peer.raft_recv
        pending: list[Message] = []
        retried = False
        while True:
            if not pending:
                try:
                    pending.append(await recv.receive())
                except trio.EndOfChannel:
                    return
            await self._wait_retry(peer)
            stream: ClientStream[Any, Any] | None = None
            try:
                stream = await self._open(
                    peer, _RAFT_STREAM, pb.RaftBatch, pb.StreamSummary, s.stream_lifetime
                )
                broken: list[BaseException] = []
                async with trio.open_nursery() as nursery:
                    # The peer may end the stream at any time (refusal, restart):
                    # notice it at once rather than on the next send.
                    nursery.start_soon(self._watch, stream, nursery.cancel_scope, broken)
                    try:
                        await self._pump_stream(peer, stream, pending)
                    except _LINK_ERRORS as exc:
                        broken.append(exc)
                    nursery.cancel_scope.cancel()
                if broken:
                    raise broken[0]
                retried = False
                # Stream too old (or the peer was removed): finish it cleanly.
                with trio.fail_after(s.send_timeout):
                    await self._aio(_grpc.finish_client_stream)(
                        stream, pb.StreamSummary, s.max_message_bytes
                    )
                stream = None
            except _LINK_ERRORS as exc:
                self._log_link_failure(peer, "raft stream", exc)
                self._backoff(peer)
                while True:
                    try:
                        recv.receive_nowait()
                        peer.dropped += 1
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if retried:
                    peer.dropped += len(pending)
                    pending.clear()
                retried = bool(pending)
            finally:
                if stream is not None:
                    with trio.CancelScope(shield=True):
                        await self._aio(_grpc.abort)(stream)

    async def _pump_stream(
        self, peer: _Peer, stream: ClientStream[Any, Any], pending: list[Message]
    ) -> None:
        """Send batches on ``stream`` until it is due for replacement.

        ``pending`` holds the messages not yet handed to grpclib; it is empty
        when this returns normally.
        """
        s = self.settings
        recv = peer.raft_recv
        rotate_at = trio.current_time() + s.stream_lifetime / 2
        while True:
            self._drain(recv, pending)
            batch = self._to_batch(peer, pending)
            if batch.messages:
                # Written at once when grpclib could (no trip through asyncio);
                # the next receive() is this loop's checkpoint.
                if not _grpc.send_message_now(stream, batch):
                    with trio.fail_after(s.send_timeout):
                        await self._aio(_grpc.send)(stream, batch)
                peer.sent += len(batch.messages)
                self._reached(peer)
            pending.clear()
            with trio.move_on_at(rotate_at):
                try:
                    pending.append(await recv.receive())
                except trio.EndOfChannel:
                    return
                continue
            return

    async def _watch(
        self, stream: ClientStream[Any, Any], scope: trio.CancelScope, broken: list[BaseException]
    ) -> None:
        try:
            await self._aio(_grpc.watch)(stream)
        except _LINK_ERRORS as exc:
            broken.append(exc)
            scope.cancel()

    async def _snapshot_pump(self, peer: _Peer) -> None:
        """Send snapshot chunks on InstallSnapshot streams, one stream per transfer."""
        s = self.settings
        recv = peer.snap_recv
        pending: Message | None = None
        while True:
            if pending is None:
                try:
                    pending = await recv.receive()
                except trio.EndOfChannel:
                    return
            await self._wait_retry(peer)
            stream: ClientStream[Any, Any] | None = None
            try:
                stream = await self._open(
                    peer, _RAFT_SNAPSHOT, pb.RaftMessage, pb.SnapshotAck, s.stream_lifetime
                )
                while pending is not None:
                    chunk = self._to_batch(peer, [pending])
                    last = pending.snapshot_done
                    pending = None
                    for item in chunk.messages:
                        with trio.fail_after(s.send_timeout):
                            await self._aio(_grpc.send)(stream, item)
                        peer.snapshot_chunks += 1
                    if last:
                        break
                    # The leader sends the next chunk once the follower answered.
                    with trio.move_on_after(s.send_timeout):
                        try:
                            pending = await recv.receive()
                        except trio.EndOfChannel:
                            break
                        if pending.snapshot_offset == 0:
                            break  # a new transfer starts: new stream
                with trio.fail_after(s.send_timeout):
                    await self._aio(_grpc.finish_client_stream)(
                        stream, pb.SnapshotAck, s.max_message_bytes
                    )
                stream = None
                self._reached(peer)
            except _LINK_ERRORS as exc:
                self._log_link_failure(peer, "snapshot stream", exc)
                self._backoff(peer)
                pending = None
            finally:
                if stream is not None:
                    with trio.CancelScope(shield=True):
                        await self._aio(_grpc.abort)(stream)

    def _log_link_failure(self, peer: _Peer, what: str, exc: BaseException) -> None:
        if isinstance(exc, GRPCError) and exc.status in (
            Status.PERMISSION_DENIED,
            Status.INVALID_ARGUMENT,
            Status.RESOURCE_EXHAUSTED,
        ):
            log.warning("%s: peer %s refused the %s: %s", self.node_id, peer.node_id, what, exc)
        else:
            log.debug("%s: %s to %s failed: %r", self.node_id, what, peer.node_id, exc)

    # ----------------------------------------------------- unary calls --

    async def _unary(
        self, to: NodeId, path: str, request: Any, reply_type: type, deadline_s: float
    ) -> Any:
        if self._closing:
            raise Unavailable(to, "the transport is closed")
        try:
            peer = self._peer(to)
        except ValueError:
            raise Unavailable(to, "no known address") from None
        progress = [False]
        try:
            with trio.fail_after(deadline_s + 1.0):
                reply = await self._aio(_grpc.unary)(
                    await self._channel(peer),
                    path,
                    request,
                    reply_type,
                    deadline_s=deadline_s,
                    metadata=self._metadata,
                    limit=self.settings.max_message_bytes,
                    progress=progress,
                )
        except GRPCError as exc:
            if exc.status in (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED, Status.CANCELLED):
                raise Unavailable(
                    to, f"{exc.status.name}: {exc.message}", maybe_delivered=progress[0]
                ) from exc
            raise CallRefused(to, exc.status.name, exc.message) from exc
        except PeerProtocolError:
            raise
        except _LINK_ERRORS as exc:
            if not progress[0]:
                self._backoff(peer)
            raise Unavailable(to, repr(exc), maybe_delivered=progress[0]) from exc
        self._reached(peer)
        return reply

    async def forward(self, to: NodeId, proposal: Proposal) -> object:
        """Run ``proposal`` on node ``to``; errors keep their type (``NotLeader.leader``...)."""
        request = pb.ProposeRequest(
            kind=pb.ProposalKind(int(proposal.kind)), data=proposal.data, target=proposal.target
        )
        reply = await self._unary(
            to, _PROPOSE, request, pb.ProposeReply, self.settings.forward_timeout
        )
        return self._outcome(to, reply.result, reply.error)

    def _outcome(self, to: NodeId, result: bytes | None, error: pb.RemoteError | None) -> object:
        if error is not None:
            raise error_from_pb(to, error)
        if result is None:
            raise PeerProtocolError(f"reply from {to} holds neither a result nor an error")
        return decode_result(to, result)

    async def join(self, to: NodeId, address: str, *, learner: bool = False) -> object:
        """Ask node ``to`` (the leader) to add this node; returns the apply result."""
        reply = await self._unary(
            to,
            _JOIN,
            pb.JoinRequest(address=address, learner=learner),
            pb.MembershipReply,
            self.settings.call_timeout,
        )
        return self._outcome(to, reply.result, reply.error)

    async def leave(self, to: NodeId, node_id: NodeId | None = None) -> object:
        """Ask node ``to`` (the leader) to remove ``node_id`` (default: this node)."""
        reply = await self._unary(
            to,
            _LEAVE,
            pb.LeaveRequest(node_id=node_id or ""),
            pb.MembershipReply,
            self.settings.call_timeout,
        )
        return self._outcome(to, reply.result, reply.error)

    async def status(self, to: NodeId) -> NodeStatus:
        """Ask node ``to`` for its Raft status."""
        reply = await self._unary(
            to, _STATUS, pb.StatusRequest(), pb.StatusReply, self.settings.call_timeout
        )
        return NodeStatus(
            node_id=reply.node_id,
            role=reply.role,
            term=reply.term,
            leader=reply.leader,
            commit_index=reply.commit_index,
            applied_index=reply.applied_index,
            voters=frozenset(reply.voters),
            learners=frozenset(reply.learners),
        )

    # -------------------------------------------------------- data plane --

    async def open_link(self, peer_id: NodeId) -> _ClientLink:
        """Open a data-plane stream to ``peer_id``; returns its ``DataLink`` end.

        Raises :class:`~trio_dchan.raft.transport.Unavailable` when the peer
        cannot be reached. A stream the peer refuses (another cluster, not a
        member) fails on first use with :class:`trio.BrokenResourceError`
        whose cause is a :class:`CallRefused`-like gRPC error.
        """
        if self._closing:
            raise Unavailable(peer_id, "the transport is closed")
        try:
            peer = self._peer(peer_id)
        except ValueError:
            raise Unavailable(peer_id, "no known address") from None
        try:
            stream = await self._open(
                peer, _DATA_STREAM, pb.DataFrame, pb.DataFrame, self.settings.data_stream_lifetime
            )
        except _LINK_ERRORS as exc:
            self._backoff(peer)
            raise Unavailable(peer_id, repr(exc)) from exc
        self._reached(peer)
        link = _ClientLink(
            stream,
            peer=peer,
            limit=self.settings.max_message_bytes,
            close_timeout=self.settings.close_timeout,
            loop=self._loop,
        )
        peer.links.add(link)
        return link

    # -------------------------------------------------------- statistics --

    def _count_refusal(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self._refused_changed.set()
        self._refused_changed = trio.Event()

    async def wait_refused(self, reason: str, count: int) -> None:
        """Wait until this node refused at least ``count`` calls for ``reason``."""
        while self.refused.get(reason, 0) < count:
            await self._refused_changed.wait()

    def statistics(self) -> dict[NodeId, dict[str, int]]:
        """Per peer: Raft messages and snapshot chunks sent, dropped, consecutive failures."""
        return {
            p.node_id: {
                "sent": p.sent,
                "snapshot_chunks": p.snapshot_chunks,
                "dropped": p.dropped,
                "failures": p.failures,
            }
            for p in self._peers.values()
        }

    async def _shutdown_clients(self) -> None:
        """Close open data links (all together, within ``close_timeout``), then channels.

        Closing a channel closes its connection, which ends whatever stream
        was still open on it.
        """
        self._closing = True
        links = [link for peer in self._peers.values() for link in peer.links]
        if links:
            with trio.move_on_after(self.settings.close_timeout):
                async with trio.open_nursery() as nursery:
                    for link in links:
                        nursery.start_soon(link.aclose)
        for peer in list(self._peers.values()):
            peer.closed = True
            peer.raft_send.close()
            peer.snap_send.close()
            self._drop_channel(peer)


def _estimate(m: Message) -> int:
    size = 64 + len(m.snapshot_data) + len(m.context)
    for e in m.entries:
        size += 21 + len(e.data)
    return size


class _Service:
    """The server side: grpclib handlers that hand every call to a Trio function."""

    def __init__(
        self,
        transport: GrpcTransport,
        raft: RaftHandler | None,
        data: Any | None,
        status: Callable[[], NodeStatus] | None,
    ) -> None:
        self._t = transport
        self._raft = raft
        self._data = data
        self._status = status

    def __mapping__(self) -> dict[str, Handler]:
        c = Cardinality
        return {
            _RAFT_STREAM: Handler(
                self._wrap(self._raft_stream, on_asyncio=True),
                c.STREAM_UNARY,
                pb.RaftBatch,
                pb.StreamSummary,
            ),
            _RAFT_SNAPSHOT: Handler(
                self._wrap(self._raft_snapshot), c.STREAM_UNARY, pb.RaftMessage, pb.SnapshotAck
            ),
            _PROPOSE: Handler(
                self._wrap(self._propose), c.UNARY_UNARY, pb.ProposeRequest, pb.ProposeReply
            ),
            _JOIN: Handler(
                self._wrap(self._join, members_only=False),
                c.UNARY_UNARY,
                pb.JoinRequest,
                pb.MembershipReply,
            ),
            _LEAVE: Handler(
                self._wrap(self._leave), c.UNARY_UNARY, pb.LeaveRequest, pb.MembershipReply
            ),
            _STATUS: Handler(
                self._wrap(self._status_call), c.UNARY_UNARY, pb.StatusRequest, pb.StatusReply
            ),
            _DATA_STREAM: Handler(
                self._wrap(self._data_stream), c.STREAM_STREAM, pb.DataFrame, pb.DataFrame
            ),
        }

    def _refuse(self, stream: Any, reason: str, message: str) -> NoReturn:
        t = self._t
        t._count_refusal(reason)
        peer = stream.peer.addr() if stream.peer is not None else None
        log.warning("%s refused a call from %s: %s", t.node_id, peer, message)
        raise GRPCError(Status.PERMISSION_DENIED, message)

    def _wrap(
        self,
        fn: Callable[[Any, NodeId], Any],
        *,
        members_only: bool = True,
        on_asyncio: bool = False,
    ) -> Any:
        t0 = self._t
        trio_fn = fn if on_asyncio else trio_asyncio.trio_as_aio(fn, loop=t0._loop)

        async def handler(stream: Any) -> None:
            # Runs on asyncio: authenticate, then hand the call to Trio.
            metadata = stream.metadata or {}
            cluster = metadata.get("cluster-id")
            caller = metadata.get("node-id")
            t = self._t
            if cluster != t.cluster_id:
                self._refuse(
                    stream,
                    "cluster",
                    f"cluster id {cluster!r} does not match this node's cluster {t.cluster_id!r}",
                )
            if not isinstance(caller, str) or not caller:
                self._refuse(stream, "node", "the call carries no node-id")
            if members_only and not t._is_member(caller):
                self._refuse(stream, "node", f"node {caller!r} is not a member of the cluster")
            t._heard_from(caller)
            try:
                await trio_fn(stream, caller)
            except StreamTerminatedError:
                # The peer reset the stream or the connection dropped; grpclib
                # cancelled this handler and expects it to end as cancelled.
                raise asyncio.CancelledError() from None
            except MessageTooLarge as exc:
                t._count_refusal("size")
                log.warning("%s refused a message from %s: %s", t.node_id, caller, exc)
                raise GRPCError(Status.RESOURCE_EXHAUSTED, str(exc)) from None
            except (PeerProtocolError, DchanError) as exc:
                t._count_refusal("input")
                log.warning("%s refused bad input from %s: %s", t.node_id, caller, exc)
                raise GRPCError(Status.INVALID_ARGUMENT, str(exc)) from None

        return handler

    async def _recv(self, stream: Any, recv_type: type) -> Any:
        return await self._t._aio(_grpc.recv_limited)(
            stream, recv_type, self._t.settings.max_message_bytes
        )

    async def _reply(self, stream: Any, message: Any) -> None:
        await self._t._aio(_grpc.send)(stream, message)

    async def _raft_stream(self, stream: Any, caller: NodeId) -> None:
        """Runs on asyncio (the hot path: no crossing per batch).

        ``deliver`` only queues the message for the node's Trio task and wakes
        it; asyncio callbacks run inside Trio's run loop under trio-asyncio,
        so waking a Trio task from here is allowed.
        """
        raft = self._require_raft()
        me = self._t.node_id
        limit = self._t.settings.max_message_bytes
        received = 0
        while True:
            batch = await _grpc.recv_limited(stream, pb.RaftBatch, limit)
            if batch is None:
                break
            for m in batch_from_pb(batch, caller=caller, me=me):
                raft.deliver(m)
                received += 1
        await stream.send_message(pb.StreamSummary(received=received))

    async def _raft_snapshot(self, stream: Any, caller: NodeId) -> None:
        raft = self._require_raft()
        me = self._t.node_id
        chunks = 0
        while True:
            item = await self._recv(stream, pb.RaftMessage)
            if item is None:
                break
            m = message_from_pb(item)
            if m.type is not MessageType.SNAPSHOT:
                raise PeerProtocolError(f"{m.type.name} message on a snapshot stream")
            if m.sender != caller or m.to != me:
                raise PeerProtocolError("snapshot chunk with a wrong sender or recipient")
            raft.deliver(m)
            chunks += 1
        await self._reply(stream, pb.SnapshotAck(chunks=chunks))

    def _require_raft(self) -> RaftHandler:
        if self._raft is None:
            raise GRPCError(Status.UNIMPLEMENTED, "this node runs no raft handler")
        return self._raft

    async def _run_forward(self, proposal: Proposal) -> tuple[bytes | None, pb.RemoteError | None]:
        raft = self._require_raft()
        try:
            result = await raft.handle_forward(proposal)
        except DchanError as exc:
            return None, error_to_pb(exc)
        try:
            return encode_result(result), None
        except Exception as exc:
            log.exception("apply result %r cannot be encoded for a forwarded call", result)
            return None, error_to_pb(TransportError(f"unencodable apply result: {exc}"))

    async def _propose(self, stream: Any, caller: NodeId) -> None:
        request = await self._recv(stream, pb.ProposeRequest)
        if request is None:
            raise PeerProtocolError("empty propose request")
        try:
            kind = ProposalKind(int(request.kind))
        except ValueError:
            raise PeerProtocolError(f"unknown proposal kind {int(request.kind)}") from None
        proposal = Proposal(kind, request.data, request.target)
        result, error = await self._run_forward(proposal)
        await self._reply(stream, pb.ProposeReply(result=result, error=error))

    async def _join(self, stream: Any, caller: NodeId) -> None:
        request = await self._recv(stream, pb.JoinRequest)
        if request is None:
            raise PeerProtocolError("empty join request")
        try:
            _split_address(request.address)
        except ValueError as exc:
            raise PeerProtocolError(str(exc)) from None
        kind = ConfChangeType.ADD_LEARNER if request.learner else ConfChangeType.ADD_VOTER
        change = ConfChange(kind, caller, request.address.encode("utf-8"))
        result, error = await self._run_forward(
            Proposal(ProposalKind.CONF_CHANGE, change.encode())
        )
        await self._reply(stream, pb.MembershipReply(result=result, error=error))

    async def _leave(self, stream: Any, caller: NodeId) -> None:
        request = await self._recv(stream, pb.LeaveRequest)
        if request is None:
            raise PeerProtocolError("empty leave request")
        change = ConfChange(ConfChangeType.REMOVE_NODE, request.node_id or caller)
        result, error = await self._run_forward(
            Proposal(ProposalKind.CONF_CHANGE, change.encode())
        )
        await self._reply(stream, pb.MembershipReply(result=result, error=error))

    async def _status_call(self, stream: Any, caller: NodeId) -> None:
        request = await self._recv(stream, pb.StatusRequest)
        if request is None:
            raise PeerProtocolError("empty status request")
        if self._status is None:
            raise GRPCError(Status.UNIMPLEMENTED, "this node reports no status")
        st = self._status()
        await self._reply(
            stream,
            pb.StatusReply(
                node_id=st.node_id,
                role=st.role,
                term=st.term,
                leader=st.leader,
                commit_index=st.commit_index,
                applied_index=st.applied_index,
                voters=sorted(st.voters),
                learners=sorted(st.learners),
            ),
        )

    async def _data_stream(self, stream: Any, caller: NodeId) -> None:
        if self._data is None:
            raise GRPCError(Status.UNIMPLEMENTED, "this node runs no data plane")
        link = _ServerLink(
            stream, peer=caller, limit=self._t.settings.max_message_bytes, loop=self._t._loop
        )
        try:
            await self._data.serve_stream(caller, link)
        except trio.BrokenResourceError:
            if not isinstance(link._broken, MessageTooLarge | PeerProtocolError):
                raise
        finally:
            link._closed = True
        if isinstance(link._broken, MessageTooLarge | PeerProtocolError):
            # The handler gave up because the peer sent bad input: say why.
            raise link._broken


class _TrackingServer(Server):
    """A grpclib server that remembers its connections so shutdown can close them.

    ``Server.close()`` cancels handlers but leaves client connections open
    (their streams then hang); :meth:`close_connections` ends them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocols: set[H2Protocol] = set()

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        # grpclib (like asyncio) sets TCP_NODELAY only on sockets whose ``proto``
        # field says IPPROTO_TCP; connections accepted on a listening socket
        # made with proto 0 (``socket.socket(AF_INET, SOCK_STREAM)``) stay with
        # Nagle on and every small reply waits for a delayed ACK (~40 ms).
        made = protocol.connection_made

        def connection_made(transport: Any) -> None:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:  # pragma: no cover - not a TCP socket after all
                    pass
            made(transport)
            _grpc.tune_connection(protocol)

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        self.protocols.add(protocol)
        self.protocols = {p for p in self.protocols if p is protocol or not _lost(p)}
        return protocol

    def close_connections(self) -> None:
        for protocol in self.protocols:
            processor = getattr(protocol, "processor", None)
            if processor is not None:
                try:
                    processor.close("the node is shutting down")
                except Exception:  # pragma: no cover - already closed
                    pass
        self.protocols.clear()


async def _make_server(service: _Service, window: int) -> _TrackingServer:
    config = Configuration(http2_connection_window_size=window, http2_stream_window_size=window)
    return _TrackingServer([service], config=config)


def _lost(protocol: H2Protocol) -> bool:
    handler = protocol.handler
    return bool(getattr(handler, "closing", False))


@asynccontextmanager
async def open_transport(
    node_id: NodeId,
    address: str,
    *,
    cluster_id: str,
    peers: Mapping[NodeId, str] | None = None,
    settings: TransportSettings | None = None,
    ssl_context: ssl.SSLContext | None = None,
    client_ssl_context: ssl.SSLContext | None = None,
    raft_handler: RaftHandler | None = None,
    data_handler: Any | None = None,
    is_member: Callable[[NodeId], bool] | None = None,
    status: Callable[[], NodeStatus] | None = None,
    rng: random.Random | None = None,
    sock: socket.socket | None = None,
) -> AsyncIterator[GrpcTransport]:
    """Run a node's gRPC server and peer channels for the duration of the block.

    ``address`` is where the server listens (``host:port``; port 0 picks a
    free port, see :attr:`GrpcTransport.port`), unless ``sock`` (an already
    bound socket) is given. ``peers`` maps peer node ids to addresses; a node
    id not in it is used as its own address. ``ssl_context`` is the server's
    context, ``client_ssl_context`` the one used to reach peers (both needed
    for TLS; make the server's ``verify_mode`` ``CERT_REQUIRED`` for mutual
    TLS). ``raft_handler``/``data_handler`` may be set after start through
    :meth:`attach`; calls arriving without one get UNIMPLEMENTED.
    ``is_member(node_id)`` decides who may call (default: everyone known in
    ``peers``). Runs trio-asyncio's loop itself, inside the caller's task.
    """
    settings = settings or TransportSettings()
    peers = dict(peers or {})
    if is_member is None:
        known = set(peers) | {node_id}

        def is_member(n: NodeId) -> bool:
            return n in known

    transport = GrpcTransport(
        node_id,
        cluster_id=cluster_id,
        settings=settings,
        peers=peers,
        ssl_context=ssl_context,
        client_ssl_context=client_ssl_context,
        rng=rng if rng is not None else random.Random(),
        is_member=is_member,
    )
    transport.attach(raft_handler=raft_handler, data_handler=data_handler, status=status)
    service = transport._service
    async with trio_asyncio.open_loop() as loop, trio.open_nursery() as nursery:
        transport._loop = loop
        _grpc.tune_loop(loop)
        # trio-asyncio turns every call of asyncio's exception handler (an
        # unclosed resource noticed by a __del__, a task exception nobody
        # retrieved) into an exception that crashes the loop, i.e. the node.
        # Those are leaks, not failures of the node: log them loudly instead.
        loop.set_exception_handler(transport._asyncio_error)
        transport._nursery = nursery
        server = await transport._aio(_make_server)(service, settings.flow_control_window)
        transport._server = server
        if sock is not None:
            await transport._aio(server.start)(sock=sock, ssl=ssl_context)
        else:
            host, port = _split_address(address)
            await transport._aio(server.start)(host, port, ssl=ssl_context, reuse_address=True)
        sockets: Any = getattr(server._server, "sockets", None) or ()
        if sockets:
            transport.port = sockets[0].getsockname()[1]
        try:
            yield transport
        finally:
            with trio.CancelScope(shield=True):
                transport._closing = True
                nursery.cancel_scope.cancel()
                await transport._shutdown_clients()
                server.close()
                server.close_connections()
                with trio.move_on_after(settings.close_timeout):
                    await transport._aio(server.wait_closed)()
