"""One cluster node per OS process, driven through JSON lines (multi-process tests).

The child side runs as a script::

    python tests/cluster/_proc_node.py --fd 5 --address 127.0.0.1:7001 \\
        --peers 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 --cluster-id test --seed 1

``--fd`` is a TCP socket already bound to ``--address`` by the parent and
inherited by the child, so no port is ever picked twice. The node runs
``open_cluster`` with the harness's fast timings and ``data_dir=None``.
Requests arrive as JSON lines on stdin, each with a ``req`` number; the
answer to a request carries the same ``req``:

* ``{"op": "status"}`` → role, term, leader and applied index of the node;
* ``{"op": "wait_applied", "index": n}`` → once the node applied entry ``n``;
* ``{"op": "receive", "ns": ..., "buffer": n}`` → once the receiver's
  registration committed (``rid``, ``applied``); from then on every message
  it takes is reported in ``{"event": "got", "ns", "rid", "values"}`` lines;
* ``{"op": "send", "ns", "start", "stop", "step", "buffer", "timeout"}`` →
  tracked sends of ``range(start, stop, step)``; once the send channel's
  ``aclose`` returned, the outcome of every message: ``delivered`` by
  receiver id, the others by outcome;
* ``{"op": "close", "ns": ...}`` → once that receiver's ``aclose`` returned;
* ``{"op": "exit"}`` → leave the ``open_cluster`` block and exit 0.

The parent side, :class:`ProcNode` and :func:`proc_cluster`, starts the
processes, keeps what they report, and kills every one of them on the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from trio_dchan.cluster import Cluster
    from trio_dchan.dataplane import DistributedReceiveChannel, Receipt

#: Bound on any single awaited condition in these tests (a failure, never a pass).
STEP = 20.0

_SCRIPT = Path(__file__).resolve()


# --------------------------------------------------------------------------- child


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _json_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[dict[str, Any]]:
    pending = bytearray()
    while True:
        chunk = await stream.receive_some(1 << 16)
        if not chunk:
            return
        start = len(pending)
        pending += chunk
        end = pending.find(b"\n", start)
        if end < 0:
            continue
        head = 0
        while end >= 0:
            line = bytes(pending[head:end])
            head = end + 1
            if line.strip():
                yield json.loads(line)
            end = pending.find(b"\n", head)
        del pending[:head]


class _Child:
    """The requests one node process serves."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.receivers: dict[str, tuple[DistributedReceiveChannel, trio.CancelScope]] = {}

    def status(self) -> dict[str, Any]:
        raft = self.cluster.raft
        return {
            "role": raft.role.value,
            "term": raft.term,
            "leader": raft.leader,
            "applied": raft.applied_index,
        }

    async def handle(self, request: dict[str, Any]) -> None:
        req = request["req"]
        op = request["op"]
        if op == "status":
            _emit(event="reply", req=req, **self.status())
        elif op == "wait_applied":
            index = int(request["index"])
            await self.cluster.raft.wait_for(lambda n: n.applied_index >= index)
            _emit(event="reply", req=req, **self.status())
        elif op == "receive":
            await self.receive(req, request["ns"], int(request["buffer"]))
        elif op == "send":
            await self.send(req, request)
        elif op == "close":
            rx, scope = self.receivers.pop(request["ns"])
            scope.cancel()
            await rx.aclose()
            _emit(event="reply", req=req)
        else:
            raise ValueError(f"unknown op {op!r}")

    async def receive(self, req: int, ns: str, buffer: int) -> None:
        rx = self.cluster.receive(ns, buffer)
        scope = trio.CancelScope()
        self.receivers[ns] = (rx, scope)
        await rx.wait_registered()
        _emit(event="reply", req=req, rid=rx.receiver_id, **self.status())
        with scope:
            async for value in rx:
                # Report what is buffered already in the same line.
                values = [value]
                try:
                    while len(values) < 1000:
                        values.append(rx.receive_nowait())
                except trio.WouldBlock:
                    pass
                _emit(event="got", ns=ns, rid=rx.receiver_id, values=values)

    async def send(self, req: int, request: dict[str, Any]) -> None:
        from trio_dchan.dataplane import DeliveryUnknownError

        values = range(int(request["start"]), int(request["stop"]), int(request["step"]))
        timeout = float(request["timeout"])
        receipts: list[tuple[int, Receipt]] = []
        async with self.cluster.send(request["ns"], int(request["buffer"])) as tx:
            for value in values:
                receipts.append((value, await tx.send_tracked(value, timeout=timeout)))
        delivered: dict[str | None, list[int]] = defaultdict(list)
        failed: dict[str, list[int]] = defaultdict(list)
        for value, receipt in receipts:
            if not receipt.done():
                raise RuntimeError(f"aclose() returned before message {value} was decided")
            try:
                ok = await receipt.delivered()
            except DeliveryUnknownError:
                ok = False
            if ok:
                delivered[receipt.receiver_id].append(value)
            else:
                failed[receipt.outcome.value].append(value)
        _emit(event="reply", req=req, delivered=delivered, failed=failed)


async def _serve(args: argparse.Namespace) -> None:
    from _cluster_harness import FAST

    from trio_dchan.cluster import open_cluster

    sock = socket.socket(fileno=args.fd)
    async with open_cluster(
        args.address,
        cluster_id=args.cluster_id,
        peers=args.peers.split(","),
        settings=FAST,
        rng=random.Random(args.seed),
        sock=sock,
    ) as cluster:
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        async with trio.open_nursery() as nursery:
            child = _Child(cluster)
            _emit(event="up", pid=os.getpid(), **child.status())
            async for request in _json_lines(stdin):
                if request["op"] == "exit":
                    break
                nursery.start_soon(child.handle, request)
            # Leaving open_cluster closes the receivers that are still open.
            nursery.cancel_scope.cancel()
    _emit(event="exited")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one trio_dchan node for the tests")
    parser.add_argument("--fd", type=int, required=True, help="inherited bound TCP socket")
    parser.add_argument("--address", required=True)
    parser.add_argument("--peers", required=True, help="comma-separated addresses")
    parser.add_argument("--cluster-id", required=True)
    parser.add_argument("--seed", type=int, default=0)
    trio.run(_serve, parser.parse_args(argv))


# -------------------------------------------------------------------------- parent


class NodeDied(AssertionError):
    """A node process ended while the test still needed it."""


class _Board:
    """What the nodes of one test reported; wakes waiters on every report."""

    def __init__(self) -> None:
        self.nodes: list[ProcNode] = []
        self._changed = trio.Event()

    def pulse(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait (within :data:`STEP`) until ``predicate()`` holds after some node's report.

        Fails at once if a node the test did not kill ended meanwhile.
        """
        with trio.fail_after(STEP):
            while not predicate():
                for node in self.nodes:
                    if node.ended and not node.killed:
                        raise NodeDied(
                            f"node {node.address} ended while waiting for {what}:\n"
                            + node.log_tail()
                        )
                await self._changed.wait()


class ProcNode:
    """The test's handle on one node process."""

    def __init__(
        self,
        board: _Board,
        address: str,
        sock: socket.socket,
        peers: list[str],
        cluster_id: str,
        seed: int,
    ) -> None:
        self.board = board
        self.address = address
        self.peers = peers
        self.cluster_id = cluster_id
        self.seed = seed
        self.log_path: Path | None = None
        self.process: trio.Process | None = None
        self.killed = False
        self.ended = False
        self.up: dict[str, Any] | None = None
        #: Values this node's receivers reported, by namespace and receiver id.
        self.got: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        self._sock: socket.socket | None = sock
        self._replies: dict[int, dict[str, Any]] = {}
        self._next_req = 0
        self._lock = trio.Lock()

    # ---- lifecycle

    async def start(self, nursery: trio.Nursery, log_dir: Path) -> None:
        """Spawn the process and a task reading its reports (returns at once)."""
        sock, self._sock = self._sock, None
        if sock is None:
            raise RuntimeError(f"node {self.address} was already started")
        self.log_path = log_dir / f"node-{self.address.replace(':', '_')}.log"
        with sock, self.log_path.open("wb") as log:
            self.process = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    str(_SCRIPT),
                    "--fd",
                    str(sock.fileno()),
                    "--address",
                    self.address,
                    "--peers",
                    ",".join(self.peers),
                    "--cluster-id",
                    self.cluster_id,
                    "--seed",
                    str(self.seed),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                pass_fds=(sock.fileno(),),
            )
        nursery.start_soon(self._read, self.process)

    async def _read(self, process: trio.Process) -> None:
        try:
            if process.stdout is None:  # pragma: no cover - opened with a pipe
                return
            async for event in _json_lines(process.stdout):
                kind = event["event"]
                if kind == "got":
                    self.got[event["ns"]][event["rid"]].extend(event["values"])
                elif kind == "reply":
                    self._replies[event["req"]] = event
                elif kind == "up":
                    self.up = event
                self.board.pulse()
        finally:
            self.ended = True
            self.board.pulse()
            if process.returncode is None:
                process.kill()

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    async def kill(self) -> None:
        """SIGKILL the process and reap it."""
        process = self.process
        self.killed = True
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGKILL)
            with trio.move_on_after(STEP):
                await process.wait()

    async def exit(self) -> int | None:
        """Ask the node to leave its ``open_cluster`` block; its exit code, None if it hangs."""
        process = self.process
        if process is None:
            return None
        self.killed = True  # ending now is expected
        await self._write({"op": "exit"})
        with trio.move_on_after(STEP):
            return await process.wait()
        return None

    # ---- requests

    async def _write(self, request: dict[str, Any]) -> None:
        process = self.process
        if process is None or process.stdin is None:
            raise NodeDied(f"node {self.address} is not running")
        try:
            async with self._lock:
                await process.stdin.send_all((json.dumps(request) + "\n").encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise NodeDied(f"node {self.address} is gone:\n{self.log_tail()}") from exc

    async def submit(self, op: str, **args: Any) -> int:
        """Send a request; returns its number for :meth:`reply`."""
        self._next_req += 1
        req = self._next_req
        await self._write({"op": op, "req": req, **args})
        return req

    async def reply(self, req: int) -> dict[str, Any]:
        """The answer to request ``req`` (waits for it)."""
        await self.board.wait_until(
            lambda: req in self._replies, f"node {self.address} to answer request {req}"
        )
        return self._replies.pop(req)

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        return await self.reply(await self.submit(op, **args))

    def received(self, ns: str) -> int:
        """How many messages this node's receivers of ``ns`` reported so far."""
        return sum(len(v) for v in self.got[ns].values())


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@asynccontextmanager
async def proc_cluster(size: int, log_dir: Path, *, seed: int) -> AsyncIterator[_Board]:
    """Start ``size`` node processes forming one cluster; kill them all on the way out."""
    socks = [_bound_socket() for _ in range(size)]
    addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]
    rng = random.Random(seed)
    board = _Board()
    board.nodes = [
        ProcNode(board, a, s, addresses, f"mp-{seed}", rng.getrandbits(32))
        for a, s in zip(addresses, socks, strict=True)
    ]
    try:
        async with trio.open_nursery() as nursery:
            try:
                for node in board.nodes:
                    await node.start(nursery, log_dir)
                await board.wait_until(
                    lambda: all(n.up is not None for n in board.nodes), "every node to start"
                )
                yield board
            finally:
                with trio.CancelScope(shield=True):
                    for node in board.nodes:
                        await node.kill()
    finally:
        for s in socks:
            s.close()


if __name__ == "__main__":
    main()
