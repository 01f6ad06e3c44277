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

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import betterproto2
from grpclib.client import Channel
from grpclib.client import Stream as ClientStream

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


@lost_connection_as_oserror
async def open_stream(stream: ClientStream[Any, Any]) -> None:
    """Enter a client stream and send its request headers (connects if needed)."""
    drop_dead_connection(stream._channel)
    await stream.__aenter__()
    await stream.send_request()


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
    await stream.end()
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
