"""The seam between the data plane and whatever carries its frames.

The data plane owns the frame format; a transport only moves opaque frames.
One :class:`DataLink` is one bidirectional stream between this node and a
peer: the sending node writes batches of messages and reads acks and credit
grants back; the receiving node is handed the other end through
:meth:`DataPlaneHandler.serve_stream`.

:func:`memory_link_pair` gives two connected in-process ends, for tests and
for a node that delivers to its own receivers.
"""

from __future__ import annotations

from typing import Protocol

import trio

from trio_dchan.raft.types import NodeId

from .errors import FrameTooLargeError

__all__ = ["DataLink", "DataPlaneHandler", "MemoryLink", "memory_link_pair"]


class DataLink(Protocol):
    """One stream between this node and a peer; frames are opaque bytes."""

    async def send_frame(self, frame: bytes | memoryview | list[bytes]) -> None:
        """Send one frame; raises if the stream is broken or closed.

        A list is one frame given in pieces (their concatenation), which
        spares the caller a copy of a large frame. A frame received as a
        view may be sent on as it is.
        """
        ...

    async def receive_frame(self) -> bytes | memoryview:
        """The next frame; raises :class:`trio.EndOfChannel` once the peer ended the stream.

        The frame may be a read-only view into the transport's receive
        buffer, which saves copying a large frame; it stays valid for as long
        as it is referenced.
        """
        ...

    async def aclose(self) -> None:
        """End the stream in both directions. Idempotent."""
        ...


class DataPlaneHandler(Protocol):
    """What a node offers its transport for inbound data-plane streams."""

    async def serve_stream(self, peer: NodeId, link: DataLink) -> None:
        """Serve one stream opened by ``peer`` until it ends."""
        ...


class MemoryLink:
    """One end of an in-process link made by :func:`memory_link_pair`."""

    def __init__(
        self,
        send: trio.MemorySendChannel[bytes],
        receive: trio.MemoryReceiveChannel[bytes],
        max_frame_bytes: int | None,
    ) -> None:
        self._send = send
        self._receive = receive
        self._max_frame_bytes = max_frame_bytes
        #: Frames written to this end so far.
        self.frames_sent = 0

    async def send_frame(self, frame: bytes | memoryview | list[bytes]) -> None:
        frame = b"".join(frame) if isinstance(frame, list) else bytes(frame)
        if self._max_frame_bytes is not None and len(frame) > self._max_frame_bytes:
            raise FrameTooLargeError(
                f"frame of {len(frame)} bytes exceeds the link limit of {self._max_frame_bytes}"
            )
        await self._send.send(frame)
        self.frames_sent += 1

    async def receive_frame(self) -> bytes:
        return await self._receive.receive()

    async def aclose(self) -> None:
        self._send.close()
        self._receive.close()
        await trio.lowlevel.checkpoint()


def memory_link_pair(
    *, max_frame_bytes: int | None = None, buffer: int = 16
) -> tuple[MemoryLink, MemoryLink]:
    """Two connected in-process :class:`DataLink` ends.

    Frames written to one end are read from the other in order. Closing an
    end makes the other's :meth:`~MemoryLink.receive_frame` raise
    :class:`trio.EndOfChannel` and its :meth:`~MemoryLink.send_frame` raise
    :class:`trio.BrokenResourceError`, as a reset stream would. A frame larger
    than ``max_frame_bytes`` is refused with :class:`FrameTooLargeError`.
    ``buffer`` frames may be in transit each way before ``send_frame`` waits.
    """
    a_send, b_receive = trio.open_memory_channel[bytes](buffer)
    b_send, a_receive = trio.open_memory_channel[bytes](buffer)
    return MemoryLink(a_send, a_receive, max_frame_bytes), MemoryLink(
        b_send, b_receive, max_frame_bytes
    )
