"""Data-plane links over gRPC: frames both ways, ends, resets, shutdown."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from transport_helpers import RecordingHandler, address_of, bound_socket, transports

from trio_dchan.raft.transport import Proposal, ProposalKind, Unavailable
from trio_dchan.raft.types import Message, MessageType
from trio_dchan.transport import MessageTooLarge, TransportSettings, open_transport


class Echo:
    """Answers every frame with the frame reversed; records how each stream ended."""

    def __init__(self) -> None:
        self.ended: list[str] = []
        self.changed = trio.Event()

    def _note(self, how: str) -> None:
        self.ended.append(how)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_ended(self, count: int) -> None:
        while len(self.ended) < count:
            await self.changed.wait()

    async def serve_stream(self, peer: str, link: object) -> None:
        try:
            while True:
                try:
                    frame = await link.receive_frame()  # type: ignore[attr-defined]
                except trio.EndOfChannel:
                    self._note("end")
                    return
                await link.send_frame(frame[::-1])  # type: ignore[attr-defined]
        except trio.BrokenResourceError:
            self._note("broken")
        except trio.Cancelled:
            self._note("cancelled")
            raise


async def test_frames_flow_both_ways_and_close_cleanly() -> None:
    echo = Echo()
    async with transports(2, data_handlers=[echo, Echo()]) as (ids, ts):
        with trio.fail_after(10):
            link = await ts[1].open_link(ids[0])
            for i in range(50):
                await link.send_frame(b"frame-%d" % i)
            got = [await link.receive_frame() for _ in range(50)]
            assert got == [(b"frame-%d" % i)[::-1] for i in range(50)]
            await link.aclose()
            await echo.wait_ended(1)
            assert echo.ended == ["end"]
            with pytest.raises(trio.ClosedResourceError):
                await link.send_frame(b"after close")


async def test_frames_of_every_size_keep_order_and_content() -> None:
    # Sizes around the gRPC prefix, the default 16 KiB HTTP/2 frame, the
    # 64 KiB initial window and past the 4 MiB window: frames that arrive
    # whole, in pieces, or after a wait for WINDOW_UPDATE, sent back to back
    # so that several sit in the receiver's buffer at once.
    sizes = [0, 1, 4, 5, 127, 128, 16_379, 16_384, 65_535, 70_000, 1 << 20, 3_000_000, 2]
    frames = [bytes([i]) * n + b"#%d" % i for i, n in enumerate(sizes * 2)]
    async with transports(2, data_handlers=[Echo(), Echo()]) as (ids, ts):
        with trio.fail_after(20):
            link = await ts[1].open_link(ids[0])
            got: list[bytes] = []

            async def read_all() -> None:
                for _ in frames:
                    got.append(await link.receive_frame())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                for frame in frames:
                    await link.send_frame(frame)
            assert got == [f[::-1] for f in frames]
            await link.aclose()


class Abandon:
    """Echoes one frame, then (once told to) abandons the stream with a cancelled receive."""

    def __init__(self) -> None:
        self.go = trio.Event()

    async def serve_stream(self, peer: str, link: object) -> None:
        frame = await link.receive_frame()  # type: ignore[attr-defined]
        await link.send_frame(frame)  # type: ignore[attr-defined]
        await self.go.wait()
        with trio.CancelScope() as scope:
            scope.cancel()
            await link.receive_frame()  # type: ignore[attr-defined]


async def test_client_waiting_for_a_frame_sees_the_server_reset_the_stream() -> None:
    abandon = Abandon()
    async with transports(2, data_handlers=[abandon, Abandon()]) as (ids, ts):
        with trio.fail_after(10):
            link = await ts[1].open_link(ids[0])
            await link.send_frame(b"x")
            assert await link.receive_frame() == b"x"
            outcome: list[BaseException] = []

            async def wait_for_frame() -> None:
                try:
                    await link.receive_frame()
                except trio.BrokenResourceError as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_for_frame)
                # Both nodes run in this process: once everything is idle the
                # client is parked waiting for bytes.
                await trio.testing.wait_all_tasks_blocked()
                abandon.go.set()
            assert len(outcome) == 1
            await link.aclose()


async def test_server_ending_the_stream_gives_end_of_channel() -> None:
    class OneShot:
        async def serve_stream(self, peer: str, link: object) -> None:
            frame = await link.receive_frame()  # type: ignore[attr-defined]
            await link.send_frame(b"ack:" + frame)  # type: ignore[attr-defined]

    async with transports(2, data_handlers=[OneShot(), OneShot()]) as (ids, ts):
        with trio.fail_after(10):
            link = await ts[1].open_link(ids[0])
            await link.send_frame(b"x")
            assert await link.receive_frame() == b"ack:x"
            with pytest.raises(trio.EndOfChannel):
                await link.receive_frame()
            await link.aclose()


async def test_cancelled_receive_resets_the_stream_and_the_server_handler_ends() -> None:
    echo = Echo()
    async with transports(2, data_handlers=[echo, Echo()]) as (ids, ts):
        with trio.fail_after(10):
            link = await ts[1].open_link(ids[0])
            await link.send_frame(b"a")
            assert await link.receive_frame() == b"a"
            with trio.move_on_after(0.05):
                await link.receive_frame()  # nothing comes: cancelled
            # The stream was reset: the server's handler does not hang on.
            await echo.wait_ended(1)
            assert echo.ended[0] in ("broken", "cancelled")
            with pytest.raises(trio.BrokenResourceError):
                await link.send_frame(b"b")
            await link.aclose()


async def test_cancelled_forward_resets_the_call_on_the_server() -> None:
    started = trio.Event()
    finished = trio.Event()

    class Slow(RecordingHandler):
        async def handle_forward(self, proposal: Proposal) -> object:
            started.set()
            try:
                await trio.sleep_forever()
            finally:
                finished.set()

    async with transports(2, handlers=[Slow(), Slow()]) as (ids, ts):
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    await ts[1].forward(ids[0], Proposal(ProposalKind.COMMAND, b"x"))

                nursery.start_soon(call)
                await started.wait()
                nursery.cancel_scope.cancel()
            await finished.wait()


async def test_oversized_frame_is_refused_locally() -> None:
    settings = TransportSettings(max_message_bytes=4096)
    async with transports(2, data_handlers=[Echo(), Echo()], settings=settings) as (ids, ts):
        with trio.fail_after(10):
            link = await ts[1].open_link(ids[0])
            with pytest.raises(MessageTooLarge):
                await link.send_frame(b"x" * 5000)
            await link.send_frame(b"fits")
            assert await link.receive_frame() == b"stif"
            await link.aclose()


async def test_frames_in_pieces_and_larger_than_the_flow_control_window() -> None:
    settings = TransportSettings(flow_control_window=65_535)
    async with transports(2, data_handlers=[Echo(), Echo()], settings=settings) as (ids, ts):
        with trio.fail_after(20):
            link = await ts[1].open_link(ids[0])
            big = bytes(range(256)) * 1024  # 256 KiB: four windows' worth
            for _ in range(3):
                await link.send_frame([big[:1000], big[1000:5000], big[5000:]])
                assert await link.receive_frame() == big[::-1]
            await link.aclose()
    with pytest.raises(ValueError, match="flow_control_window"):
        TransportSettings(flow_control_window=1024)


async def test_shutdown_ends_open_client_streams() -> None:
    """Closing a node must not leave its peers' streams hanging."""
    echo = Echo()
    b_sock = bound_socket()
    b = address_of(b_sock)
    async with trio.open_nursery() as nursery:
        a_sock = bound_socket()
        a = address_of(a_sock)
        stop_a = trio.Event()
        a_ready = trio.Event()

        async def run_a() -> None:
            async with open_transport(a, a, cluster_id="k", peers={b: b}, sock=a_sock) as ta:
                ta.attach(data_handler=echo)
                a_ready.set()
                await stop_a.wait()

        nursery.start_soon(run_a)
        await a_ready.wait()
        async with open_transport(b, b, cluster_id="k", peers={a: a}, sock=b_sock) as tb:
            with trio.fail_after(10):
                link = await tb.open_link(a)
                await link.send_frame(b"hi")
                assert await link.receive_frame() == b"ih"
                stop_a.set()
                with pytest.raises((trio.BrokenResourceError, trio.EndOfChannel)):
                    await link.receive_frame()
                await link.aclose()
                with pytest.raises(Unavailable) as info:
                    await tb.forward(a, Proposal(ProposalKind.COMMAND, b"x"))
                assert not info.value.maybe_delivered


async def test_peer_restart_is_reconnected_with_backoff() -> None:
    """Raft traffic resumes by itself once a peer comes back on its address."""
    handler = RecordingHandler()
    a_sock, b_sock = bound_socket(), bound_socket()
    a, b = address_of(a_sock), address_of(b_sock)
    port = a_sock.getsockname()[1]
    async with open_transport(b, b, cluster_id="k", peers={a: a}, sock=b_sock) as tb:
        with trio.fail_after(20):
            async with open_transport(
                a, a, cluster_id="k", peers={b: b}, sock=a_sock, raft_handler=handler
            ):
                hb = Message(MessageType.HEARTBEAT, a, b, 1, commit=1)
                await handler.resend_until_delivered(tb, hb)
            # a is down: sends never block or raise; calls fail fast and back off.
            for i in range(100):
                tb.send([Message(MessageType.HEARTBEAT, a, b, 1, commit=2 + i)])
            with pytest.raises(Unavailable) as info:
                await tb.forward(a, Proposal(ProposalKind.COMMAND, b"x"))
            assert not info.value.maybe_delivered
            assert tb.statistics()[a]["failures"] >= 1
            a_sock2 = bound_socket_on(port)
            async with open_transport(
                a, a, cluster_id="k", peers={b: b}, sock=a_sock2, raft_handler=handler
            ):
                hb = Message(MessageType.HEARTBEAT, a, b, 1, commit=99)
                await handler.resend_until_delivered(tb, hb)
            assert handler.messages[-1].commit == 99


def bound_socket_on(port: int) -> object:
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def test_connections_are_tuned_for_large_data_frames() -> None:
    from trio_dchan.transport import _grpc

    async with transports(2, data_handlers=[Echo(), Echo()]) as (ids, ts):
        with trio.fail_after(10):
            link = await ts[1].open_link(ids[0])
            big = bytes(range(256)) * 4096  # 1 MiB
            await link.send_frame(big)
            back = await link.receive_frame()
            assert back == big[::-1]
            # It came in one DATA frame, and is handed out as a view of it: no copy.
            assert isinstance(back, memoryview)
            channel = ts[1]._peers[ids[0]].channel
            assert channel is not None
            assert channel._protocol is not None
            h2 = channel._protocol.connection._connection
            # Both ends announced large frames and each read the other's SETTINGS.
            assert h2.max_outbound_frame_size == _grpc.LARGE_FRAME_BYTES
            assert h2.max_inbound_frame_size == _grpc.LARGE_FRAME_BYTES
            assert isinstance(h2.incoming_buffer, _grpc._QuietFrameBuffer)
            await link.aclose()
