"""The data plane: how messages travel from send channels to receivers.

See :mod:`trio_dchan.dataplane.plane` for the design and ``docs/channels.md``
for the semantics users rely on.
"""

from .channels import DistributedReceiveChannel, DistributedSendChannel
from .errors import (
    DataPlaneError,
    DeliveryUnknownError,
    FrameTooLargeError,
    MessageTooLargeError,
    PeerProtocolError,
)
from .link import DataLink, DataPlaneHandler, MemoryLink, memory_link_pair
from .plane import DataPlane, RegistryView
from .types import (
    DataPlaneSettings,
    NamespaceStatistics,
    Outcome,
    Receipt,
    ReceiveChannelStatistics,
    SendChannelStatistics,
)

__all__ = [
    "DataLink",
    "DataPlane",
    "DataPlaneError",
    "DataPlaneHandler",
    "DataPlaneSettings",
    "DeliveryUnknownError",
    "DistributedReceiveChannel",
    "DistributedSendChannel",
    "FrameTooLargeError",
    "MemoryLink",
    "MessageTooLargeError",
    "NamespaceStatistics",
    "Outcome",
    "PeerProtocolError",
    "Receipt",
    "ReceiveChannelStatistics",
    "RegistryView",
    "SendChannelStatistics",
    "memory_link_pair",
]
