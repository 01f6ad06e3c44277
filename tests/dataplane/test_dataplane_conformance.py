"""The channel conformance suite, against Trio's memory channels and distributed pairs."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from _dp_harness import open_cluster

from trio_dchan.testing import check_channel_pair

_names = itertools.count()


@asynccontextmanager
async def _memory_pair(
    buffer: int,
) -> AsyncIterator[tuple[trio.abc.SendChannel[Any], trio.abc.ReceiveChannel[Any]]]:
    tx, rx = trio.open_memory_channel[Any](buffer)
    async with tx, rx:
        yield tx, rx


async def test_suite_holds_for_trio_memory_channels() -> None:
    # The suite itself is checked against the channels it imitates.
    await check_channel_pair(_memory_pair)


@pytest.mark.parametrize(("sender", "receiver"), [("n0", "n0"), ("n0", "n1")])
async def test_suite_holds_for_distributed_pairs(sender: str, receiver: str) -> None:
    async with open_cluster(3) as cluster:

        @asynccontextmanager
        async def pair(
            buffer: int,
        ) -> AsyncIterator[tuple[trio.abc.SendChannel[Any], trio.abc.ReceiveChannel[Any]]]:
            namespace = f"conf-{next(_names)}"
            rx = cluster.planes[receiver].receive(namespace, buffer)
            with trio.fail_after(5):
                await rx.wait_registered()
            tx = cluster.planes[sender].send(namespace)
            async with tx, rx:
                yield tx, rx

        await check_channel_pair(pair, ends_when_senders_close=False)
