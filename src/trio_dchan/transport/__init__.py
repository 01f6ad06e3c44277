"""The gRPC transport: one grpclib server and one channel per peer, under trio-asyncio.

See ``docs/transport.md``. The cluster layer calls :func:`open_transport`;
the Raft node sees the result as its
:class:`~trio_dchan.raft.transport.RaftTransport`, the data plane opens
links with :meth:`GrpcTransport.open_link`.
"""

from ._transport import GrpcTransport, NodeStatus, TransportSettings, open_transport
from .errors import (
    CallRefused,
    MessageTooLarge,
    PeerProtocolError,
    RemoteCallError,
    TransportError,
)

__all__ = [
    "CallRefused",
    "GrpcTransport",
    "MessageTooLarge",
    "NodeStatus",
    "PeerProtocolError",
    "RemoteCallError",
    "TransportError",
    "TransportSettings",
    "open_transport",
]
