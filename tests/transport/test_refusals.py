"""Calls a node must refuse, and keep serving everyone else afterwards."""

from __future__ import annotations

import logging

import pytest
import trio
from transport_helpers import RecordingHandler, address_of, bound_socket, raw_call, transports

from trio_dchan._proto.dchan import v1 as pb
from trio_dchan.errors import DchanError
from trio_dchan.raft.transport import Proposal, ProposalKind
from trio_dchan.raft.types import Message, MessageType
from trio_dchan.transport import CallRefused, TransportSettings, open_transport


def _hb(sender: str, to: str, commit: int = 1) -> Message:
    return Message(MessageType.HEARTBEAT, to, sender, 1, commit=commit)


async def test_foreign_cluster_is_refused_and_members_still_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handlers = [RecordingHandler() for _ in range(2)]
    caplog.set_level(logging.WARNING, "trio_dchan.transport")
    async with transports(2, handlers=handlers) as (ids, ts):
        intruder_sock = bound_socket()
        intruder_id = address_of(intruder_sock)
        async with open_transport(
            intruder_id,
            intruder_id,
            cluster_id="another-cluster",
            peers={ids[0]: ids[0]},
            sock=intruder_sock,
        ) as intruder:
            with trio.fail_after(10):
                with pytest.raises(CallRefused) as info:
                    await intruder.forward(ids[0], Proposal(ProposalKind.COMMAND, b"x"))
                assert info.value.status == "PERMISSION_DENIED"
                assert "another-cluster" in (info.value.details or "")
                # Raft traffic from the intruder is refused too.
                intruder.send([Message(MessageType.HEARTBEAT, ids[0], ids[1], 9)])
                await ts[0].wait_refused("cluster", 2)
                # ... while the real peer is still served.
                ts[1].send([_hb(ids[1], ids[0])])
                await handlers[0].wait_for(1)
        assert handlers[0].messages == [_hb(ids[1], ids[0])]
        assert handlers[0].forwards == []
        assert any("does not match" in r.getMessage() for r in caplog.records)


async def test_non_member_is_refused_but_may_join() -> None:
    handler = RecordingHandler(lambda p: "joined" if p.kind is ProposalKind.CONF_CHANGE else 1)
    a_sock, b_sock, c_sock = bound_socket(), bound_socket(), bound_socket()
    a, b, c = address_of(a_sock), address_of(b_sock), address_of(c_sock)
    members = {a, b}
    async with (
        open_transport(
            a,
            a,
            cluster_id="k",
            peers={b: b},
            sock=a_sock,
            raft_handler=handler,
            is_member=members.__contains__,
        ) as ta,
        open_transport(b, b, cluster_id="k", peers={a: a}, sock=b_sock) as tb,
        open_transport(c, c, cluster_id="k", peers={a: a}, sock=c_sock) as tc,
    ):
        with trio.fail_after(10):
            with pytest.raises(CallRefused) as info:
                await tc.forward(a, Proposal(ProposalKind.COMMAND, b"x"))
            assert info.value.status == "PERMISSION_DENIED"
            assert "not a member" in (info.value.details or "")
            tc.send([_hb(c, a)])
            # Join is the one call a non-member may make.
            assert await tc.join(a, c) == "joined"
            from trio_dchan.raft.types import ConfChange, ConfChangeType

            change = ConfChange.decode(handler.forwards[-1].data)
            assert change == ConfChange(ConfChangeType.ADD_VOTER, c, c.encode())
            await ta.wait_refused("node", 2)
            tb.send([_hb(b, a)])
            await handler.wait_for(1)
            assert await tb.forward(a, Proposal(ProposalKind.COMMAND, b"y")) == 1
        assert handler.messages == [_hb(b, a)]


async def test_oversized_message_is_refused_and_connection_stays_usable() -> None:
    small = TransportSettings(max_message_bytes=64 * 1024)
    big = TransportSettings(max_message_bytes=8 * 1024 * 1024)
    handler = RecordingHandler(lambda p: len(p.data))
    a_sock, b_sock = bound_socket(), bound_socket()
    a, b = address_of(a_sock), address_of(b_sock)
    async with (
        open_transport(
            a, a, cluster_id="k", peers={b: b}, sock=a_sock, settings=small, raft_handler=handler
        ) as ta,
        open_transport(b, b, cluster_id="k", peers={a: a}, sock=b_sock, settings=big) as tb,
    ):
        with trio.fail_after(10):
            with pytest.raises(CallRefused) as info:
                await tb.forward(a, Proposal(ProposalKind.COMMAND, b"z" * (1024 * 1024)))
            assert info.value.status == "RESOURCE_EXHAUSTED"
            assert "max_message_bytes" in (info.value.details or "")
            assert ta.refused["size"] == 1
            # Same channel, same connection: the next call goes through.
            assert await tb.forward(a, Proposal(ProposalKind.COMMAND, b"ok")) == 2
            # An oversized raft batch is refused without harming later ones.
            from trio_dchan.raft.types import Entry

            huge = Message(
                MessageType.APPEND, a, b, 1, entries=(Entry(1, 1, data=b"e" * 200_000),)
            )
            tb.send([huge])
            await ta.wait_refused("size", 2)
            # Messages behind the refused batch on its stream may be lost, as
            # on any failed stream; Raft's retransmissions get through.
            await handler.resend_until_delivered(tb, _hb(b, a))
        assert handler.messages[0] == _hb(b, a)
        assert [len(p.data) for p in handler.forwards] == [2]
        assert ta.refused["size"] == 2


class _CborEcho:
    """A data-plane handler that echoes frames holding a CBOR list, refusing others."""

    def __init__(self) -> None:
        self.served: list[str] = []
        self.failed = 0

    async def serve_stream(self, peer: str, link: object) -> None:
        import cbor2

        self.served.append(peer)
        try:
            while True:
                try:
                    frame = await link.receive_frame()  # type: ignore[attr-defined]
                except trio.EndOfChannel:
                    return
                try:
                    value = cbor2.loads(frame)
                except Exception:
                    value = None
                if not isinstance(value, list):
                    self.failed += 1
                    raise DchanError("malformed data-plane frame")
                await link.send_frame(cbor2.dumps(value[::-1]))  # type: ignore[attr-defined]
        finally:
            await link.aclose()  # type: ignore[attr-defined]


async def test_garbage_on_the_data_plane_stream_is_refused() -> None:
    import cbor2

    echo = _CborEcho()
    async with transports(2, data_handlers=[echo, _CborEcho()]) as (ids, ts):
        md = {"cluster-id": "test", "node-id": ids[1]}
        path = "/dchan.v1.DataPlane/Stream"
        with trio.fail_after(10):
            # Bytes that are not a DataFrame at all.
            status, details, _ = await ts[1]._aio(raw_call)(
                ids[0], path, [b"\xff\xfe garbage"], metadata=md, stream_reply=True
            )
            assert status == "INVALID_ARGUMENT", details
            # A well-formed DataFrame whose payload the data plane rejects.
            frame = bytes(pb.DataFrame(payload=b"\x00not cbor"))
            status, details, _ = await ts[1]._aio(raw_call)(
                ids[0], path, [frame], metadata=md, stream_reply=True
            )
            assert status == "INVALID_ARGUMENT"
            assert "malformed data-plane frame" in (details or "")
            # A good stream from the same peer still works.
            link = await ts[1].open_link(ids[0])
            await link.send_frame(cbor2.dumps([1, 2, 3]))
            assert cbor2.loads(await link.receive_frame()) == [3, 2, 1]
            await link.aclose()
        assert echo.failed == 1
        assert ts[0].refused["input"] == 2


async def test_malformed_raft_batch_is_refused_and_others_are_served() -> None:
    handlers = [RecordingHandler() for _ in range(3)]
    async with transports(3, handlers=handlers) as (ids, ts):
        md = {"cluster-id": "test", "node-id": ids[1]}
        with trio.fail_after(10):
            status, _, _ = await ts[1]._aio(raw_call)(
                ids[0], "/dchan.v1.Raft/Stream", [b"\x0a\x05ab"], metadata=md
            )
            assert status == "INVALID_ARGUMENT"
            # A message whose sender is not the caller is refused too.
            spoofed = pb.RaftBatch(messages=[pb.RaftMessage(to=ids[0], sender=ids[2], term=1)])
            spoofed.messages[0].heartbeat = pb.Heartbeat(commit=1)
            status, details, _ = await ts[1]._aio(raw_call)(
                ids[0], "/dchan.v1.Raft/Stream", [bytes(spoofed)], metadata=md
            )
            assert status == "INVALID_ARGUMENT"
            assert "claims sender" in (details or "")
            # A message of no known kind.
            empty = pb.RaftBatch(messages=[pb.RaftMessage(to=ids[0], sender=ids[1], term=1)])
            status, details, _ = await ts[1]._aio(raw_call)(
                ids[0], "/dchan.v1.Raft/Stream", [bytes(empty)], metadata=md
            )
            assert status == "INVALID_ARGUMENT"
            assert "unknown kind" in (details or "")
            ts[2].send([_hb(ids[2], ids[0])])
            ts[1].send([_hb(ids[1], ids[0], 5)])
            await handlers[0].wait_for(2)
        assert sorted(m.commit for m in handlers[0].messages) == [1, 5]
