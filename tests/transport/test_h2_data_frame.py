"""The DATA-frame paths that skip h2's copies behave exactly as h2's own."""

from __future__ import annotations

import random
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame, HeadersFrame, PingFrame

from trio_dchan.transport._grpc import _QuietFrameBuffer, take_view, write_data_frame


class _Capture:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data


def _connection() -> H2Connection:
    client = H2Connection(H2Configuration(client_side=True))
    server = H2Connection(H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.update_settings({SettingCodes.MAX_FRAME_SIZE: 1 << 20})
    client.receive_data(server.data_to_send())
    client.send_headers(
        1, [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "a")]
    )
    client.increment_flow_control_window(1 << 22)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    # Something h2 queued and has not handed out yet must still go first.
    client.ping(b"12345678")
    return client


def _state(h2: Any) -> tuple[int, int, object]:
    return (
        h2.outbound_flow_control_window,
        h2.streams[1].outbound_flow_control_window,
        h2.streams[1].state_machine.state,
    )


@pytest.mark.parametrize("size", [0, 1, 9_000, 60_000])
def test_same_bytes_and_state_as_h2_send_data(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    theirs, ours = _connection(), _connection()
    theirs.send_data(1, data)
    expected = theirs.data_to_send()
    out = _Capture()
    write_data_frame(ours, out, 1, [data[:7], data[7:]], len(data))
    assert bytes(out.written) == expected
    assert _state(ours) == _state(theirs)
    assert ours.data_to_send() == b""


def _frames(buffer: Any, wire: bytes, chunks: list[int]) -> list[tuple[Any, ...]]:
    out = []
    pos = 0
    for size in [*chunks, len(wire)]:
        buffer.add_data(wire[pos : pos + size])
        pos += size
        for frame in buffer:
            out.append(
                (
                    frame.type,
                    frame.stream_id,
                    sorted(frame.flags),
                    getattr(frame, "data", None),
                    getattr(frame, "flow_controlled_length", None),
                    frame.body_len,
                )
            )
        if pos >= len(wire):
            break
    return out


@pytest.mark.parametrize("seed", range(5))
def test_quick_data_frame_parsing_matches_h2(seed: int) -> None:
    rng = random.Random(seed)
    parts = []
    for i in range(30):
        kind = rng.choice(["data", "data", "padded", "ping", "headers"])
        if kind == "ping":
            parts.append(PingFrame(0, opaque_data=b"%08d" % i).serialize())
        elif kind == "headers":
            parts.append(HeadersFrame(3, data=b"\x82", flags=["END_HEADERS"]).serialize())
        else:
            frame = DataFrame(1 + 2 * rng.randrange(3), data=rng.randbytes(rng.randrange(0, 3000)))
            if kind == "padded":
                frame.flags.add("PADDED")
                frame.pad_length = rng.randrange(0, 20)
            if rng.random() < 0.2:
                frame.flags.add("END_STREAM")
            parts.append(frame.serialize())
    wire = b"".join(parts)
    chunks = [rng.randrange(1, 4000) for _ in range(len(wire) // 500)]
    theirs, ours = FrameBuffer(), _QuietFrameBuffer()
    for b in (theirs, ours):
        b.max_frame_size = 16384
    expected = _frames(theirs, wire, chunks)
    got = _frames(ours, wire, chunks)
    assert got == expected
    assert len(got) == len(parts)


def _drive(coro: Any) -> Any:
    """Run a grpclib buffer read that has its bytes queued (it never suspends)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the read suspended")


def test_take_view_hands_out_the_rest_of_a_data_frame_without_copying() -> None:
    from types import SimpleNamespace

    from grpclib.protocol import Buffer

    acked: list[int] = []
    buffer = Buffer(acked.append)
    stream = SimpleNamespace(_stream=SimpleNamespace(buffer=buffer))
    # Two gRPC messages in one DATA frame, a third in the next one.
    one, two, three = (
        b"\x00\x00\x00\x00\x03abc",
        b"\x00\x00\x00\x00\x02de",
        b"\x00\x00\x00\x00\x01f",
    )
    buffer.add(one + two, len(one + two))
    buffer.add(three, len(three))
    assert _drive(buffer.read(5)) == one[:5]
    body = take_view(stream, 3)
    assert isinstance(body, memoryview)
    assert body == b"abc"
    assert _drive(buffer.read(5)) == two[:5]
    assert take_view(stream, 2) == b"de"  # the last of the first frame
    assert take_view(stream, 5) is None  # the third frame is not taken yet: nothing read
    assert _drive(buffer.read(6)) == three
    assert take_view(stream, 1) is None
    assert acked == [len(one + two), len(three)]
    assert buffer._acked_size == 0
