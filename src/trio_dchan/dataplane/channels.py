"""The channels users hold: Trio channels whose other end is anywhere in the cluster.

They follow :mod:`trio`'s memory channels (``send_nowait``/``receive_nowait``
raising :class:`trio.WouldBlock`, ``clone()``, ``statistics()``, cancellation
atomicity, :class:`trio.ClosedResourceError` on use after close). Where
distance forces a difference, ``docs/channels.md`` says so; in short:

* ``send()`` returns once a receiver's node granted room for the message (or
  the channel's own ``buffer`` had room), not once a task received it.
* There is no "every sender closed" across a cluster: a receive channel ends
  (:class:`trio.EndOfChannel`) when its node's data plane shuts down, and
  ``send()`` raises :class:`trio.BrokenResourceError` only then too; with no
  receiver registered it waits for one.
* ``aclose()`` waits: a send channel until its accepted messages are settled,
  a receive channel until its unregistration committed and its buffer was
  handed to other receivers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import trio
from outcome import Error
from trio.lowlevel import enable_ki_protection

from .types import Outcome, Receipt, ReceiveChannelStatistics, SendChannelStatistics

if TYPE_CHECKING:
    from typing import Self

    from .plane import DataPlane, _Inbox, _NsSender

__all__ = ["DistributedReceiveChannel", "DistributedSendChannel"]


class DistributedSendChannel(trio.abc.SendChannel[Any]):
    """Sends into a namespace; each message goes to exactly one receiver in the cluster.

    Made by :meth:`DataPlane.send` (``cluster.send(namespace, buffer=0)``).
    """

    def __init__(self, plane: DataPlane, ns: _NsSender, buffer: int, *, _token: object) -> None:
        if _token is not _TOKEN:
            raise TypeError("send channels are made by cluster.send()")
        from .plane import _Owner

        self._plane = plane
        self._ns = ns
        self._buffer = buffer
        self._owner = _Owner()
        self._closed = False
        ns.open_channels += 1
        ns.activate()

    @classmethod
    def _create(cls, plane: DataPlane, ns: _NsSender, buffer: int) -> DistributedSendChannel:
        return cls(plane, ns, buffer, _token=_TOKEN)

    @property
    def namespace(self) -> str:
        return self._ns.namespace

    def __repr__(self) -> str:
        return f"<distributed send channel into {self._ns.namespace!r} at {id(self):#x}>"

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this send channel was closed")
        if self._plane.closing:
            raise trio.BrokenResourceError("the node's data plane is shutting down")

    def _accept(self, encoded: bytes, receipt: Receipt | None) -> bool:
        ns = self._ns
        owner = self._owner
        if ns.place(encoded, owner, receipt):
            return True
        if owner.unplaced < self._buffer:
            deadline = (
                receipt.deadline
                if receipt is not None
                else trio.current_time() + self._plane.settings.undeliverable_timeout
            )
            ns.hold(encoded, owner, receipt, deadline)
            return True
        return False

    async def _send_encoded(self, encoded: bytes, receipt: Receipt | None) -> None:
        if self._accept(encoded, receipt):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        ns = self._ns
        ns.blocked()
        while True:
            ns.tasks_waiting += 1
            try:
                # Cancellation lands here, before anything was accepted.
                await ns.lot.park()
            finally:
                ns.tasks_waiting -= 1
            self._check()
            if self._accept(encoded, receipt):
                return

    @enable_ki_protection
    def send_nowait(self, value: Any) -> None:
        """Send without blocking, or raise :class:`trio.WouldBlock` if no receiver has room.

        Raises the codec's ``EncodeError`` for a value it cannot encode and
        :class:`MessageTooLargeError` for one that does not fit in a frame.
        """
        self._check()
        if not self._accept(self._plane.encode(value), None):
            raise trio.WouldBlock

    @enable_ki_protection
    async def send(self, value: Any) -> None:
        """Send ``value`` to one receiver of the namespace.

        Encodes in the calling task (so ``EncodeError`` is raised here),
        then waits until a receiver somewhere has room (or this channel's
        buffer has). Cancelled, it sent nothing.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed or self._plane._closing:
            self._check()
        encoded = self._plane.encode(value)
        # The common case, inline: a receiver has credit.
        if self._ns.place(encoded, self._owner, None):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        await self._send_encoded(encoded, None)

    @enable_ki_protection
    async def send_tracked(self, value: Any, timeout: float = math.inf) -> Receipt:  # noqa: ASYNC109
        """Send ``value`` and return a :class:`Receipt` of its delivery.

        If no receiver took the message within ``timeout`` seconds the
        receipt says so (``TIMED_OUT``, or ``NO_RECEIVER`` when none is
        registered) and the message was not sent. Once sent, the receipt
        resolves when the receiving node acknowledges it.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if not timeout >= 0:
            raise ValueError("timeout must be >= 0")
        self._check()
        encoded = self._plane.encode(value)
        receipt = Receipt(trio.current_time() + timeout)
        if self._accept(encoded, receipt):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return receipt
        with trio.move_on_at(receipt.deadline):
            await self._send_encoded(encoded, receipt)
            return receipt
        receipt._resolve(Outcome.TIMED_OUT if self._ns.slots else Outcome.NO_RECEIVER)
        return receipt

    @enable_ki_protection
    def clone(self) -> DistributedSendChannel:
        """Another send channel into the same namespace (closing one does not close the other)."""
        if self._closed:
            raise trio.ClosedResourceError("this send channel was closed")
        return DistributedSendChannel._create(self._plane, self._ns, self._buffer)

    @enable_ki_protection
    def close(self) -> None:
        """Close without waiting; accepted messages still go out (see :meth:`aclose`)."""
        if self._closed:
            return
        self._closed = True
        self._ns.open_channels -= 1
        # Tasks of this channel blocked in send() wake up and raise ClosedResourceError.
        self._ns.lot.unpark_all()

    @enable_ki_protection
    async def aclose(self) -> None:
        """Close, then wait until every message this channel accepted was delivered or failed."""
        self.close()
        if self._owner.outstanding:
            await self._owner.wait_drained()
        else:
            await trio.lowlevel.checkpoint()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> SendChannelStatistics:
        ns = self._ns
        return SendChannelStatistics(
            namespace=ns.namespace,
            open_send_channels=ns.open_channels,
            tasks_waiting_send=ns.tasks_waiting,
            receivers=len(ns.slots),
            credit=ns.credit(),
            queued=ns.queued,
            in_flight=ns.in_flight,
            delivered=ns.delivered,
            failed=ns.failed,
            retried=ns.retried,
            outstanding=self._owner.outstanding,
        )


class DistributedReceiveChannel(trio.abc.ReceiveChannel[Any]):
    """One receiver of a namespace (clones share it). Made by :meth:`DataPlane.receive`."""

    def __init__(self, plane: DataPlane, inbox: _Inbox, *, _token: object) -> None:
        if _token is not _TOKEN:
            raise TypeError("receive channels are made by cluster.receive()")
        self._plane = plane
        self._inbox = inbox
        self._closed = False
        self._tasks: set[trio.lowlevel.Task] = set()
        #: Set by close(), for tasks in wait_registered().
        self._closed_event: trio.Event | None = None

    @classmethod
    def _create(cls, plane: DataPlane, inbox: _Inbox) -> DistributedReceiveChannel:
        return cls(plane, inbox, _token=_TOKEN)

    @property
    def namespace(self) -> str:
        return self._inbox.namespace

    @property
    def receiver_id(self) -> str:
        return self._inbox.rid

    def __repr__(self) -> str:
        return f"<distributed receive channel {self._inbox.rid!r} of {self.namespace!r}>"

    @enable_ki_protection
    def receive_nowait(self) -> Any:
        """A buffered message, or :class:`trio.WouldBlock` if there is none."""
        if self._closed:
            raise trio.ClosedResourceError("this receive channel was closed")
        inbox = self._inbox
        if inbox.data:
            value = inbox.data.popleft()
            inbox.freed += 1
            if inbox.freed >= inbox.chunk:
                inbox.grant()
            return value
        if inbox.ended:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    @enable_ki_protection
    async def receive(self) -> Any:
        """The next message for this receiver; waits for one.

        A waiting ``receive()`` counts as room: with ``buffer=0`` a sender
        gets credit only while some task waits here. Cancelled, it took
        nothing (a message that arrives for it afterwards stays buffered).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            value = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return value
        inbox = self._inbox
        task = trio.lowlevel.current_task()
        self._tasks.add(task)
        inbox.waiting[task] = None
        task.custom_sleep_data = self
        inbox.grant()

        def abort_fn(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._tasks.discard(task)
            del inbox.waiting[task]
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort_fn)

    async def wait_registered(self) -> None:
        """Wait until the registration committed and messages can arrive.

        Raises :class:`trio.ClosedResourceError` if this channel was closed,
        or :class:`trio.BrokenResourceError` if the receiver was closed
        (every clone) or the node shut down before it registered.
        """
        if self._closed:
            raise trio.ClosedResourceError("this receive channel was closed")
        inbox = self._inbox
        if inbox.registered_event.is_set():
            await trio.lowlevel.checkpoint()
        else:
            if self._closed_event is None:
                self._closed_event = trio.Event()
            closed = self._closed_event
            async with trio.open_nursery() as nursery:

                async def registered() -> None:
                    await inbox.registered_event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(registered)
                await closed.wait()
                nursery.cancel_scope.cancel()
        if self._closed:
            raise trio.ClosedResourceError("this receive channel was closed")
        if not inbox.registered:
            raise trio.BrokenResourceError("the receiver closed before it was registered")

    @enable_ki_protection
    def clone(self) -> DistributedReceiveChannel:
        """Another handle on the same receiver; it is unregistered when every clone closed."""
        if self._closed:
            raise trio.ClosedResourceError("this receive channel was closed")
        self._inbox.open_clones += 1
        return DistributedReceiveChannel._create(self._plane, self._inbox)

    @enable_ki_protection
    def close(self) -> None:
        """Close this handle; the last one starts unregistration (see :meth:`aclose`)."""
        if self._closed:
            return
        self._closed = True
        if self._closed_event is not None:
            self._closed_event.set()
        inbox = self._inbox
        for task in self._tasks:
            del inbox.waiting[task]
            trio.lowlevel.reschedule(task, Error(trio.ClosedResourceError()))
        self._tasks.clear()
        inbox.open_clones -= 1
        if inbox.open_clones == 0:
            self._plane._start_close(inbox)

    @enable_ki_protection
    async def aclose(self) -> None:
        """Close; the last clone waits until no message can arrive any more.

        Returns once the unregistration committed (later arrivals are refused
        and the senders retry them elsewhere) and the messages still buffered
        were handed to other receivers (or dropped, counted in
        ``statistics().dropped``, if none took them within
        ``settings.handoff_timeout``).
        """
        self.close()
        if self._inbox.open_clones == 0 and not self._inbox.closed_event.is_set():
            await self._inbox.closed_event.wait()
        else:
            await trio.lowlevel.checkpoint()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> ReceiveChannelStatistics:
        inbox = self._inbox
        return ReceiveChannelStatistics(
            namespace=inbox.namespace,
            receiver_id=inbox.rid,
            registered=inbox.registered,
            max_buffer_size=inbox.buffer,
            prefetch=inbox.prefetch,
            current_buffer_used=len(inbox.data),
            peak_buffer_used=inbox.peak,
            open_receive_channels=inbox.open_clones,
            tasks_waiting_receive=len(inbox.waiting),
            credit_granted=inbox.granted_total,
            received=inbox.received,
            handed_off=inbox.handed_off,
            dropped=inbox.dropped,
        )


_TOKEN = object()
