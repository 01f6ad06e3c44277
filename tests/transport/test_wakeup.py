"""The waiter a data link parks in grpclib's reader queue."""

from __future__ import annotations

import trio

from trio_dchan.transport._grpc import Wakeup


async def test_wakeup_reschedules_its_task_once() -> None:
    waiter = Wakeup(trio.lowlevel.current_task())

    async def wake_twice() -> None:
        waiter.set_result(None)
        waiter.cancel()  # a stream failing right after: no second reschedule

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wake_twice)
        await trio.lowlevel.wait_task_rescheduled(waiter.abort)
    assert waiter.done()


async def test_wakeup_after_the_task_was_cancelled_wakes_nobody() -> None:
    waiter = Wakeup(trio.lowlevel.current_task())
    with trio.CancelScope() as scope:
        scope.cancel()
        await trio.lowlevel.wait_task_rescheduled(waiter.abort)
    assert scope.cancelled_caught
    # Bytes arriving now must not reschedule a task that stopped waiting.
    waiter.set_result(None)
    waiter.cancel()
    await trio.lowlevel.checkpoint()
    assert waiter.done()
