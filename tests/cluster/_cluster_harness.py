"""Run several nodes of a real cluster (gRPC on 127.0.0.1) inside one Trio run.

Each node lives in its own task and cancel scope, so a test can stop one
abruptly (its tasks are cancelled mid-flight, like a crashed process as far
as the peers can tell) or let it leave its ``open_cluster`` block cleanly.
"""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from trio_dchan.cluster import Cluster, Settings, open_cluster
from trio_dchan.dataplane import DataPlaneSettings
from trio_dchan.raft.node import RaftSettings

#: Timings shrunk for tests: elections in ~100-200 ms, quick retries.
FAST = Settings(
    raft=RaftSettings(tick_interval=0.01, election_ticks=10, heartbeat_ticks=2),
    dataplane=DataPlaneSettings(
        credit_idle_return=0.05,
        undeliverable_timeout=5.0,
        handoff_timeout=3.0,
        unregister_timeout=1.0,
        retry_backoff_min=0.01,
        retry_backoff_max=0.2,
    ),
    start_timeout=10.0,
    leave_timeout=5.0,
)

#: Bound on any single awaited condition in these tests (a failure, never a pass).
STEP = 15.0


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class _Member:
    address: str
    sock: socket.socket | None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    cluster: Cluster | None = None
    up: trio.Event = field(default_factory=trio.Event)
    stop: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    started: bool = False
    error: BaseException | None = None


class LocalCluster:
    """Nodes of one cluster in this process; see :func:`local_cluster`."""

    def __init__(
        self, nursery: trio.Nursery, addresses: list[str], socks: list[socket.socket], seed: int
    ) -> None:
        self._nursery = nursery
        self.addresses = addresses
        self.cluster_id = f"test-{seed}"
        self._rng = random.Random(seed)
        self._members = {a: _Member(a, s) for a, s in zip(addresses, socks, strict=True)}
        self.settings = FAST

    def __getitem__(self, address: str) -> Cluster:
        cluster = self._members[address].cluster
        if cluster is None:
            raise LookupError(f"node {address} is not running")
        return cluster

    @property
    def nodes(self) -> list[Cluster]:
        return [self[a] for a in self.addresses if self._members[a].cluster is not None]

    def start(self, address: str, **kwargs: Any) -> None:
        member = self._members.setdefault(address, _Member(address, None))
        if member.cluster is not None:
            raise RuntimeError(f"node {address} is running")
        member.scope = trio.CancelScope()
        member.up, member.stop, member.done = trio.Event(), trio.Event(), trio.Event()
        member.started, member.error = True, None
        self._nursery.start_soon(self._run, member, kwargs)

    async def _run(self, member: _Member, kwargs: dict[str, Any]) -> None:
        sock, member.sock = member.sock, None
        try:
            with member.scope:
                async with open_cluster(
                    member.address,
                    cluster_id=kwargs.pop("cluster_id", self.cluster_id),
                    peers=kwargs.pop("peers", self.addresses),
                    settings=kwargs.pop("settings", self.settings),
                    rng=random.Random(self._rng.getrandbits(64)),
                    sock=sock,
                    **kwargs,
                ) as cluster:
                    member.cluster = cluster
                    member.up.set()
                    await member.stop.wait()
        except Exception as exc:
            member.error = exc
        finally:
            member.cluster = None
            member.done.set()

    async def wait_up(self, *addresses: str) -> None:
        with trio.fail_after(STEP):
            for address in addresses or self.addresses:
                member = self._members[address]
                await member.up.wait()
                if member.error is not None:
                    raise member.error

    async def close(self, address: str) -> None:
        """Leave the node's ``open_cluster`` block normally and wait until it returned."""
        member = self._members[address]
        member.stop.set()
        with trio.fail_after(STEP):
            await member.done.wait()
        if member.error is not None:
            raise member.error

    async def kill(self, address: str) -> None:
        """Cancel everything the node runs, without any graceful step of ours."""
        member = self._members[address]
        member.scope.cancel()
        with trio.fail_after(STEP):
            await member.done.wait()

    def error(self, address: str) -> BaseException | None:
        return self._members[address].error

    async def leader(self, among: Callable[[], list[Cluster]] | None = None) -> Cluster:
        """The node that all running nodes agree is the leader (waits for agreement)."""
        with trio.fail_after(STEP):
            while True:
                nodes = among() if among is not None else self.nodes
                leaders = {c.leader for c in nodes}
                if len(leaders) == 1 and None not in leaders:
                    (leader,) = leaders
                    for c in nodes:
                        if c.node_id == leader and c.raft.role.value == "leader":
                            return c
                await trio.sleep(0.01)


@asynccontextmanager
async def local_cluster(
    size: int, *, seed: int = 0, start: bool = True
) -> AsyncIterator[LocalCluster]:
    socks = [bound_socket() for _ in range(size)]
    addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]
    async with trio.open_nursery() as nursery:
        lc = LocalCluster(nursery, addresses, socks, seed)
        if start:
            for address in addresses:
                lc.start(address)
            await lc.wait_up()
        try:
            yield lc
        finally:
            for member in lc._members.values():
                member.stop.set()
            with trio.move_on_after(STEP) as scope:
                for member in lc._members.values():
                    if member.started:
                        await member.done.wait()
            if scope.cancelled_caught:
                nursery.cancel_scope.cancel()
                raise AssertionError("nodes did not shut down within the deadline")
