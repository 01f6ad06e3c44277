"""Raft messages and forwarded proposals over real gRPC on 127.0.0.1."""

from __future__ import annotations

import pytest
import trio
from transport_helpers import RecordingHandler, transports

from trio_dchan._proto.dchan import v1 as pb
from trio_dchan.raft.errors import NotLeader
from trio_dchan.raft.transport import Proposal, ProposalKind
from trio_dchan.raft.types import Entry, EntryType, Message, MessageType
from trio_dchan.transport import _grpc


def _append(sender: str, to: str, n: int) -> Message:
    entries = tuple(Entry(2, n * 10 + i, EntryType.NORMAL, b"x%d" % i) for i in range(3))
    return Message(MessageType.APPEND, to, sender, 2, log_term=1, index=n * 10, entries=entries)


async def test_messages_arrive_in_order_with_their_fields() -> None:
    handlers = [RecordingHandler() for _ in range(3)]
    async with transports(3, handlers=handlers) as (ids, ts):
        sent = [_append(ids[0], ids[1], n) for n in range(200)]
        sent += [Message(MessageType.HEARTBEAT, ids[2], ids[0], 2, commit=7, context=b"r")]
        for m in sent:
            ts[0].send([m])
        with trio.fail_after(10):
            await handlers[1].wait_for(200)
            await handlers[2].wait_for(1)
        assert handlers[1].messages == sent[:200]
        assert handlers[2].messages == sent[200:]
        assert handlers[0].messages == []


async def test_forward_returns_result_and_keeps_error_types() -> None:
    def on_forward(p: Proposal) -> object:
        if p.data == b"refuse":
            raise NotLeader("n3")
        return [p.data, int(p.kind)]

    handlers = [RecordingHandler(on_forward) for _ in range(2)]
    async with transports(2, handlers=handlers) as (ids, ts):
        with trio.fail_after(10):
            result = await ts[0].forward(ids[1], Proposal(ProposalKind.COMMAND, b"cmd"))
            assert result == [b"cmd", 0]
            with pytest.raises(NotLeader) as info:
                await ts[0].forward(ids[1], Proposal(ProposalKind.COMMAND, b"refuse"))
            assert info.value.leader == "n3"
        assert [p.data for p in handlers[1].forwards] == [b"cmd", b"refuse"]


async def test_accepted_connections_have_tcp_nodelay() -> None:
    """Small replies must not wait for delayed ACKs, whatever socket the server was given."""
    import socket

    handlers = [RecordingHandler(lambda p: 1) for _ in range(2)]
    async with transports(2, handlers=handlers) as (ids, ts):
        with trio.fail_after(10):
            assert await ts[1].forward(ids[0], Proposal(ProposalKind.COMMAND, b"x")) == 1
        server = ts[0]._server
        assert server is not None
        socks = [p.connection._transport.get_extra_info("socket") for p in server.protocols]
        assert socks
        for sock in socks:
            assert sock.proto == 0  # the case grpclib and asyncio leave alone
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


async def test_connection_closed_by_keepalive_is_replaced_not_reused() -> None:
    """grpclib's keepalive closes a connection under the channel's feet; calls must reconnect."""
    handlers = [RecordingHandler(lambda p: p.data) for _ in range(2)]
    async with transports(2, handlers=handlers) as (ids, ts):
        with trio.fail_after(10):
            assert await ts[1].forward(ids[0], Proposal(ProposalKind.COMMAND, b"a")) == b"a"
            channel = ts[1]._peers[ids[0]].channel
            assert channel is not None

            # What an unanswered keepalive ping does: Connection.close() alone,
            # and a request in the same asyncio step, before connection_lost.
            async def close_then_call() -> object:
                channel._protocol.processor.connection.close()
                return await _grpc.unary(
                    channel,
                    "/dchan.v1.Cluster/Propose",
                    pb.ProposeRequest(data=b"b"),
                    pb.ProposeReply,
                    deadline_s=5,
                    metadata={"cluster-id": "test", "node-id": ids[1]},
                    limit=1 << 20,
                    progress=[False],
                )

            reply = await ts[1]._aio(close_then_call)()
            assert reply.error is None
            # Raft streams reconnect the same way.
            channel._protocol.processor.connection.close()
            hb = Message(MessageType.HEARTBEAT, ids[0], ids[1], 1, commit=3)
            await handlers[0].resend_until_delivered(ts[1], hb)
