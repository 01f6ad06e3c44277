"""The data-plane frame format (private to the data plane).

A frame is a sequence of records; each record is a kind byte followed by a
fixed header and, for some kinds, variable data. All integers are unsigned
big-endian. Sending node -> receiving node:

* ``BATCH``  ``u64 first_seq, u32 count, u16 rid_len, u32 payload_len, rid, payload``:
  ``count`` messages for receiver ``rid``; ``payload`` is the codec's batch
  encoding (``join_encoded``). Messages on a stream are numbered from 1 in
  the order sent, without gaps.
* ``WANT``   ``u32 n, u16 rid_len, rid``: the sender would like up to ``n``
  credits outstanding for ``rid`` (replaces any earlier want).
* ``RETURN`` ``u32 n, u16 rid_len, rid``: the sender gives back ``n`` unused
  credits for ``rid`` and wants no more until its next ``WANT``.

Receiving node -> sending node:

* ``CREDIT`` ``u32 n, u16 rid_len, rid``: ``n`` more messages may be sent to ``rid``.
* ``REFUSE`` ``u64 first_seq, u32 count, u8 reason``: those messages were not
  placed in any buffer (see :class:`Refusal`).
* ``ACK``    ``u64 upto``: every message up to ``upto`` was handled: placed in
  a buffer unless an earlier ``REFUSE`` record named it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import PeerProtocolError

BATCH = 1
WANT = 2
RETURN = 3
CREDIT = 10
REFUSE = 11
ACK = 12

_BATCH = struct.Struct(">BQIHI")
_RID_N = struct.Struct(">BIH")
_REFUSE = struct.Struct(">BQIB")
_ACK = struct.Struct(">BQ")

#: Bytes a BATCH record adds around its receiver id and payload.
BATCH_OVERHEAD = _BATCH.size
MAX_RID_BYTES = 0xFFFF


class Refusal(enum.IntEnum):
    """Why a receiving node did not place messages (they are in no buffer)."""

    #: The receiver is unknown here or closed: the sender may try another one.
    NO_RECEIVER = 1
    #: More messages than granted credit: the sender may try again.
    NO_CREDIT = 2
    #: The batch could not be decoded: retrying cannot help.
    INVALID = 3


@dataclass(frozen=True, slots=True)
class Batch:
    first_seq: int
    count: int
    rid: str
    #: A view into the frame (no copy until the codec takes it).
    payload: memoryview


@dataclass(frozen=True, slots=True)
class RidCount:
    kind: int
    rid: str
    n: int


@dataclass(frozen=True, slots=True)
class Refuse:
    first_seq: int
    count: int
    reason: Refusal


@dataclass(frozen=True, slots=True)
class Ack:
    upto: int


Record = Batch | RidCount | Refuse | Ack


def batch(first_seq: int, count: int, rid: bytes, payload: bytes) -> bytes:
    return batch_header(first_seq, count, rid, len(payload)) + payload


def batch_header(first_seq: int, count: int, rid: bytes, payload_len: int) -> bytes:
    """A BATCH record up to its payload (which must follow, ``payload_len`` bytes)."""
    return _BATCH.pack(BATCH, first_seq, count, len(rid), payload_len) + rid


def rid_count(kind: int, rid: str, n: int) -> bytes:
    raw = rid.encode("utf-8")
    return _RID_N.pack(kind, n, len(raw)) + raw


def refuse(first_seq: int, count: int, reason: Refusal) -> bytes:
    return _REFUSE.pack(REFUSE, first_seq, count, int(reason))


def ack(upto: int) -> bytes:
    return _ACK.pack(ACK, upto)


def _rid(data: bytes | memoryview, start: int, size: int) -> str:
    if start + size > len(data):
        raise PeerProtocolError("record truncated in its receiver id")
    try:
        return str(data[start : start + size], "utf-8")
    except UnicodeDecodeError:
        raise PeerProtocolError("receiver id is not valid UTF-8") from None


def parse(frame: bytes | memoryview, allowed: frozenset[int]) -> Iterator[Record]:
    """Yield the records of ``frame``; :class:`PeerProtocolError` on anything malformed.

    ``allowed`` is the set of record kinds valid in this direction.
    """
    if not frame:
        raise PeerProtocolError("empty data-plane frame")
    pos = 0
    end = len(frame)
    view = memoryview(frame)
    while pos < end:
        kind = frame[pos]
        if kind not in allowed:
            raise PeerProtocolError(f"unexpected data-plane record kind {kind}")
        if kind == BATCH:
            if pos + _BATCH.size > end:
                raise PeerProtocolError("BATCH record truncated")
            _, first, count, rlen, plen = _BATCH.unpack_from(frame, pos)
            pos += _BATCH.size
            rid = _rid(frame, pos, rlen)
            pos += rlen
            if pos + plen > end:
                raise PeerProtocolError("BATCH payload truncated")
            if count == 0 or first == 0:
                raise PeerProtocolError("BATCH record with no messages or sequence 0")
            yield Batch(first, count, rid, view[pos : pos + plen])
            pos += plen
        elif kind in (WANT, RETURN, CREDIT):
            if pos + _RID_N.size > end:
                raise PeerProtocolError("record truncated")
            _, n, rlen = _RID_N.unpack_from(frame, pos)
            pos += _RID_N.size
            rid = _rid(frame, pos, rlen)
            pos += rlen
            yield RidCount(kind, rid, n)
        elif kind == REFUSE:
            if pos + _REFUSE.size > end:
                raise PeerProtocolError("REFUSE record truncated")
            _, first, count, reason = _REFUSE.unpack_from(frame, pos)
            pos += _REFUSE.size
            try:
                why = Refusal(reason)
            except ValueError:
                raise PeerProtocolError(f"unknown refusal reason {reason}") from None
            if count == 0 or first == 0:
                raise PeerProtocolError("REFUSE record with no messages or sequence 0")
            yield Refuse(first, count, why)
        else:  # ACK
            if pos + _ACK.size > end:
                raise PeerProtocolError("ACK record truncated")
            _, upto = _ACK.unpack_from(frame, pos)
            pos += _ACK.size
            yield Ack(upto)


TO_RECEIVER = frozenset({BATCH, WANT, RETURN})
TO_SENDER = frozenset({CREDIT, REFUSE, ACK})
