"""Helpers for the transport tests: bound sockets, recording handlers."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio

from trio_dchan.raft.transport import Proposal
from trio_dchan.raft.types import Message, NodeId
from trio_dchan.transport import GrpcTransport, TransportSettings, open_transport


def bound_socket() -> socket.socket:
    """A listening-ready TCP socket on 127.0.0.1 with a kernel-chosen port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"{host}:{port}"


class RecordingHandler:
    """A RaftHandler that records what arrives and answers forwards with a callable."""

    def __init__(self, on_forward: Callable[[Proposal], Any] | None = None) -> None:
        self.messages: list[Message] = []
        self.forwards: list[Proposal] = []
        self._changed = trio.Event()
        self._on_forward = on_forward

    def deliver(self, message: Message) -> None:
        self.messages.append(message)
        self._changed.set()
        self._changed = trio.Event()

    async def handle_forward(self, proposal: Proposal) -> object:
        self.forwards.append(proposal)
        if self._on_forward is None:
            return {"echo": proposal.data}
        return self._on_forward(proposal)

    async def wait_for(self, count: int) -> None:
        while len(self.messages) < count:
            await self._changed.wait()

    async def resend_until_delivered(
        self, transport: Any, message: Message, interval: float = 0.05
    ) -> None:
        """Send ``message`` again every ``interval`` until one copy arrives (Raft's retries)."""
        target = len(self.messages) + 1
        while len(self.messages) < target:
            transport.send([message])
            with trio.move_on_after(interval):
                await self.wait_for(target)


@asynccontextmanager
async def transports(
    n: int,
    *,
    cluster_id: str = "test",
    settings: TransportSettings | None = None,
    handlers: Sequence[Any] | None = None,
    data_handlers: Sequence[Any] | None = None,
    ssl: Sequence[tuple[Any, Any]] | None = None,
) -> AsyncIterator[tuple[list[NodeId], list[GrpcTransport]]]:
    """``n`` transports on 127.0.0.1 that know each other, node id = address."""
    socks = [bound_socket() for _ in range(n)]
    ids = [address_of(s) for s in socks]
    peers = {i: i for i in ids}
    out: list[GrpcTransport] = []
    async with AsyncExitStack() as stack:
        for k in range(n):
            server_ctx, client_ctx = ssl[k] if ssl else (None, None)
            t = await stack.enter_async_context(
                open_transport(
                    ids[k],
                    ids[k],
                    cluster_id=cluster_id,
                    peers=peers,
                    settings=settings or TransportSettings(),
                    raft_handler=handlers[k] if handlers else None,
                    data_handler=data_handlers[k] if data_handlers else None,
                    ssl_context=server_ctx,
                    client_ssl_context=client_ctx,
                    sock=socks[k],
                )
            )
            out.append(t)
        yield ids, out
    assert [t.asyncio_errors for t in out] == [0] * n


class RawCodec:
    """A grpclib codec that sends and returns raw bytes (to play a broken peer)."""

    __content_subtype__ = "proto"

    def encode(self, message: bytes, message_type: Any) -> bytes:
        return message

    def decode(self, data: bytes, message_type: Any) -> bytes:
        return data


async def raw_call(
    address: str,
    path: str,
    messages: Sequence[bytes],
    *,
    metadata: dict[str, str],
    stream_reply: bool = False,
) -> tuple[str, str | None, list[bytes]]:
    """Run on asyncio: send raw messages on ``path``; return (status, details, replies)."""
    from grpclib.client import Channel
    from grpclib.const import Cardinality
    from grpclib.exceptions import GRPCError, StreamTerminatedError

    host, port = address.rsplit(":", 1)
    channel = Channel(host, int(port), codec=RawCodec())  # type: ignore[arg-type]
    replies: list[bytes] = []
    try:
        card = Cardinality.STREAM_STREAM if stream_reply else Cardinality.STREAM_UNARY
        async with channel.request(
            path, card, bytes, bytes, timeout=5, metadata=metadata
        ) as stream:
            for m in messages:
                await stream.send_message(m)
            await stream.end()
            while (reply := await stream.recv_message()) is not None:
                replies.append(reply)
                if not stream_reply:
                    break
        return "OK", None, replies
    except GRPCError as exc:
        return exc.status.name, exc.message, replies
    except StreamTerminatedError as exc:
        return "RESET", str(exc), replies
    finally:
        channel.close()
