"""Settings, delivery receipts and statistics records of the data plane."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .errors import DeliveryUnknownError

__all__ = [
    "DataPlaneSettings",
    "NamespaceStatistics",
    "Outcome",
    "Receipt",
    "ReceiveChannelStatistics",
    "SendChannelStatistics",
]


@dataclass(frozen=True, slots=True)
class DataPlaneSettings:
    """Every knob of the data plane, with the defaults a cluster uses.

    Times are in seconds. ``max_frame_bytes`` must not exceed what the
    transport accepts, and should be the same on every node.
    """

    #: Largest frame written to a link; one encoded message must fit in one.
    #: Keep it below the transport's own message limit (the gRPC transport
    #: allows 4 MiB per message including its own few bytes of wrapping).
    max_frame_bytes: int = 4 * 1024 * 1024 - 1024
    #: The most credit a sending node asks one receiver for: how many of its
    #: messages may be queued for or on their way to that receiver. A
    #: receiver grants no more than its free space (buffer, prefetch and
    #: waiting tasks), shared among the sending nodes that want some.
    credit_window: int = 1024
    #: Frames of messages a sending node keeps on a stream before waiting for
    #: an ack; meanwhile new messages gather into the next batch.
    max_unacked_frames: int = 1
    #: When the node is busy (it queues messages, for this peer or another)
    #: a batch waits for more messages while they keep coming: it leaves once
    #: this long passes without a new message for its peer (a lone message
    #: never waits). 0 sends at once.
    batch_linger: float = 0.001
    #: The longest a batch waits for more messages in all.
    batch_linger_max: float = 0.005
    #: A batch this large leaves without lingering. A batch aims for half of
    #: what credit lets be on the way to the peer (so one batch travels while
    #: the next gathers), at most this many messages.
    batch_target: int = 256
    #: A batch whose messages add up to this many bytes, or to a quarter of
    #: what credit lets be on the way to the peer if that is more, leaves
    #: without lingering: a frame of large messages takes long to travel and
    #: decode, and a receiver with only two of them in its credit would wait
    #: for each.
    batch_target_bytes: int = 256 * 1024
    #: A sending node gives credit back after this long without using it: all
    #: of it when nothing was sent to the peer, a receiver's when no frame
    #: carried messages for it (between one and two such periods), so an idle
    #: sender does not hold a receiver's space.
    credit_idle_return: float = 0.25
    #: How long an accepted message may wait for a receiver with credit
    #: (after a refusal or a lost connection before it was sent) before it is
    #: reported failed. Tracked sends use their own timeout instead.
    undeliverable_timeout: float = 30.0
    #: How long a closing receiver tries to hand its buffered messages to
    #: other receivers before dropping what is left.
    handoff_timeout: float = 10.0
    #: How long closing a receiver (and so the data plane's ``aclose()``) waits
    #: for its unregistration to commit. Past it the node keeps refusing the
    #: receiver's messages (senders retry them elsewhere), the channel closes,
    #: and the registration left in the Registry is removed when the node
    #: next starts. Without a quorum (say, the whole cluster shutting down at
    #: once) the unregistration can never commit: a node shutting down stops
    #: waiting as soon as it has known no leader for two election timeouts.
    unregister_timeout: float = 5.0
    #: First and largest pause between attempts to open a link to a peer, or
    #: to propose a receiver registration.
    retry_backoff_min: float = 0.05
    retry_backoff_max: float = 0.5

    def __post_init__(self) -> None:
        if self.max_frame_bytes < 8192:
            raise ValueError("max_frame_bytes must be at least 8192")
        if not 0 <= self.batch_linger < math.inf:
            raise ValueError("batch_linger must be a finite number of seconds >= 0")
        if not self.batch_linger <= self.batch_linger_max < math.inf:
            raise ValueError("batch_linger_max must be finite and >= batch_linger")
        if self.batch_target_bytes < 1:
            raise ValueError("batch_target_bytes must be at least 1")
        if self.batch_target < 1:
            raise ValueError("batch_target must be at least 1")
        if self.max_unacked_frames < 1:
            raise ValueError("max_unacked_frames must be at least 1")
        if self.credit_window < 1:
            raise ValueError("credit_window must be at least 1")
        for name in (
            "credit_idle_return",
            "undeliverable_timeout",
            "handoff_timeout",
            "unregister_timeout",
            "retry_backoff_min",
            "retry_backoff_max",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


class Outcome(enum.Enum):
    """What became of a tracked message."""

    #: Not decided yet.
    PENDING = "pending"
    #: A receiving node put it into a receiver's buffer.
    DELIVERED = "delivered"
    #: The timeout passed before any receiver accepted it; it is in no buffer.
    TIMED_OUT = "timed out"
    #: The timeout passed while no receiver was registered for the namespace.
    NO_RECEIVER = "no receiver"
    #: A receiving node refused it for good (it could not decode it).
    REFUSED = "refused"
    #: The node shut down before the message could be sent; it is in no buffer.
    CANCELLED = "cancelled"
    #: The connection broke after it was sent and before it was acknowledged.
    UNKNOWN = "unknown"


class Receipt:
    """The delivery receipt of one tracked message (see ``send_tracked``).

    ``await receipt.delivered()`` returns ``True`` once the message sits in a
    receiver's buffer, ``False`` once it definitively is in none (the
    :attr:`outcome` says why), and raises :class:`DeliveryUnknownError` if
    the connection to the receiving node broke before its acknowledgement.
    A delivered message never reports ``False``: the outcome is decided
    exactly once, and only a refusal or an expiry of a message that provably
    never reached a buffer decides ``False``.
    """

    __slots__ = ("_deadline", "_event", "_on_wait", "_outcome", "_receiver_id")

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline
        self._outcome = Outcome.PENDING
        self._receiver_id: str | None = None
        self._event: trio.Event | None = None  # made only if someone waits
        #: Called when a task starts waiting (the data plane may send it sooner).
        self._on_wait: Callable[[Receipt], None] | None = None

    @property
    def outcome(self) -> Outcome:
        return self._outcome

    @property
    def receiver_id(self) -> str | None:
        """The receiver whose buffer holds the message, once delivered."""
        return self._receiver_id

    @property
    def deadline(self) -> float:
        """The ``trio.current_time()`` after which an unsent message fails."""
        return self._deadline

    def done(self) -> bool:
        return self._outcome is not Outcome.PENDING

    async def delivered(self) -> bool:
        if self._outcome is Outcome.PENDING:
            if self._event is None:
                self._event = trio.Event()
            if self._on_wait is not None:
                self._on_wait(self)
            await self._event.wait()
        else:
            await trio.lowlevel.checkpoint()
        if self._outcome is Outcome.UNKNOWN:
            raise DeliveryUnknownError(
                "the connection to the receiving node broke before it acknowledged the message"
            )
        return self._outcome is Outcome.DELIVERED

    def _resolve(self, outcome: Outcome, receiver_id: str | None = None) -> None:
        if self._outcome is Outcome.PENDING:
            self._outcome = outcome
            self._receiver_id = receiver_id
            self._on_wait = None
            if self._event is not None:
                self._event.set()

    def __repr__(self) -> str:
        return f"<Receipt {self._outcome.value}>"


@dataclass(frozen=True, slots=True)
class SendChannelStatistics:
    """A snapshot of a send channel and of its namespace's sending state on this node."""

    namespace: str
    #: Open send channels (clones included) for the namespace on this node.
    open_send_channels: int
    #: Tasks blocked in ``send()`` for the namespace on this node.
    tasks_waiting_send: int
    #: Receivers of the namespace known to this node (committed registrations).
    receivers: int
    #: Messages this node may send right now without waiting for credit.
    credit: int
    #: Accepted messages not yet on a stream (waiting for a batch or a retry).
    queued: int
    #: Messages sent and not yet acknowledged.
    in_flight: int
    #: Messages acknowledged as placed in a receiver's buffer.
    delivered: int
    #: Messages that definitively failed, or whose outcome became unknown.
    failed: int
    #: Messages refused or bounced and sent again to another receiver.
    retried: int
    #: Accepted messages of this channel object not yet delivered or failed.
    outstanding: int


@dataclass(frozen=True, slots=True)
class ReceiveChannelStatistics:
    """A snapshot of one receiver (shared by a receive channel and its clones)."""

    namespace: str
    receiver_id: str
    #: Whether the registration has committed (messages can arrive).
    registered: bool
    max_buffer_size: int
    #: Messages that may be sent to it beyond a full buffer (``prefetch``).
    prefetch: int
    #: Messages waiting for a ``receive()``: at most ``max_buffer_size``, plus
    #: up to ``prefetch`` more that were sent while the buffer was full.
    current_buffer_used: int
    peak_buffer_used: int
    open_receive_channels: int
    tasks_waiting_receive: int
    #: Credits granted to sending nodes and not used yet.
    credit_granted: int
    #: Messages placed into this receiver (buffer or a waiting task).
    received: int
    #: Buffered messages handed to other receivers when this one closed.
    handed_off: int
    #: Buffered messages dropped on close because no other receiver took them.
    dropped: int


@dataclass(frozen=True, slots=True)
class NamespaceStatistics:
    """Per-namespace totals on one node."""

    namespace: str
    open_send_channels: int
    receivers_here: int
    buffered: int
    queued: int
    in_flight: int
    delivered: int
    failed: int
    received: int
