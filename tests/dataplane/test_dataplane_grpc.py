"""The data plane over the real gRPC transport (two nodes in one process, loopback)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio
import trio.testing
from _dp_harness import FAST

from trio_dchan.dataplane import DataPlane, Outcome
from trio_dchan.raft.types import Entry
from trio_dchan.registry import Registry
from trio_dchan.testing import check_channel_pair
from trio_dchan.transport import open_transport

_names = itertools.count()


@asynccontextmanager
async def _two_nodes() -> AsyncIterator[tuple[DataPlane, DataPlane]]:
    # Test stand-in for Raft: one Registry that applies each command at once.
    registry = Registry()
    index = itertools.count(1)

    async def propose(data: bytes) -> object:
        result = registry.apply(Entry(term=1, index=next(index), data=data))
        await trio.lowlevel.checkpoint()
        return result

    async with AsyncExitStack() as stack:
        ta = await stack.enter_async_context(
            open_transport("a", "127.0.0.1:0", cluster_id="t", is_member=lambda n: True)
        )
        tb = await stack.enter_async_context(
            open_transport(
                "b",
                "127.0.0.1:0",
                cluster_id="t",
                peers={"a": f"127.0.0.1:{ta.port}"},
                is_member=lambda n: True,
            )
        )
        a = await stack.enter_async_context(
            DataPlane(
                "a", registry=registry, propose=propose, open_link=ta.open_link, settings=FAST
            )
        )
        b = await stack.enter_async_context(
            DataPlane(
                "b", registry=registry, propose=propose, open_link=tb.open_link, settings=FAST
            )
        )
        ta.attach(data_handler=a)
        tb.attach(data_handler=b)
        yield a, b


async def test_conformance_and_receipts_over_grpc() -> None:
    async with _two_nodes() as (a, b):

        @asynccontextmanager
        async def pair(buffer: int) -> AsyncIterator[tuple[Any, Any]]:
            namespace = f"grpc-{next(_names)}"
            rx = a.receive(namespace, buffer)
            with trio.fail_after(5):
                await rx.wait_registered()
            tx = b.send(namespace)
            async with tx, rx:
                yield tx, rx

        async def settle() -> None:
            # Every accepted message acknowledged, then every task idle.
            await b.wait_settled()
            await trio.testing.wait_all_tasks_blocked(cushion=0.01)

        await check_channel_pair(pair, ends_when_senders_close=False, settle=settle)
        rx = a.receive("tracked", buffer=64)
        with trio.fail_after(5):
            await rx.wait_registered()
        tx = b.send("tracked")
        got: list[int] = []

        async def consume() -> None:
            for _ in range(200):
                got.append(await rx.receive())

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                receipts = [await tx.send_tracked(i, timeout=10) for i in range(200)]
            assert all([await r.delivered() for r in receipts])
        assert got == list(range(200))
        assert {r.outcome for r in receipts} == {Outcome.DELIVERED}
        await tx.aclose()
        await rx.aclose()
