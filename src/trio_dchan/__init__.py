"""trio_dchan: distributed channels for Trio.

A cluster of peer nodes where any task on any node sends into a named
namespace and any task on any node receives from it, through Trio channels::

    async with trio_dchan.open_cluster(address, cluster_id=..., peers=[...]) as cluster:
        async with cluster.send("orders") as tx:
            await tx.send({"id": 1})

See the user guide in ``docs/`` for the semantics and guarantees.
"""

from .cluster import Cluster, ClusterStatistics, ClusterUnavailable, Settings, open_cluster
from .codec import register
from .dataplane import (
    DataPlaneSettings,
    DeliveryUnknownError,
    DistributedReceiveChannel,
    DistributedSendChannel,
    MessageTooLargeError,
    NamespaceStatistics,
    Outcome,
    Receipt,
    ReceiveChannelStatistics,
    SendChannelStatistics,
)
from .errors import CodecError, DchanError, DecodeError, EncodeError, RegistrationError
from .raft.errors import UnknownNode
from .raft.node import RaftSettings
from .transport import TransportSettings

__version__ = "0.1.0.dev0"

__all__ = [
    "Cluster",
    "ClusterStatistics",
    "ClusterUnavailable",
    "CodecError",
    "DataPlaneSettings",
    "DchanError",
    "DecodeError",
    "DeliveryUnknownError",
    "DistributedReceiveChannel",
    "DistributedSendChannel",
    "EncodeError",
    "MessageTooLargeError",
    "NamespaceStatistics",
    "Outcome",
    "RaftSettings",
    "Receipt",
    "ReceiveChannelStatistics",
    "RegistrationError",
    "SendChannelStatistics",
    "Settings",
    "TransportSettings",
    "UnknownNode",
    "__version__",
    "open_cluster",
    "register",
]
