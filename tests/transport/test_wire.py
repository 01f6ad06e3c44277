"""The protobuf form of Raft messages: lossless for what the core sends, strict on input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_dchan._proto.dchan import v1 as pb
from trio_dchan.raft.sim import NetworkConfig, Simulator
from trio_dchan.raft.types import Message
from trio_dchan.transport import PeerProtocolError
from trio_dchan.transport._errors_wire import error_from_pb, error_to_pb
from trio_dchan.transport._grpc import _recv
from trio_dchan.transport._strict import check_wire
from trio_dchan.transport._wire import batch_from_pb, message_from_pb, message_to_pb


def _round_trip(m: Message) -> Message:
    raw = bytes(pb.RaftBatch(messages=[message_to_pb(m)]))
    check_wire(raw, pb.RaftBatch)
    (back,) = batch_from_pb(pb.RaftBatch.parse(raw), caller=m.sender, me=m.to)
    return back


@pytest.mark.parametrize("seed", range(4))
def test_every_message_the_core_sends_survives_the_wire(seed: int) -> None:
    """Run the simulator (elections, appends, snapshots, transfers) through the codec."""
    seen: set[str] = set()
    mismatches: list[tuple[Message, Message]] = []

    def check(m: Message) -> None:
        seen.add(m.type.name)
        back = _round_trip(m)
        if back != m:
            mismatches.append((m, back))

    sim = Simulator(
        3,
        seed,
        net=NetworkConfig(drop=0.05),
        snapshot_every=20,
        config={"snapshot_chunk_size": 64},
    )
    sim.on_send = check
    leader = sim.wait_leader()
    for i in range(120):
        sim.propose(sim.leader() or leader, b"cmd-%d" % i)
        sim.run_ticks(1)
    follower = next(n for n in sim.alive() if n != sim.leader())
    sim.crash(follower)
    for i in range(60):
        sim.propose(sim.leader() or leader, b"more-%d" % i)
        sim.run_ticks(1)
    sim.restart(follower)
    sim.run_ticks(200)
    current = sim.wait_leader()
    target = next(n for n in sim.alive() if n != current)
    sim.core(current).transfer_leadership(target)
    sim.run_ticks(100)
    assert not mismatches, mismatches[:3]
    assert {"APPEND", "APPEND_RESP", "HEARTBEAT", "SNAPSHOT"} <= seen


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_peer_protocol_error(data: bytes) -> None:
    for cls in (pb.RaftBatch, pb.DataFrame, pb.ProposeRequest, pb.RaftMessage):
        try:
            check_wire(data, cls)
            parsed = cls.parse(data)
            if isinstance(parsed, pb.RaftBatch):
                batch_from_pb(parsed, caller="a", me="b")
            elif isinstance(parsed, pb.RaftMessage):
                message_from_pb(parsed)
        except PeerProtocolError:
            pass


def test_lenient_parser_inputs_are_refused() -> None:
    # Each of these parses without error in betterproto2 0.10.
    for raw in (b"\x08\x01", b"\x0a\x05ab", b"\xff\xff\xff"):
        with pytest.raises(PeerProtocolError):
            check_wire(raw, pb.DataFrame)


async def test_size_limit_is_checked_before_the_body_is_read() -> None:
    class Stream:
        def __init__(self) -> None:
            self.reads: list[int] = []

        async def recv_data(self, size: int) -> bytes:
            self.reads.append(size)
            return b"\x00" + (10_000_000).to_bytes(4, "big") if size == 5 else b""

    stream = Stream()
    from trio_dchan.transport import MessageTooLarge

    with pytest.raises(MessageTooLarge):
        await _recv(stream, pb.DataFrame, 1024)
    assert stream.reads == [5]


def test_errors_keep_their_type_and_attributes() -> None:
    from trio_dchan.raft.errors import NotLeader, UnknownNode
    from trio_dchan.raft.transport import Unavailable
    from trio_dchan.transport import RemoteCallError

    back = error_from_pb("p", error_to_pb(NotLeader("n2")))
    assert isinstance(back, NotLeader)
    assert back.leader == "n2"
    back = error_from_pb("p", error_to_pb(UnknownNode("n9")))
    assert isinstance(back, UnknownNode)
    assert str(back) == str(UnknownNode("n9"))
    back = error_from_pb("p", error_to_pb(Unavailable("x", "down")))
    assert isinstance(back, Unavailable)
    assert back.maybe_delivered
    back = error_from_pb("p", pb.RemoteError(kind="KeyError", message="boom"))
    assert isinstance(back, RemoteCallError)
    back = error_from_pb("p", pb.RemoteError(kind="NotLeader", attributes=b"\xff"))
    assert isinstance(back, RemoteCallError)


@pytest.mark.parametrize(
    "attributes",
    [
        {},  # NotLeader without its leader
        {"args": 5},  # not one of its attributes (and setting it would raise)
        {"leader": None, "args": 5},
        {"leader": "n2", "__class__": "x"},
    ],
)
def test_an_error_is_rebuilt_only_with_the_attributes_its_class_has(
    attributes: dict[str, object],
) -> None:
    import cbor2

    from trio_dchan.raft.errors import NotLeader
    from trio_dchan.transport import RemoteCallError

    err = pb.RemoteError(kind="NotLeader", message="m", attributes=cbor2.dumps(attributes))
    back = error_from_pb("p", err)
    if "leader" in attributes:
        assert isinstance(back, NotLeader)
        assert back.leader == attributes["leader"]
        assert set(vars(back)) == {"leader"}
    else:
        assert isinstance(back, RemoteCallError)


async def test_grpclib_lost_connection_race_is_reported_as_a_connection_error() -> None:
    from trio_dchan.transport._grpc import lost_connection_as_oserror

    @lost_connection_as_oserror
    async def lost() -> None:
        raise AttributeError("'Connection' object has no attribute '_transport'")

    @lost_connection_as_oserror
    async def bug() -> None:
        raise AttributeError("'NoneType' object has no attribute 'x'")

    with pytest.raises(ConnectionResetError):
        await lost()
    with pytest.raises(AttributeError):
        await bug()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_hand_encoded_data_frame_is_what_grpclib_would_send(payload: bytes) -> None:
    from trio_dchan.transport._grpc import data_frame_head, decode_data_frame

    data = data_frame_head(len(payload)) + payload
    body = bytes(pb.DataFrame(payload=payload))
    assert data == b"\x00" + len(body).to_bytes(4, "big") + body
    assert decode_data_frame(data[5:], pb.DataFrame) == payload


def test_hand_encoded_data_frame_varint_lengths() -> None:
    from trio_dchan.transport._grpc import data_frame_head, decode_data_frame

    for size in (127, 128, 16383, 16384, 2_000_000):
        payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        data = data_frame_head(len(payload)) + payload
        assert data[5:] == bytes(pb.DataFrame(payload=payload))
        assert decode_data_frame(data[5:], pb.DataFrame) == payload


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_hand_decoded_data_frame_agrees_with_the_strict_parser(data: bytes) -> None:
    from trio_dchan.transport._grpc import decode_data_frame

    try:
        check_wire(data, pb.DataFrame)
        expected: bytes | None = pb.DataFrame.parse(data).payload
    except (PeerProtocolError, Exception):
        expected = None
    if expected is None:
        with pytest.raises(PeerProtocolError):
            decode_data_frame(data, pb.DataFrame)
    else:
        assert decode_data_frame(data, pb.DataFrame) == expected


def test_hand_decoder_refuses_what_the_strict_check_refuses() -> None:
    from trio_dchan.transport._grpc import decode_data_frame

    # Wrong wire type, a length running past the end, junk, a truncated varint.
    for raw in (b"\x08\x01", b"\x0a\x05ab", b"\xff\xff\xff", b"\x0a\x80"):
        with pytest.raises(PeerProtocolError):
            decode_data_frame(raw, pb.DataFrame)
    # Unknown fields around the payload are skipped, like the parser does.
    assert decode_data_frame(b"\x10\x01\x0a\x02ab", pb.DataFrame) == b"ab"
