"""Named refusals of the Raft core.

Every error the core raises on purpose derives from :class:`RaftError`, itself
a :class:`trio_dchan.errors.DchanError`. The names say what happened and what a
caller can do about it; none of them leaves the core in a half-changed state.
"""

from __future__ import annotations

from trio_dchan.errors import DchanError

from .types import NodeId


class RaftError(DchanError):
    """Base class of every error raised by the Raft core."""


class NotLeader(RaftError):
    """Only the leader accepts this request.

    :attr:`leader` is the leader this node knows of (``None`` when it knows
    none, e.g. during an election), so the caller can forward the request.
    """

    def __init__(self, leader: NodeId | None) -> None:
        self.leader = leader
        where = f"the leader is {leader!r}" if leader is not None else "no leader is known"
        super().__init__(f"this node is not the leader; {where}")


class ProposalDropped(RaftError):
    """The leader refused the proposal; it was not appended and can be retried."""


class LeadershipTransferInProgress(ProposalDropped):
    """The leader is handing leadership over and accepts no new proposals meanwhile."""


class ConfChangeInProgress(ProposalDropped):
    """A membership change is still uncommitted (or the new leader has not
    committed an entry of its own term yet); retry once it is."""


class InvalidConfChange(RaftError):
    """The membership change makes no sense for the current configuration
    (adding an existing voter, demoting a voter, removing the last voter)."""


class UnknownNode(RaftError):
    """The node named is not a member of the cluster."""

    def __init__(self, node: NodeId) -> None:
        self.node = node
        super().__init__(f"{node!r} is not a member of the cluster")


class CompactedError(RaftError):
    """The requested log entries were compacted into a snapshot."""


class SnapshotOutOfDate(RaftError):
    """The snapshot is not newer than the one the core already has."""


class InvalidRequest(RaftError):
    """A local caller used the core's API wrongly (e.g. compacting past the
    applied index, or advancing with a Ready the core did not produce)."""


class InvalidMessage(RaftError):
    """A message from a peer is malformed; the core ignored it and is unchanged."""


class InvalidPersistedState(RaftError):
    """The state handed to the core on start is inconsistent (e.g. a gap in
    the entries, or entries that do not follow the snapshot)."""
