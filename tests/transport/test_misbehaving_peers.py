"""Peers that refuse, flood or stop: the node reports a failure and goes on.

A snapshot stream or a data link the peer refuses ends in a logged link
failure, not in an exception that takes the node down. A client that never
finishes a header block loses its connection before it can park much memory.
A peer that stops reading (a stopped process) cannot hold a cancelled send or
the transport's shutdown.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import textwrap

import pytest
import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from hyperframe.frame import ContinuationFrame, HeadersFrame
from transport_helpers import RecordingHandler, address_of, bound_socket, transports

from trio_dchan.raft.types import ConfState, Message, MessageType, SnapshotMeta
from trio_dchan.transport import TransportSettings, open_transport
from trio_dchan.transport._grpc import LARGE_FRAME_BYTES, MAX_HEADER_BLOCK_BYTES


def _first_chunk(sender: str, to: str) -> Message:
    return Message(
        MessageType.SNAPSHOT,
        to,
        sender,
        1,
        snapshot=SnapshotMeta(5, 1, ConfState(voters=frozenset({sender, to}))),
        snapshot_offset=0,
        snapshot_data=b"part one",
        snapshot_done=False,  # the next chunk would follow the follower's answer
    )


@pytest.mark.parametrize("refusal", ["no raft handler", "another node at the address"])
async def test_a_refused_snapshot_stream_is_a_link_failure(refusal: str) -> None:
    # The peer answers the stream with an error status and resets it while
    # the sender waits for the next chunk; ending the stream must then report
    # the peer's status, not raise h2's StreamClosedError out of the node.
    settings = TransportSettings(send_timeout=0.3)
    a_sock, b_sock = bound_socket(), bound_socket()
    a, b = address_of(a_sock), address_of(b_sock)
    if refusal == "no raft handler":
        b_id, b_handler = b, None
    else:
        b_id, b_handler = "replacement-of-b", RecordingHandler()
    async with (
        open_transport(b_id, b, cluster_id="k", peers={a: a}, sock=b_sock, raft_handler=b_handler),
        open_transport(a, a, cluster_id="k", peers={b: b}, sock=a_sock, settings=settings) as ta,
    ):
        ta.send([_first_chunk(a, b)])
        with trio.fail_after(10):
            while ta.statistics()[b]["failures"] == 0:  # noqa: ASYNC110 - a counter, no event
                await trio.sleep(0.01)
        assert ta.statistics()[b]["snapshot_chunks"] == 1


class _Closer:
    async def serve_stream(self, peer: str, link: object) -> None:
        await link.aclose()  # type: ignore[attr-defined]


async def test_closing_a_refused_data_link_and_the_transport() -> None:
    # A data link to a node of another cluster is refused at once (status and
    # RST_STREAM). Closing it, and then the transport, must not raise.
    a_sock, b_sock = bound_socket(), bound_socket()
    a, b = address_of(a_sock), address_of(b_sock)
    async with (
        open_transport(
            a, a, cluster_id="one", peers={b: b}, sock=a_sock, data_handler=_Closer()
        ) as ta,
        open_transport(b, b, cluster_id="other", peers={a: a}, sock=b_sock) as tb,
    ):
        with trio.fail_after(10):
            first = await tb.open_link(a)
            second = await tb.open_link(a)
            await ta.wait_refused("cluster", 2)
            while first._stream._wrapper._error is None:  # noqa: ASYNC110 - grpclib state
                await trio.sleep(0.01)
            await first.aclose()
        # `second` is still open: the transport closes it on the way out.
        del second


async def test_an_endless_header_block_loses_its_connection_only() -> None:
    # Our connections accept 4 MiB frames; h2 would hold up to 64 frames of
    # an unfinished header block, so one client could park 256 MiB before
    # any cluster check. The block is refused past MAX_HEADER_BLOCK_BYTES.
    handlers = [RecordingHandler() for _ in range(2)]
    async with transports(2, handlers=handlers) as (ids, ts):
        host, port = ids[0].rsplit(":", 1)
        with trio.fail_after(20):
            client = await trio.open_tcp_stream(host, int(port))
            h2 = H2Connection(H2Configuration(client_side=True))
            h2.initiate_connection()
            await client.send_all(h2.data_to_send())
            while h2.max_outbound_frame_size < LARGE_FRAME_BYTES:
                data = await client.receive_some(65536)
                assert data
                h2.receive_data(data)
                await client.send_all(h2.data_to_send())
            head = HeadersFrame(1)
            head.data = b"\x82"
            await client.send_all(head.serialize())
            closed = False
            try:
                # Frames of h2's default size, well past the block limit.
                for _ in range(2 * MAX_HEADER_BLOCK_BYTES // 16_000 + 1):
                    more = ContinuationFrame(1)
                    more.data = b"\x00" * 16_000
                    await client.send_all(more.serialize())
                # The server answers with GOAWAY and closes: read to the end.
                while await client.receive_some(65536):
                    pass
                closed = True
            except trio.BrokenResourceError:
                closed = True
            finally:
                await client.aclose()
            assert closed
            # The node serves its peers as before.
            ts[1].send([Message(MessageType.HEARTBEAT, ids[0], ids[1], 1, commit=1)])
            await handlers[0].wait_for(1)


_STOPPABLE_PEER = textwrap.dedent(
    """
    import socket, sys
    import trio
    from trio_dchan.transport import TransportSettings, open_transport

    class Reader:
        async def serve_stream(self, peer, link):
            try:
                while True:
                    await link.receive_frame()
            except (trio.EndOfChannel, trio.BrokenResourceError):
                pass

    async def main():
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.bind(("127.0.0.1", 0))
        me = "%s:%d" % sock.getsockname()
        async with open_transport(
            me, me, cluster_id="stop", sock=sock, data_handler=Reader(),
            is_member=lambda node: True,
            settings=TransportSettings(flow_control_window=2**31 - 1),
        ):
            print(me, flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
async def test_a_stopped_peer_holds_neither_a_cancelled_send_nor_shutdown() -> None:
    # The peer process is stopped while we stream 1 MiB frames to it: the
    # socket stops taking data. Cancelling the blocked send, and leaving the
    # transport, must return at once, not when TCP gives up minutes later.
    # (A node that hangs is unstuck by killing the peer, and the test fails.)
    settings = TransportSettings(close_timeout=0.5, send_timeout=1.0)
    frame = b"x" * (1 << 20)
    took: dict[str, float] = {}
    done = trio.Event()

    async def node(peer: str) -> None:
        sock = bound_socket()
        me = address_of(sock)
        async with open_transport(
            me, me, cluster_id="stop", peers={peer: peer}, sock=sock, settings=settings
        ) as t:
            link = await t.open_link(peer)
            idle = await t.open_link(peer)  # left open, for the way out
            await link.send_frame(b"hello")
            await idle.send_frame(b"hello")
            os.kill(proc.pid, signal.SIGSTOP)
            while True:
                # Once the socket stops taking data, a send blocks.
                t0 = trio.current_time()
                with trio.move_on_after(0.5) as blocked:
                    await link.send_frame(frame)
                if blocked.cancelled_caught:
                    took["cancel"] = trio.current_time() - t0 - 0.5
                    break
            with pytest.raises(trio.BrokenResourceError):
                await link.send_frame(b"after the cancel")
            left_at = trio.current_time()
        took["leave"] = trio.current_time() - left_at
        done.set()

    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            functools.partial(
                trio.run_process, [sys.executable, "-c", _STOPPABLE_PEER], stdout=-1, check=False
            )
        )
        try:
            assert proc.stdout is not None
            line = b""
            with trio.fail_after(20):
                while not line.endswith(b"\n"):
                    line += await proc.stdout.receive_some(100)
            nursery.start_soon(node, line.decode().strip())
            with trio.move_on_after(30):
                await done.wait()
        finally:
            proc.kill()
        with trio.fail_after(30):
            await done.wait()
    assert took["cancel"] < 2, took
    assert took["leave"] < 2, took
