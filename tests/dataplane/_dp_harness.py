"""Test harness for the data plane: several nodes in one process.

Every node gets its own :class:`DataPlane`; they share one real
:class:`~trio_dchan.registry.Registry` that a *test* ``propose`` feeds by
applying each command at once (standing in for Raft, which has its own
tests). Nodes reach each other over :func:`memory_link_pair` links.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from trio_dchan.dataplane import (
    DataLink,
    DataPlane,
    DataPlaneSettings,
    DistributedReceiveChannel,
    memory_link_pair,
)
from trio_dchan.raft.types import Entry
from trio_dchan.registry import Registry

FAST = DataPlaneSettings(
    credit_idle_return=0.05,
    undeliverable_timeout=5.0,
    handoff_timeout=5.0,
    retry_backoff_min=0.01,
    retry_backoff_max=0.05,
)


async def all_registered(*channels: DistributedReceiveChannel) -> None:
    """Wait (bounded) until every receiver's registration has committed."""
    with trio.fail_after(5):
        for ch in channels:
            await ch.wait_registered()


async def settle() -> None:
    """Wait until every task is blocked: what can happen now has happened."""
    await trio.testing.wait_all_tasks_blocked(cushion=0.001)


class Cluster:
    """N data planes, one shared Registry, memory links between them."""

    def __init__(self, nursery: trio.Nursery, settings: DataPlaneSettings, seed: int) -> None:
        self.nursery = nursery
        self.settings = settings
        self.registry = Registry()
        self.planes: dict[str, DataPlane] = {}
        self.rng = random.Random(seed)
        self._index = 0
        self.links: list[tuple[str, str, DataLink, DataLink]] = []
        #: Node ids whose links refuse to open (simulates an unreachable node).
        self.unreachable: set[str] = set()
        #: Nodes played by the test itself: the far end of each link opened to
        #: one of them is handed to the test through this channel.
        self.fake_links: dict[str, trio.MemorySendChannel[DataLink]] = {}
        self._unstalled = trio.Event()
        self._stalled = False

    @property
    def stalled(self) -> bool:
        return self._stalled

    @stalled.setter
    def stalled(self, value: bool) -> None:
        self._stalled = value
        if value:
            self._unstalled = trio.Event()
        else:
            self._unstalled.set()

    async def propose(self, data: bytes) -> object:
        # Test stand-in for Raft: commit and apply at once, in order. While
        # ``stalled`` is set a proposal never completes, like one made to a
        # cluster that lost its quorum.
        while self.stalled:
            await self._unstalled.wait()
        self._index += 1
        result = self.registry.apply(Entry(term=1, index=self._index, data=data))
        await trio.lowlevel.checkpoint()
        return result

    def _opener(self, me: str):  # type: ignore[no-untyped-def]
        async def open_link(peer: str) -> DataLink:
            await trio.lowlevel.checkpoint()
            if peer in self.unreachable or me in self.unreachable:
                raise OSError(f"{peer} unreachable")
            ours, theirs = memory_link_pair(max_frame_bytes=self.settings.max_frame_bytes)
            self.links.append((me, peer, ours, theirs))
            if peer in self.fake_links:
                await self.fake_links[peer].send(theirs)
            else:
                self.nursery.start_soon(self._serve, peer, me, theirs)
            return ours

        return open_link

    async def _serve(self, node: str, peer: str, link: DataLink) -> None:
        try:
            await self.planes[node].serve_stream(peer, link)
        except Exception:
            pass  # a refused stream; the tests look at its effects

    def fake_node(self, node_id: str) -> trio.MemoryReceiveChannel[DataLink]:
        send, receive = trio.open_memory_channel[DataLink](math.inf)
        self.fake_links[node_id] = send
        return receive

    async def add(self, node_id: str) -> DataPlane:
        plane = DataPlane(
            node_id,
            registry=self.registry,
            propose=self.propose,
            open_link=self._opener(node_id),
            settings=self.settings,
            rng=random.Random(self.rng.random()),
        )
        self.planes[node_id] = plane
        await self.nursery.start(plane.run)
        return plane


@asynccontextmanager
async def open_cluster(
    nodes: int, *, settings: DataPlaneSettings = FAST, seed: int = 0
) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, settings, seed)
        for i in range(nodes):
            await cluster.add(f"n{i}")
        try:
            yield cluster
        finally:
            with trio.move_on_after(10) as scope:
                scope.shield = True
                for plane in cluster.planes.values():
                    await plane.aclose()
            nursery.cancel_scope.cancel()
