"""A Raft node over gRPC as an OS process, driven through stdin/stdout.

Used by the multi-process tests and the transport benchmark::

    python -m trio_dchan.transport._node_main --id 127.0.0.1:7001 \\
        --peers 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 --data-dir ./n1

The replicated state machine is an append-only list of the committed
commands, so a test can compare what every node applied. Requests arrive as
JSON lines on stdin; answers and events leave as JSON lines on stdout:

* ``{"op": "propose", "id": ..., "data": hex}`` → ``{"event": "committed",
  "id": ..., "index": ...}`` or ``{"event": "error", "id": ..., "error": ...}``
* ``{"op": "dump"}`` → ``{"event": "dump", "applied": [hex, ...], ...}``
* ``{"op": "status"}`` → ``{"event": "status", "role": ..., "leader": ...}``
* ``{"op": "bench", "concurrency": n, "count": n, "size": n}`` → throughput
  and latency of proposals made in this process (it should be the leader)
* ``{"op": "probe", "timeout": s}`` → propose until one commits; reports the
  ``time.monotonic()`` of that commit, comparable with the driver's own
  (fail-over measurements)
* ``{"op": "exit"}`` → leave cleanly.

The first line written is ``{"event": "ready"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

import cbor2
import trio

from trio_dchan.errors import DchanError
from trio_dchan.raft.node import RaftNode, RaftSettings, open_raft_node
from trio_dchan.raft.storage import FileStorage, MemoryStorage
from trio_dchan.raft.types import ConfState, Entry, EntryType

from ._transport import open_transport


class AppliedLog:
    """State machine: the list of applied commands, in log order."""

    def __init__(self) -> None:
        self.applied: list[bytes] = []
        self.indexes: list[int] = []
        #: (index, term, type) of every entry applied by this process (not restored).
        self.seen: list[tuple[int, int, int]] = []

    def apply(self, entry: Entry) -> object:
        self.seen.append((entry.index, entry.term, int(entry.type)))
        if entry.type is EntryType.NORMAL:
            self.applied.append(entry.data)
            self.indexes.append(entry.index)
        return entry.index

    def snapshot(self) -> bytes:
        return cbor2.dumps([self.applied, self.indexes])

    def restore(self, data: bytes) -> None:
        applied, indexes = cbor2.loads(data)
        self.applied = [bytes(a) for a in applied]
        self.indexes = [int(i) for i in indexes]


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _lines(stream: trio.abc.ReceiveStream) -> Any:
    buffer = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)


async def _propose(node: RaftNode, request: dict[str, Any]) -> None:
    try:
        index = await node.propose(bytes.fromhex(request["data"]))
    except DchanError as exc:
        _emit(event="error", id=request["id"], error=f"{type(exc).__name__}: {exc}")
    else:
        _emit(event="committed", id=request["id"], index=index)


async def _bench(node: RaftNode, request: dict[str, Any]) -> None:
    concurrency = int(request["concurrency"])
    count = int(request["count"])
    size = int(request.get("size", 64))
    payload = os.urandom(size // 2).hex().encode()[:size]
    latencies: list[float] = []
    errors = 0
    remaining = count

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            try:
                await node.propose(payload)
            except DchanError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    _emit(
        event="bench",
        committed=len(latencies),
        errors=errors,
        seconds=elapsed,
        rate=len(latencies) / elapsed if elapsed else 0.0,
        p50=pct(0.50),
        p99=pct(0.99),
    )


async def _probe(node: RaftNode, request: dict[str, Any]) -> None:
    deadline = trio.current_time() + float(request.get("timeout", 30))
    while trio.current_time() < deadline:
        try:
            with trio.move_on_after(1.0):
                await node.propose(b"probe")
                _emit(event="probe", t=time.monotonic())
                return
        except DchanError:
            await trio.sleep(0.005)
    _emit(event="probe", t=None)


async def serve(args: argparse.Namespace) -> None:
    peers: Sequence[str] = [p for p in args.peers.split(",") if p]
    storage: FileStorage | MemoryStorage
    if args.data_dir:
        storage = FileStorage(args.data_dir, cluster_id=args.cluster_id, node_id=args.id)
    else:
        storage = MemoryStorage()
    machine = AppliedLog()
    settings = RaftSettings(
        tick_interval=args.tick,
        election_ticks=args.election_ticks,
        heartbeat_ticks=args.heartbeat_ticks,
        snapshot_every=args.snapshot_every,
    )
    members = set(peers)
    try:
        async with (
            open_transport(
                args.id,
                args.id,
                cluster_id=args.cluster_id,
                peers={p: p for p in peers},
                is_member=members.__contains__,
                rng=random.Random(args.seed),
            ) as transport,
            open_raft_node(
                args.id,
                storage=storage,
                state_machine=machine,
                transport_factory=lambda n: transport.attach(raft_handler=n),
                settings=settings,
                initial_conf=ConfState(voters=frozenset(peers)),
                rng=random.Random(args.seed),
            ) as node,
        ):
            _emit(event="ready", pid=os.getpid())
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            async with trio.open_nursery() as nursery:
                async for request in _lines(stdin):
                    op = request.get("op")
                    if op == "propose":
                        nursery.start_soon(_propose, node, request)
                    elif op == "dump":
                        _emit(
                            event="dump",
                            applied=[a.hex() for a in machine.applied],
                            indexes=machine.indexes,
                            seen=machine.seen[-3000:],
                            role=node.role.value,
                            term=node.term,
                        )
                    elif op == "status":
                        _emit(
                            event="status",
                            role=node.role.value,
                            leader=node.leader,
                            term=node.term,
                            commit=node.commit_index,
                        )
                    elif op == "bench":
                        nursery.start_soon(_bench, node, request)
                    elif op == "probe":
                        nursery.start_soon(_probe, node, request)
                    elif op == "exit":
                        break
                nursery.cancel_scope.cancel()
    finally:
        storage.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--id", required=True, help="this node's id = its host:port")
    parser.add_argument("--peers", required=True, help="comma-separated ids of all voters")
    parser.add_argument("--cluster-id", default="dchan-test")
    parser.add_argument("--data-dir", default=None, help="durable storage; in memory if omitted")
    parser.add_argument("--seed", type=int, default=0)
    defaults = RaftSettings()
    parser.add_argument("--tick", type=float, default=defaults.tick_interval)
    parser.add_argument("--election-ticks", type=int, default=defaults.election_ticks)
    parser.add_argument("--heartbeat-ticks", type=int, default=defaults.heartbeat_ticks)
    parser.add_argument("--snapshot-every", type=int, default=defaults.snapshot_every)
    args = parser.parse_args(argv)
    trio.run(serve, args)


if __name__ == "__main__":
    main()


class NodeProcess:
    """The parent's handle on one node process (tests and benchmarks).

    ``events`` receives every JSON event the node writes, except the answers
    to proposals, which are collected in :attr:`committed` and :attr:`failed`.
    """

    def __init__(
        self,
        node_id: str,
        peers: Sequence[str],
        *,
        data_dir: str | None,
        cluster_id: str = "dchan-test",
        seed: int = 0,
        extra_args: Sequence[str] = (),
        log_path: str | None = None,
    ) -> None:
        self.node_id = node_id
        self.peers = list(peers)
        self.data_dir = data_dir
        self.cluster_id = cluster_id
        self.seed = seed
        self.extra_args = list(extra_args)
        self.log_path = log_path
        self.process: trio.Process | None = None
        self.committed: set[str] = set()
        #: For each committed proposal: the apply result (its log index here).
        self.committed_at: dict[str, Any] = {}
        #: Ids of proposals sent to the running process that it has not yet
        #: answered (committed or error). Emptied when the process exits: a dead
        #: process reports nothing more, whatever became of its proposals.
        self.outstanding: set[str] = set()
        #: For each proposal answered with an error: the error.
        self.failed: dict[str, str] = {}
        self._answered = trio.Event()
        self._events_send, self.events = trio.open_memory_channel[dict[str, Any]](1000)
        self.ready = trio.Event()
        self.starts = 0
        self._send_lock = trio.Lock()

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "trio_dchan.transport._node_main",
            "--id",
            self.node_id,
            "--peers",
            ",".join(self.peers),
            "--cluster-id",
            self.cluster_id,
            "--seed",
            str(self.seed + 1000 * self.starts),
        ]
        if self.data_dir:
            cmd += ["--data-dir", self.data_dir]
        return cmd + self.extra_args

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the process and a task reading its events; returns once it is ready."""
        import subprocess

        self.ready = trio.Event()
        stderr: int = subprocess.DEVNULL
        if self.log_path:
            stderr = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            self.process = await trio.lowlevel.open_process(
                self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
            )
        finally:
            if self.log_path:
                os.close(stderr)
        self.starts += 1
        self.outstanding = set()
        nursery.start_soon(self._read, self.process, self.outstanding)
        await self.ready.wait()

    async def _read(self, process: trio.Process, outstanding: set[str]) -> None:
        try:
            if process.stdout is None:  # pragma: no cover - opened with a pipe
                return
            async for event in _lines(process.stdout):
                kind = event.get("event")
                if kind == "ready":
                    self.ready.set()
                elif kind == "committed":
                    self.committed.add(event["id"])
                    self.committed_at[event["id"]] = event.get("index")
                    self._answer(outstanding, event["id"])
                elif kind == "error" and isinstance(event.get("id"), str):
                    self.failed[event["id"]] = str(event.get("error"))
                    self._answer(outstanding, event["id"])
                else:
                    await self._events_send.send(event)
        finally:
            # Whoever runs this reader owns the process: never leave it behind.
            if process.returncode is None:
                process.kill()
            outstanding.clear()
            self._answered.set()

    def _answer(self, outstanding: set[str], proposal_id: object) -> None:
        if isinstance(proposal_id, str):
            outstanding.discard(proposal_id)
        self._answered.set()

    async def wait_answered(self) -> None:
        """Wait until the process answered every proposal sent to it (or exited)."""
        while self.outstanding:
            self._answered = trio.Event()
            await self._answered.wait()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def send(self, **request: Any) -> bool:
        """Send one request; ``False`` if the process is gone."""
        process = self.process
        if process is None or process.stdin is None or process.returncode is not None:
            return False
        proposal_id = request.get("id") if request.get("op") == "propose" else None
        outstanding = self.outstanding
        if isinstance(proposal_id, str):
            outstanding.add(proposal_id)
        try:
            async with self._send_lock:
                await process.stdin.send_all((json.dumps(request) + "\n").encode())
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if isinstance(proposal_id, str):
                outstanding.discard(proposal_id)
            return False
        if isinstance(proposal_id, str) and process.returncode is not None:
            # Died meanwhile: its reader may already have given up on its answers.
            outstanding.discard(proposal_id)
        return True

    async def ask(self, op: str, event: str, **request: Any) -> dict[str, Any]:
        """Send ``op`` and return the next event named ``event``."""
        if not await self.send(op=op, **request):
            raise RuntimeError(f"node {self.node_id} is not running")
        while True:
            got = await self.events.receive()
            if got.get("event") == event:
                return got

    async def kill(self) -> None:
        """SIGKILL the process and reap it."""
        import signal

        process = self.process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGKILL)
            await process.wait()
        # Drop events of the dead process that nobody asked for.
        while True:
            try:
                self.events.receive_nowait()
            except trio.WouldBlock:
                break

    async def stop(self) -> None:
        """Ask the process to leave cleanly; kill it if it does not within 5 s."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        await self.send(op="exit")
        with trio.move_on_after(5):
            await process.wait()
        await self.kill()


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out on 127.0.0.1 (distinct; free at return)."""
    import socket

    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
