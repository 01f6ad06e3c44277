"""The asyncio side of the transport: small coroutines around grpclib streams.

The coroutines here run on the trio-asyncio loop and are called from Trio
through ``trio_asyncio.aio_as_trio``. The data-frame functions at the end
(:func:`send_now`, :func:`read_now`, :func:`data_waiter`) are the exception:
plain functions called from Trio that move a frame when grpclib would not
have to wait, so the common case costs no asyncio task. Nothing here holds
state or logic beyond what grpclib needs; the Trio side decides what to send
and when.

grpclib behaviours handled here:

* it has no receive-size limit: :func:`recv_limited` reads the 5-byte gRPC
  message prefix itself and refuses a message longer than the limit before
  reading its body (uses grpclib's per-stream buffer, ``stream._stream``);
* a stream abandoned from Trio must be reset explicitly, or the peer's
  handler keeps running: :func:`abort` sends RST_STREAM and releases it.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import betterproto2
import trio
from grpclib.client import Channel
from grpclib.client import Stream as ClientStream
from h2.connection import ConnectionInputs
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame, PushPromiseFrame
from hyperframe.frame import DataFrame as H2DataFrame

from ._strict import check_wire
from .errors import MessageTooLarge, PeerProtocolError

M = TypeVar("M", bound=betterproto2.Message)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def lost_connection_as_oserror(fn: F) -> F:
    """Report grpclib's race with a connection being lost as ``ConnectionResetError``.

    When the connection closes while grpclib awaits inside a call (e.g.
    between writing the request headers and reading the peer's address),
    grpclib touches the connection's deleted transport and raises
    ``AttributeError: 'Connection' object has no attribute '_transport'``.
    That is a lost connection, and is reported as one.
    """

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except AttributeError as exc:
            if "_transport" not in str(exc):
                raise
            raise ConnectionResetError(f"connection lost during a grpclib call: {exc}") from exc

    return wrapper  # type: ignore[return-value]


@lost_connection_as_oserror
async def recv_limited(stream: Any, recv_type: type[M], limit: int) -> M | None:
    """Receive one message from a grpclib client or server stream.

    Returns ``None`` when the other side ended its half of the stream.
    Raises :class:`MessageTooLarge` for a message longer than ``limit``
    (before its body is read) and :class:`PeerProtocolError` for a message
    that does not parse.
    """
    if isinstance(stream, ClientStream):
        if not stream._recv_initial_metadata_done:
            await stream.recv_initial_metadata()
        with stream._wrapper:
            return await _recv(stream._stream, recv_type, limit)
    return await _recv(stream._stream, recv_type, limit)


async def _recv(h2_stream: Any, recv_type: type[M], limit: int) -> M | None:
    prefix = await h2_stream.recv_data(5)
    if not prefix:
        return None
    size = parse_prefix(prefix, limit)
    body = await h2_stream.recv_data(size) if size else b""
    if len(body) != size:
        raise PeerProtocolError("truncated gRPC message")
    check_wire(body, recv_type)
    try:
        return recv_type.parse(body)
    except Exception as exc:
        raise PeerProtocolError(f"malformed {recv_type.__name__}: {exc}") from None


async def make_channel(host: str, port: int, *, ssl: Any, config: Any) -> Channel:
    """A grpclib channel bound to the running (trio-asyncio) loop; connects lazily."""
    return Channel(host, port, ssl=ssl, config=config)


def drop_dead_connection(channel: Channel) -> None:
    """Make ``channel`` reconnect if its connection was closed behind its back.

    grpclib's keepalive closes a connection whose ping went unanswered with
    ``Connection.close()``, which deletes the connection's transport but
    leaves the channel believing it is connected until asyncio delivers
    ``connection_lost``; a request made in between fails with
    ``AttributeError: 'Connection' object has no attribute '_transport'``.
    Called right before a request, in the same asyncio step.
    """
    protocol = channel._protocol
    if protocol is not None and protocol.processor.connection.is_closing():
        channel.close()


#: Largest HTTP/2 DATA frame a peer may send us (HTTP/2 allows up to 2**24 - 1).
#: The default, 16 KiB, splits a 1 MiB batch into 64 frames, each costing h2
#: and grpclib a full round of bookkeeping at both ends.
LARGE_FRAME_BYTES = 1 << 22
#: Most bytes of one header block (HEADERS plus its CONTINUATION frames). h2
#: holds an unfinished block in memory, up to 64 frames: with our large
#: frames that would be 256 MiB per connection, before any cluster check.
#: gRPC metadata is a few hundred bytes here.
MAX_HEADER_BLOCK_BYTES = 1 << 16


class _QuietDataFrame(H2DataFrame):
    """A received DATA frame whose ``repr`` does not hex-dump its payload.

    h2 formats every received frame with ``repr`` for its trace log before
    handing it to the (by default silent) logger; for a DATA frame that
    re-serializes and hex-encodes the whole payload, ~0.5 ms per MiB.
    """

    def _body_repr(self) -> str:
        return f"<{len(self.data)} bytes>"


_PADDED = 0x08


class _QuietFrameBuffer(FrameBuffer):
    """h2's frame parser, handing out DATA frames as :class:`_QuietDataFrame`.

    A complete unpadded DATA frame is cut out of the buffer with one copy of
    its payload (h2 copies it twice: a slice of its buffer, then the frame's
    bytes); every other frame, and anything h2 must judge (a padded frame, a
    frame inside a header block, a bad length or stream), goes h2's way.
    """

    def __next__(self) -> Frame:
        data = self._data
        if len(data) >= 9 and data[3] == H2DataFrame.type and not data[4] & _PADDED:
            length = int.from_bytes(data[0:3], "big")
            stream_id = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
            if (
                len(data) >= 9 + length
                and stream_id
                and length <= self.max_frame_size
                and not self._headers_buffer
            ):
                quick = _QuietDataFrame(stream_id)
                quick.parse_flags(data[4])
                view = memoryview(data)
                try:
                    quick.data = view[9 : 9 + length].tobytes()
                finally:
                    view.release()
                quick.body_len = length
                del data[: 9 + length]
                return quick
        frame = super().__next__()
        if type(frame) is H2DataFrame:
            frame.__class__ = _QuietDataFrame
        return frame

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if isinstance(f, _HEADER_FRAMES):
            size = len(f.data) + sum(len(x.data) for x in self._headers_buffer)
            if size > MAX_HEADER_BLOCK_BYTES:
                raise H2ProtocolError(
                    f"a header block of over {MAX_HEADER_BLOCK_BYTES} bytes was received"
                )
        return super()._update_header_buffer(f)


_HEADER_FRAMES = (HeadersFrame, ContinuationFrame, PushPromiseFrame)


def tune_loop(loop: Any) -> None:
    """Make ``loop`` (our trio-asyncio loop) skip a needless round after each socket event.

    trio-asyncio runs each reader/writer callback in a Trio task of its own
    and then waits until the loop processed every asyncio callback queued
    before it (``synchronize()``), so callbacks keep asyncio's order relative
    to the next socket event. When nothing is queued there is nothing to keep
    in order, yet the wait still costs a round of the asyncio loop's task and
    one of the I/O task per event, i.e. per frame received. This replaces the
    loop's per-descriptor task with one that waits only when callbacks are
    queued or being run. A trio-asyncio without the pieces it relies on keeps
    its own.
    """
    if not all(hasattr(loop, name) for name in ("_io_task", "_q_send", "synchronize")):
        return

    async def io_task(fd: int, handle: Any, wait_ready: Callable[[int], Awaitable[None]]) -> None:
        with handle._scope:
            try:
                while not handle._cancelled:
                    try:
                        await wait_ready(fd)
                    except OSError:
                        # The descriptor closed under a handle cancelled
                        # without a checkpoint in between: that is the end.
                        if handle._cancelled:
                            return
                        raise
                    if handle._cancelled:
                        return
                    handle._run()
                    # The asyncio loop's task is idle (parked in its queue,
                    # which is empty) unless a callback was queued: a handle
                    # given straight to the parked task counts as queued.
                    queue = loop._q_send.statistics()
                    if queue.current_buffer_used or not queue.tasks_waiting_receive:
                        await loop.synchronize()
            except Exception as exc:
                handle._raise(exc)

    loop._io_task = io_task


def tune_connection(protocol: Any) -> None:
    """Prepare a fresh grpclib connection (ours or a peer's) for data-plane traffic.

    Lets the peer send DATA frames of up to :data:`LARGE_FRAME_BYTES` (it
    does so once it read our SETTINGS) and keeps h2 from hex-dumping each
    received DATA frame. Applies once per connection.
    """
    if protocol is None or getattr(protocol, "_dchan_tuned", False):
        return
    connection = getattr(protocol, "connection", None)
    if connection is None or connection.is_closing():
        return
    protocol._dchan_tuned = True
    h2 = connection._connection
    if type(h2.incoming_buffer) is FrameBuffer:
        h2._frame_dispatch_table[_QuietDataFrame] = h2._frame_dispatch_table[H2DataFrame]
        h2.incoming_buffer.__class__ = _QuietFrameBuffer
    h2.update_settings({SettingCodes.MAX_FRAME_SIZE: LARGE_FRAME_BYTES})
    connection.flush()


@lost_connection_as_oserror
async def open_stream(stream: ClientStream[Any, Any]) -> None:
    """Enter a client stream and send its request headers (connects if needed)."""
    drop_dead_connection(stream._channel)
    await stream.__aenter__()
    await stream.send_request()
    tune_connection(stream._channel._protocol)


@lost_connection_as_oserror
async def watch(stream: ClientStream[Any, Any]) -> None:
    """Return when the server answers a client stream early; raise if it failed it.

    A server of a client-streaming call answers only after the client ended
    its half, unless it refuses or fails the call (trailers-only answer), or
    the connection is lost: those raise here.
    """
    await stream.recv_initial_metadata()


@lost_connection_as_oserror
async def send(stream: Any, message: betterproto2.Message) -> None:
    await stream.send_message(message)


@lost_connection_as_oserror
async def finish_client_stream(
    stream: ClientStream[Any, Any], reply_type: type[M], limit: int
) -> M | None:
    """End our half, read the single reply and the trailers (raising on error status)."""
    await _end(stream)
    reply = await recv_limited(stream, reply_type, limit)
    await stream.recv_trailing_metadata()
    await stream.__aexit__(None, None, None)
    return reply


@lost_connection_as_oserror
async def finish_bidi_stream(stream: ClientStream[Any, Any]) -> None:
    """Read the trailers of a stream whose messages were all read (raising on error)."""
    await stream.recv_trailing_metadata()
    await stream.__aexit__(None, None, None)


@lost_connection_as_oserror
async def end(stream: ClientStream[Any, Any]) -> None:
    await _end(stream)


async def _end(stream: ClientStream[Any, Any]) -> None:
    """End our half of a client stream, unless the peer already closed it.

    A peer that refuses a call answers with its status and resets the
    stream; ending it then would raise h2's ``StreamClosedError`` (grpclib
    does not translate it here). Reading the trailers afterwards raises the
    peer's status instead, which says what went wrong.
    """
    stream_obj = getattr(stream, "_stream", None)
    if stream_obj is not None and not stream_obj.closable:
        return
    await stream.end()


def _reset(stream_obj: Any) -> None:
    """Queue RST_STREAM without waiting for the connection to take writes.

    grpclib's ``cancel()`` first waits until the socket can take more, so a
    peer that stopped reading (a stopped process, a partition) would hold
    every cancellation and shutdown until TCP gives up, minutes later. h2
    sends the queued frame with the next write that goes through.
    """
    if stream_obj is not None and stream_obj.closable:
        stream_obj.reset_nowait()


async def abort(stream: ClientStream[Any, Any]) -> None:
    """Reset a client stream (RST_STREAM) and release it, without waiting; never raises."""
    try:
        if stream._send_request_done and not stream._cancel_done:
            _reset(getattr(stream, "_stream", None))
            stream._cancel_done = True
    except Exception:  # the connection may already be gone: nothing to reset
        pass
    try:
        aborted = ConnectionAbortedError("stream abandoned")
        await stream.__aexit__(ConnectionAbortedError, aborted, None)
    except Exception:
        pass


async def cancel_server_stream(stream: Any) -> None:
    """Reset a server stream (RST_STREAM) without waiting; never raises."""
    try:
        if not stream._cancel_done:
            _reset(stream._stream)
            stream._cancel_done = True
    except Exception:
        pass


@lost_connection_as_oserror
async def unary(
    channel: Any,
    path: str,
    request: betterproto2.Message,
    reply_type: type[M],
    *,
    deadline_s: float,
    metadata: dict[str, str],
    limit: int,
    progress: list[bool],
) -> M:
    """One unary call. ``progress[0]`` becomes true once the request may have left."""
    from grpclib.const import Cardinality

    drop_dead_connection(channel)
    async with channel.request(
        path,
        Cardinality.UNARY_UNARY,
        type(request),
        reply_type,
        timeout=deadline_s,
        metadata=metadata,
    ) as stream:
        await stream.send_request()
        progress[0] = True
        await stream.send_message(request, end=True)
        reply = await recv_limited(stream, reply_type, limit)
        if reply is None:
            raise PeerProtocolError(f"empty reply to {path}")
    return reply


# ------------------------------------------------------------------------
# Data-frame fast path, called synchronously from Trio.
#
# Crossing into asyncio costs an asyncio task and a dozen passes of the
# trio-asyncio loop per call. A data frame usually needs no waiting at all:
# the HTTP/2 window has room for it, or its bytes already sit in grpclib's
# per-stream buffer. The functions below do exactly what grpclib would do in
# those cases, without awaiting, and decline (return ``None``/``False``,
# having done nothing) whenever grpclib would have to wait or has something
# to report; the caller then takes the ordinary asyncio path.

_FRAME_TAG = b"\x0a"  # DataFrame.payload: field 1, wire type 2


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _message_prefix(body_len: int) -> bytes:
    """The 5-byte gRPC prefix of an uncompressed message of ``body_len`` bytes."""
    return b"\x00" + body_len.to_bytes(4, "big")


def data_frame_head(size: int) -> bytes:
    """The bytes in front of a ``DataFrame`` payload of ``size`` bytes in its gRPC message.

    That is the 5-byte gRPC prefix and the protobuf field header; the
    payload follows as it is, so it can be written from its pieces.
    """
    if size:
        field_head = _FRAME_TAG + _varint_bytes(size)
        return _message_prefix(len(field_head) + size) + field_head
    return _message_prefix(0)


def decode_data_frame(body: bytes | memoryview, frame_type: type[M]) -> bytes | memoryview:
    """The payload of a serialized ``DataFrame``; refuses malformed bytes like ``recv_limited``.

    In the common shape the payload is a slice of ``body`` (a view, if
    ``body`` is one), not a copy.
    """
    # The common shape: exactly one payload field filling the message.
    if len(body) > 1 and body[0] == 0x0A:
        length = 0
        shift = 0
        pos = 1
        end = min(len(body), 11)
        while pos < end:
            byte = body[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if pos + length == len(body):
                    return body[pos:]
                break
            shift += 7
    # Anything else (empty, unknown fields, repeated field) goes the general way.
    body = bytes(body)
    check_wire(body, frame_type)
    try:
        frame: Any = frame_type.parse(body)
    except Exception as exc:
        raise PeerProtocolError(f"malformed {frame_type.__name__}: {exc}") from None
    payload: bytes = frame.payload
    return payload


def _sendable(stream: Any) -> Any | None:
    """grpclib's h2 stream of ``stream`` if a message may be written now without waiting."""
    if isinstance(stream, ClientStream):
        if (
            not stream._send_request_done
            or stream._end_done
            or stream._cancel_done
            or stream._wrapper._error is not None
        ):
            return None
    elif not stream._send_initial_metadata_done or stream._send_trailing_metadata_done:
        return None
    if "send_message" not in stream._dispatch.__dict__:  # an event listener is installed
        return None
    h2_stream = getattr(stream, "_stream", None)
    if h2_stream is None or h2_stream.id is None:
        return None
    connection = h2_stream.connection
    if not connection.write_ready.is_set() or connection.is_closing():
        return None
    return h2_stream


_H2_FRAME_HEADER = struct.Struct(">HBBBL")
_H2_DATA = 0x0


def write_data_frame(
    h2: Any, transport: Any, stream_id: int, pieces: list[bytes], size: int
) -> None:
    """``h2.send_data(stream_id, data)`` and a write of ``h2.data_to_send()``, minus h2's copies.

    ``data`` is the concatenation of ``pieces``, ``size`` bytes in all. h2
    copies a payload four times on its way out (frame body, frame, its output
    buffer, the bytes it returns): about 0.9 ms per MiB on this machine,
    mostly page faults on fresh buffers. This makes the state and flow-control changes
    ``send_data`` makes, builds the 9-byte DATA frame header itself, and
    copies the pieces once, behind whatever h2 had queued. The caller has
    checked the flow-control window and that the payload fits in one frame.
    """
    h2.state_machine.process_input(ConnectionInputs.SEND_DATA)
    stream = h2.streams[stream_id]
    stream.send_data(b"")  # the stream's own state machine; zero bytes counted
    stream.outbound_flow_control_window -= size
    h2.outbound_flow_control_window -= size
    header = _H2_FRAME_HEADER.pack((size >> 8) & 0xFFFF, size & 0xFF, _H2_DATA, 0, stream_id)
    # As a view: asyncio slices off what the socket took at once, and a
    # slice of bytes would copy the rest before it buffers it (a second copy).
    transport.write(memoryview(b"".join([h2.data_to_send(), header, *pieces])))


def send_now(stream: Any, pieces: list[bytes], size: int) -> bool:
    """Write one encoded gRPC message if grpclib could without waiting; else do nothing.

    The message is the concatenation of ``pieces``, ``size`` bytes in all.
    """
    h2_stream = _sendable(stream)
    if h2_stream is None:
        return False
    h2 = h2_stream._h2_connection
    stream_id = h2_stream.id
    try:
        if h2.local_flow_control_window(stream_id) < size:
            return False
    except Exception:  # the stream is closed or unknown to h2: let grpclib report it
        return False
    frame_size = h2.max_outbound_frame_size
    if size <= frame_size:
        write_data_frame(h2, h2_stream._transport, stream_id, pieces, size)
    else:
        data = b"".join(pieces)
        for start in range(0, size, frame_size):
            h2.send_data(stream_id, data[start : start + frame_size])
        h2_stream._transport.write(h2.data_to_send())
    h2_stream.data_sent += size
    connection = h2_stream.connection
    connection.data_sent += size
    connection.data_send_process()
    connection.messages_sent += 1
    return True


def send_message_now(stream: Any, message: betterproto2.Message) -> bool:
    """:func:`send_now` for a protobuf message: what ``stream.send_message`` writes."""
    body = bytes(message)
    prefix = _message_prefix(len(body))
    return send_now(stream, [prefix, body], len(prefix) + len(body))


def _receivable(stream: Any) -> Any | None:
    if isinstance(stream, ClientStream) and (
        not stream._recv_initial_metadata_done or stream._wrapper._error is not None
    ):
        return None
    return getattr(stream, "_stream", None)


def read_now(stream: Any, size: int) -> bytes | None:
    """``size`` bytes of the stream if grpclib already holds them all; else ``None``, nothing read.

    Returns ``b""`` when the peer ended its half and nothing is left.
    """
    h2_stream = _receivable(stream)
    if h2_stream is None:
        return None
    buffer = h2_stream.buffer
    available = buffer._acked_size
    ended = False
    if available < size:
        for item in buffer._unacked._queue:
            if not item.ack_size:
                ended = True
                break
            available += item.data_size
            if available >= size:
                break
    if available < size and not (ended and available == 0):
        return None
    # With the bytes (or the end marker) queued, grpclib's read completes
    # without suspending; drive it here.
    reader = buffer.read(size)
    try:
        reader.send(None)
    except StopIteration as done:
        data: bytes = done.value
        return data
    reader.close()  # pragma: no cover - cannot happen with the bytes queued
    raise RuntimeError("grpclib buffer read suspended with its bytes queued")


def take_view(stream: Any, size: int) -> memoryview | None:
    """The next ``size`` bytes of the stream without a copy, if they came in one piece.

    Right after a message's 5-byte prefix was read, grpclib holds the rest of
    the DATA frame that carried it; when that holds the whole message body
    (our peers send each message in one frame), the body is handed out as a
    view of the frame instead of a joined copy. ``None`` otherwise (nothing
    read): :func:`read_now` or :func:`read_data` then joins the pieces.
    """
    h2_stream = _receivable(stream)
    if h2_stream is None:
        return None
    buffer = h2_stream.buffer
    acked = buffer._acked
    if not acked:
        return None
    first = acked[0]
    if first.data_size < size:
        return None
    chunk = first.data
    if first.data_size == size:
        acked.popleft()
    else:
        acked[0] = first._replace(data=chunk[size:], data_size=first.data_size - size)
    buffer._acked_size -= size
    view: memoryview = chunk[:size]
    return view


@lost_connection_as_oserror
async def read_data(stream: Any, size: int) -> bytes:
    """``size`` bytes of the stream (or ``b""`` at its end), waiting for them on asyncio."""
    if isinstance(stream, ClientStream):
        if not stream._recv_initial_metadata_done:
            await stream.recv_initial_metadata()
        with stream._wrapper:
            data: bytes = await stream._stream.recv_data(size)
    else:
        data = await stream._stream.recv_data(size)
    return data


def parse_prefix(prefix: bytes, limit: int) -> int:
    """The body size announced by a gRPC message prefix; refuses what ``recv_limited`` refuses."""
    if len(prefix) != 5:
        raise PeerProtocolError("truncated gRPC message prefix")
    if prefix[0] != 0:
        raise PeerProtocolError("compressed gRPC messages are not supported")
    size = int.from_bytes(prefix[1:5], "big")
    if size > limit:
        raise MessageTooLarge(size, limit)
    return size


class Wakeup:
    """Wakes a waiting Trio task when grpclib next queues bytes for a stream.

    It stands in grpclib's queue of readers (an ``asyncio.Queue`` that calls
    ``done()`` and ``set_result()`` on its waiting futures) and, for a client
    stream, among the waiters grpclib's wrapper ``cancel()``s when the
    stream fails. Either call reschedules the task at once, from the asyncio
    callback that queued the bytes: no asyncio future, callback handle or
    extra scheduling round in between.
    """

    __slots__ = ("_task",)

    def __init__(self, task: trio.lowlevel.Task) -> None:
        #: The waiting task; ``None`` once it was woken or stopped waiting.
        self._task: trio.lowlevel.Task | None = task

    def done(self) -> bool:
        return self._task is None

    def set_result(self, result: object) -> None:
        self._wake()

    def cancel(self, msg: object = None) -> bool:
        self._wake()
        return True

    def detach(self) -> None:
        """The task stopped waiting: wake nobody."""
        self._task = None

    def abort(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        """``wait_task_rescheduled``'s abort function: a cancelled task is woken only once."""
        self.detach()
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task)


def data_waiter(stream: Any, task: trio.lowlevel.Task) -> Wakeup | None:
    """A :class:`Wakeup` for ``task`` when grpclib next queues bytes (or the end) for ``stream``.

    A client stream's failure (reset, lost connection, deadline) wakes it
    too. ``None`` when the stream must be read the ordinary way (to have
    grpclib report a failure, or before the reply headers). The task must
    wait (``wait_task_rescheduled``) right after, and call
    :func:`drop_waiter` once woken or cancelled.
    """
    h2_stream = _receivable(stream)
    if h2_stream is None:
        return None
    waiter = Wakeup(task)
    h2_stream.buffer._unacked._getters.append(waiter)
    if isinstance(stream, ClientStream):
        # grpclib's wrapper only calls ``cancel()`` on what it holds.
        tasks: set[Any] = stream._wrapper._tasks
        tasks.add(waiter)
    return waiter


def drop_waiter(stream: Any, waiter: Wakeup) -> None:
    """Forget a waiter made by :func:`data_waiter`."""
    waiter.detach()
    getters = stream._stream.buffer._unacked._getters
    try:
        getters.remove(waiter)
    except ValueError:
        pass
    if isinstance(stream, ClientStream):
        stream._wrapper._tasks.discard(waiter)
