"""Errors raised by the gRPC transport.

All of them derive from :class:`TransportError`, itself a
:class:`~trio_dchan.errors.DchanError`. An unreachable peer during
``forward`` is reported as :class:`trio_dchan.raft.transport.Unavailable`
instead, because that is what the Raft node handles.
"""

from __future__ import annotations

from trio_dchan.errors import DchanError

__all__ = [
    "CallRefused",
    "MessageTooLarge",
    "PeerProtocolError",
    "RemoteCallError",
    "TransportError",
]


class TransportError(DchanError):
    """Base class of the transport's errors."""


class PeerProtocolError(TransportError):
    """A peer sent something that does not follow the wire protocol.

    Malformed protobuf, an unknown message kind, a Raft message whose sender is
    not the authenticated caller, an undecodable reply. The offending call is
    answered with an error status; nothing else is affected.
    """


class MessageTooLarge(TransportError):
    """A message exceeds ``TransportSettings.max_message_bytes``."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"message of {size} bytes exceeds the limit of {limit} bytes "
            "(TransportSettings.max_message_bytes)"
        )
        self.size = size
        self.limit = limit


class CallRefused(TransportError):
    """A peer refused a call: another cluster, not a member, bad input, too large.

    ``status`` is the gRPC status name the peer answered with (for example
    ``"PERMISSION_DENIED"``) and ``details`` its explanation.
    """

    def __init__(self, peer: str, status: str, details: str | None) -> None:
        super().__init__(f"peer {peer} refused the call: {status}: {details or 'no details'}")
        self.peer = peer
        self.status = status
        self.details = details


class RemoteCallError(TransportError):
    """A peer failed a forwarded call with an error this node cannot rebuild.

    ``kind`` is the name of the error class raised on the peer.
    """

    def __init__(self, peer: str, kind: str, message: str) -> None:
        super().__init__(f"peer {peer} failed the call with {kind}: {message}")
        self.peer = peer
        self.kind = kind
        self.remote_message = message
