"""Errors raised by the data plane and the distributed channels."""

from __future__ import annotations

from trio_dchan.errors import DchanError

__all__ = [
    "DataPlaneError",
    "DeliveryUnknownError",
    "FrameTooLargeError",
    "MessageTooLargeError",
    "PeerProtocolError",
]


class DataPlaneError(DchanError):
    """Base class of the data plane's errors."""


class MessageTooLargeError(DataPlaneError, ValueError):
    """An encoded message does not fit in one frame.

    Raised by ``send()`` in the caller's task; nothing was enqueued. Send
    smaller values or raise ``max_frame_bytes`` in the settings (on every node).
    """


class FrameTooLargeError(DataPlaneError):
    """A link refused a frame above its size limit."""


class PeerProtocolError(DataPlaneError):
    """A peer sent a frame that breaks the data-plane protocol.

    The stream it came on is ended; other streams are not affected.
    """


class DeliveryUnknownError(DataPlaneError):
    """Whether a tracked message was delivered cannot be known.

    The stream to the receiving node broke after the message was sent and
    before the receiving node acknowledged it: it may sit in a receiver's
    buffer, or it may have been lost with the connection. The library never
    retries such a message (that could deliver it twice).
    """
