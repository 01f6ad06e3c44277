"""Conversions between the Raft records and their protobuf form.

Everything that comes from a peer is untrusted: the decoders check every
field they rely on and raise :class:`PeerProtocolError`, never anything else.
Log entries travel packed in one ``bytes`` field (a fixed header per entry
plus its data) because the protobuf runtime parses repeated fields in pure
Python at a few microseconds per element.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from trio_dchan._proto.dchan import v1 as pb
from trio_dchan.raft.types import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    NodeId,
    SnapshotMeta,
)

from .errors import PeerProtocolError

# term u64, index u64, type u8, data length u32 (big endian).
_ENTRY_HEADER = struct.Struct(">QQBI")
_MAX_U64 = (1 << 64) - 1
_ENTRY_TYPES = frozenset(int(t) for t in EntryType)


def pack_entries(entries: Sequence[Entry]) -> bytes:
    """Pack entries into the ``AppendEntries.entries`` layout."""
    header = _ENTRY_HEADER.pack
    parts: list[bytes] = []
    append = parts.append
    for entry in entries:
        append(header(entry.term, entry.index, int(entry.type), len(entry.data)))
        append(entry.data)
    return b"".join(parts)


def unpack_entries(data: bytes, count: int) -> tuple[Entry, ...]:
    """Inverse of :func:`pack_entries`; ``count`` must match exactly."""
    view = memoryview(data)
    size = len(data)
    offset = 0
    header_size = _ENTRY_HEADER.size
    unpack = _ENTRY_HEADER.unpack_from
    out: list[Entry] = []
    append = out.append
    entry_type = EntryType
    for _ in range(count):
        if offset + header_size > size:
            raise PeerProtocolError("packed entries are truncated")
        term, index, kind, length = unpack(view, offset)
        offset += header_size
        end = offset + length
        if end > size:
            raise PeerProtocolError("packed entry data is truncated")
        if kind not in _ENTRY_TYPES:
            raise PeerProtocolError(f"unknown entry type {kind}")
        append(Entry(term, index, entry_type(kind), bytes(view[offset:end])))
        offset = end
    if offset != size:
        raise PeerProtocolError("trailing bytes after packed entries")
    return tuple(out)


def _conf_to_pb(conf: ConfState) -> pb.ConfState:
    return pb.ConfState(voters=sorted(conf.voters), learners=sorted(conf.learners))


def _meta_to_pb(meta: SnapshotMeta) -> pb.SnapshotMeta:
    return pb.SnapshotMeta(index=meta.index, term=meta.term, conf=_conf_to_pb(meta.conf))


def _meta_from_pb(meta: pb.SnapshotMeta | None) -> SnapshotMeta:
    if meta is None:
        raise PeerProtocolError("snapshot chunk without snapshot metadata")
    conf = meta.conf or pb.ConfState()
    try:
        state = ConfState(voters=frozenset(conf.voters), learners=frozenset(conf.learners))
    except ValueError as exc:
        raise PeerProtocolError(f"invalid snapshot membership: {exc}") from None
    return SnapshotMeta(index=meta.index, term=meta.term, conf=state)


def message_to_pb(m: Message) -> pb.RaftMessage:
    """Encode one Raft message. Only the fields its type uses travel."""
    out = pb.RaftMessage(to=m.to, sender=m.sender, term=m.term)
    t = m.type
    if t is MessageType.APPEND:
        out.append = pb.AppendEntries(
            prev_index=m.index,
            prev_term=m.log_term,
            commit=m.commit,
            entry_count=len(m.entries),
            entries=pack_entries(m.entries),
        )
    elif t is MessageType.APPEND_RESP:
        out.append_response = pb.AppendResponse(
            index=m.index,
            reject=m.reject,
            reject_hint=m.reject_hint,
            conflict_term=m.conflict_term,
            log_term=m.log_term,
            commit=m.commit,
        )
    elif t is MessageType.HEARTBEAT:
        out.heartbeat = pb.Heartbeat(commit=m.commit, context=m.context)
    elif t is MessageType.HEARTBEAT_RESP:
        out.heartbeat_response = pb.HeartbeatResponse(
            reject=m.reject, context=m.context, commit=m.commit, index=m.index
        )
    elif t is MessageType.VOTE:
        out.vote = pb.VoteRequest(last_index=m.index, last_term=m.log_term, context=m.context)
    elif t is MessageType.PRE_VOTE:
        out.pre_vote = pb.VoteRequest(last_index=m.index, last_term=m.log_term, context=m.context)
    elif t is MessageType.VOTE_RESP:
        out.vote_response = pb.VoteResponse(reject=m.reject, context=m.context)
    elif t is MessageType.PRE_VOTE_RESP:
        out.pre_vote_response = pb.VoteResponse(reject=m.reject, context=m.context)
    elif t is MessageType.SNAPSHOT:
        if m.snapshot is None:
            raise ValueError("a SNAPSHOT message needs its snapshot metadata")
        out.snapshot = pb.SnapshotChunk(
            meta=_meta_to_pb(m.snapshot),
            offset=m.snapshot_offset,
            data=m.snapshot_data,
            done=m.snapshot_done,
            commit=m.commit,
        )
    elif t is MessageType.SNAPSHOT_RESP:
        out.snapshot_response = pb.SnapshotResponse(
            offset=m.snapshot_offset,
            reject=m.reject,
            index=m.index,
            meta=None if m.snapshot is None else _meta_to_pb(m.snapshot),
        )
    elif t is MessageType.TIMEOUT_NOW:
        out.timeout_now = pb.TimeoutNow(context=m.context)
    else:  # pragma: no cover - MessageType is closed
        raise ValueError(f"unknown message type {t!r}")
    return out


def message_from_pb(p: pb.RaftMessage) -> Message:
    """Decode one Raft message from a peer; raises :class:`PeerProtocolError`."""
    if not p.to or not p.sender:
        raise PeerProtocolError("raft message without sender or recipient")
    to, sender, term = p.to, p.sender, p.term
    if (append := p.append) is not None:
        return Message(
            MessageType.APPEND,
            index=append.prev_index,
            log_term=append.prev_term,
            commit=append.commit,
            entries=unpack_entries(append.entries, append.entry_count),
            to=to,
            sender=sender,
            term=term,
        )
    if (ar := p.append_response) is not None:
        return Message(
            MessageType.APPEND_RESP,
            index=ar.index,
            reject=ar.reject,
            reject_hint=ar.reject_hint,
            conflict_term=ar.conflict_term,
            log_term=ar.log_term,
            commit=ar.commit,
            to=to,
            sender=sender,
            term=term,
        )
    if (hb := p.heartbeat) is not None:
        return Message(
            MessageType.HEARTBEAT,
            commit=hb.commit,
            context=hb.context,
            to=to,
            sender=sender,
            term=term,
        )
    if (hr := p.heartbeat_response) is not None:
        return Message(
            MessageType.HEARTBEAT_RESP,
            reject=hr.reject,
            context=hr.context,
            commit=hr.commit,
            index=hr.index,
            to=to,
            sender=sender,
            term=term,
        )
    for kind, vote in ((MessageType.VOTE, p.vote), (MessageType.PRE_VOTE, p.pre_vote)):
        if vote is not None:
            return Message(
                kind,
                index=vote.last_index,
                log_term=vote.last_term,
                context=vote.context,
                to=to,
                sender=sender,
                term=term,
            )
    for kind, resp in (
        (MessageType.VOTE_RESP, p.vote_response),
        (MessageType.PRE_VOTE_RESP, p.pre_vote_response),
    ):
        if resp is not None:
            return Message(
                kind, reject=resp.reject, context=resp.context, to=to, sender=sender, term=term
            )
    if (chunk := p.snapshot) is not None:
        return Message(
            MessageType.SNAPSHOT,
            snapshot=_meta_from_pb(chunk.meta),
            snapshot_offset=chunk.offset,
            snapshot_data=chunk.data,
            snapshot_done=chunk.done,
            commit=chunk.commit,
            to=to,
            sender=sender,
            term=term,
        )
    if (sr := p.snapshot_response) is not None:
        return Message(
            MessageType.SNAPSHOT_RESP,
            snapshot_offset=sr.offset,
            reject=sr.reject,
            index=sr.index,
            snapshot=None if sr.meta is None else _meta_from_pb(sr.meta),
            to=to,
            sender=sender,
            term=term,
        )
    if (tn := p.timeout_now) is not None:
        return Message(
            MessageType.TIMEOUT_NOW, context=tn.context, to=to, sender=sender, term=term
        )
    raise PeerProtocolError("raft message of unknown kind")


def batch_from_pb(batch: pb.RaftBatch, *, caller: NodeId, me: NodeId) -> list[Message]:
    """Decode a whole batch, checking that it comes from ``caller`` and is for ``me``."""
    out: list[Message] = []
    for p in batch.messages:
        m = message_from_pb(p)
        if m.sender != caller:
            raise PeerProtocolError(
                f"raft message claims sender {m.sender!r} on a stream opened by {caller!r}"
            )
        if m.to != me:
            raise PeerProtocolError(f"raft message for {m.to!r} arrived at {me!r}")
        out.append(m)
    return out
