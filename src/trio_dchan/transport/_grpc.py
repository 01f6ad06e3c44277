"""The asyncio side of the transport: small coroutines around grpclib streams.

Everything here runs on the trio-asyncio loop and is called from Trio through
``trio_asyncio.aio_as_trio``, once per batch or frame. It holds no state and
no logic beyond what grpclib needs; the Trio side decides what to send and
when.

grpclib behaviours handled here:

* it has no receive-size limit: :func:`recv_limited` reads the 5-byte gRPC
  message prefix itself and refuses a message longer than the limit before
  reading its body (uses grpclib's per-stream buffer, ``stream._stream``);
* a stream abandoned from Trio must be reset explicitly, or the peer's
  handler keeps running: :func:`abort` sends RST_STREAM and releases it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import betterproto2
from grpclib.client import Channel
from grpclib.client import Stream as ClientStream

from ._strict import check_wire
from .errors import MessageTooLarge, PeerProtocolError

M = TypeVar("M", bound=betterproto2.Message)


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
    if len(prefix) != 5:
        raise PeerProtocolError("truncated gRPC message prefix")
    if prefix[0] != 0:
        raise PeerProtocolError("compressed gRPC messages are not supported")
    size = int.from_bytes(prefix[1:5], "big")
    if size > limit:
        raise MessageTooLarge(size, limit)
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


async def open_stream(stream: ClientStream[Any, Any]) -> None:
    """Enter a client stream and send its request headers (connects if needed)."""
    await stream.__aenter__()
    await stream.send_request()


async def watch(stream: ClientStream[Any, Any]) -> None:
    """Return when the server answers a client stream early; raise if it failed it.

    A server of a client-streaming call answers only after the client ended
    its half, unless it refuses or fails the call (trailers-only answer), or
    the connection is lost: those raise here.
    """
    await stream.recv_initial_metadata()


async def send(stream: Any, message: betterproto2.Message) -> None:
    await stream.send_message(message)


async def finish_client_stream(
    stream: ClientStream[Any, Any], reply_type: type[M], limit: int
) -> M | None:
    """End our half, read the single reply and the trailers (raising on error status)."""
    await stream.end()
    reply = await recv_limited(stream, reply_type, limit)
    await stream.recv_trailing_metadata()
    await stream.__aexit__(None, None, None)
    return reply


async def finish_bidi_stream(stream: ClientStream[Any, Any]) -> None:
    """Read the trailers of a stream whose messages were all read (raising on error)."""
    await stream.recv_trailing_metadata()
    await stream.__aexit__(None, None, None)


async def end(stream: ClientStream[Any, Any]) -> None:
    await stream.end()


async def abort(stream: ClientStream[Any, Any]) -> None:
    """Reset a client stream (RST_STREAM) and release it; never raises."""
    try:
        if stream._send_request_done and not stream._cancel_done:
            stream_obj = getattr(stream, "_stream", None)
            if stream_obj is not None and stream_obj.closable:
                await stream.cancel()
    except Exception:  # the connection may already be gone: nothing to reset
        pass
    try:
        aborted = ConnectionAbortedError("stream abandoned")
        await stream.__aexit__(ConnectionAbortedError, aborted, None)
    except Exception:
        pass


async def cancel_server_stream(stream: Any) -> None:
    """Reset a server stream (RST_STREAM); never raises."""
    try:
        if not stream._cancel_done and stream._stream.closable:
            await stream.cancel()
    except Exception:
        pass


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
