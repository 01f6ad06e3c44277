"""Distributed channels between processes on loopback, against baselines in the same run.

Figures (each side in its own OS process; asyncio-based code never shares a
process with another library, since trio-asyncio changes the loop policy):

* trio_dchan, a sender process and a receiver process, each running
  ``open_cluster`` with the same 2-node peer list, one namespace, buffer 256,
  the sender awaiting ``send()`` per message, the receiver using ``async for``:
  small messages ``{"id": i, "item": "widget", "qty": 3}``, 4 KiB messages,
  the same two again with receivers that also prefetch 768 messages
  (``cluster.receive(ns, buffer=256, prefetch=768)``: the node may hold
  that many more while the buffer is full, so the next batch is on its way
  when the buffer drains), ``send_tracked`` on every message with the receipts awaited concurrently,
  p50 latency of one tracked send to its delivered receipt (one in flight),
  and the sender's RSS growth while a receiver that never reads is offered
  1,000,000 messages (each offered with ``send_nowait``, which takes it or
  raises ``WouldBlock``; then one awaited ``send()`` must block);
* trio_dchan, 3 processes of a 3-node cluster, each with a sender and a
  receiver on one namespace: aggregate throughput;
* baselines: a Trio memory channel (buffer 256) between two tasks of one
  process; raw Trio TCP with batched, length-prefixed cbor2 frames (two
  processes, plus a one-message ping-pong for latency); pyzmq PUSH/PULL (two
  processes); and the gRPC data link alone (two processes running only the
  transport, one frame bounced back and forth): the round trip the data
  plane itself cannot go below. Every baseline carries the same values, encoded with cbor2
  where it crosses a process boundary (the memory channel passes objects);
* the floor: one Trio checkpoint (each ``send()`` and ``receive()`` is one)
  plus encoding or decoding one message, timed alone; its inverse is the
  ceiling of any Trio channel across processes that did nothing else.

Throughput = messages / (time the receiver got the last one - time the sender
started), both read from the machine's wall clock. Run:
``.venv/bin/python benchmarks/bench_channels.py`` (a few minutes on a loaded
machine; ``--quick`` for a smaller run). The last line printed is one JSON
object with every figure and ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

BUFFER = 256
#: The receivers of the ``*_prefetch`` phases may also hold this many messages
#: sent while their buffer was full (``cluster.receive(ns, prefetch=...)``).
PREFETCH = 3 * BUFFER
SMALL_BYTES = 4096
HERE = os.path.abspath(__file__)


def small(i: int) -> dict[str, Any]:
    return {"id": i, "item": "widget", "qty": 3}


BIG_PAD = "x" * (SMALL_BYTES - 40)


def big(i: int) -> dict[str, Any]:
    return {"id": i, "pad": BIG_PAD}


def emit(**event: Any) -> None:
    """One event for the driver. Times in events (``at``) compare across
    processes: they come from ``time.monotonic()``, one clock for the whole
    machine that, unlike ``time.time()``, does not jump when the system clock
    is set."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def runqueue_seconds() -> float:
    """Time this process was runnable but waiting for a CPU (Linux schedstat)."""
    try:
        with open("/proc/self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except OSError:
        return float("nan")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------ memory channel --


def child_memchan(count: int) -> None:
    import trio

    async def main() -> None:
        send, receive = trio.open_memory_channel[Any](BUFFER)
        start = time.monotonic()
        wait0 = runqueue_seconds()

        async def produce() -> None:
            async with send:
                for i in range(count):
                    await send.send(small(i))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            n = 0
            async for _ in receive:
                n += 1
        elapsed = time.monotonic() - start
        emit(
            kind="result",
            rate=n / elapsed,
            runqueue_fraction=(runqueue_seconds() - wait0) / elapsed,
        )

    trio.run(main)


# ----------------------------------------------------------------- the floor --


def child_floor(count: int) -> None:
    """What any Trio channel between two processes pays per message at least.

    Every ``send()`` and every ``receive()`` is a Trio checkpoint (the rule
    memory channels follow), which costs one pass of Trio's scheduler; measured
    here with an asyncio loop open, as in a node. Add the codec: encoding a
    message on one side, decoding it (in a batch of 256) on the other. The
    slower side bounds the rate of a design that did nothing else.
    """
    import trio
    import trio_asyncio

    from trio_dchan import codec

    values = [small(i) for i in range(BUFFER)]
    batch = codec.join_encoded([codec.encode(v) for v in values])

    def per_call(fn: Any, reps: int) -> float:
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            for _ in range(reps):
                fn()
            best = min(best, (time.process_time() - start) / reps)
        return best

    async def main() -> None:
        async with trio_asyncio.open_loop():
            checkpoint = trio.lowlevel.cancel_shielded_checkpoint
            start = time.process_time()
            for _ in range(count):
                await checkpoint()
            pass_s = (time.process_time() - start) / count
        encode_s = per_call(lambda: codec.encode(values[7]), count // 5)
        decode_s = per_call(lambda: codec.decode_batch(batch), count // (5 * BUFFER)) / BUFFER
        emit(kind="result", checkpoint=pass_s, encode=encode_s, decode=decode_s)

    trio.run(main)


def run_floor(count: int) -> dict[str, float]:
    child = Child("floor", str(count))
    result = child.next("result")
    child.wait()
    side = max(result["checkpoint"] + result["encode"], result["checkpoint"] + result["decode"])
    return {
        "checkpoint_us": result["checkpoint"] * 1e6,
        "encode_us": result["encode"] * 1e6,
        "decode_us": result["decode"] * 1e6,
        "ceiling": 1.0 / side,
    }


# ------------------------------------------------------------------ raw TCP --

_LEN = struct.Struct("!I")


async def _read_frame(stream: Any, buf: bytearray) -> bytes | None:
    while True:
        if len(buf) >= 4:
            (n,) = _LEN.unpack_from(buf)
            if len(buf) >= 4 + n:
                frame = bytes(buf[4 : 4 + n])
                del buf[: 4 + n]
                return frame
        data = await stream.receive_some(1 << 16)
        if not data:
            return None
        buf += data


def child_tcp_recv(fd: int) -> None:
    import cbor2
    import trio

    async def main() -> None:
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
        sock.listen(8)
        listener = trio.SocketListener(sock)
        emit(kind="ready")
        while True:
            stream = await listener.accept()
            buf = bytearray()
            header = await _read_frame(stream, buf)
            if header is None:
                return
            phase = cbor2.loads(header)
            if phase["name"] == "quit":
                return
            if phase["name"] == "ping":
                while (frame := await _read_frame(stream, buf)) is not None:
                    cbor2.loads(frame)
                    await stream.send_all(_LEN.pack(len(frame)) + frame)
                continue
            n = 0
            while n < phase["count"]:
                frame = await _read_frame(stream, buf)
                if frame is None:
                    break
                for _ in cbor2.loads(frame):
                    n += 1
            emit(kind="end", phase=phase["name"], at=time.monotonic(), count=n)
            await stream.aclose()

    trio.run(main)


def child_tcp_send(port: int, count_small: int, count_big: int, pings: int) -> None:
    import cbor2
    import trio

    async def throughput(name: str, count: int, make: Any) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = cbor2.dumps({"name": name, "count": count})
        await stream.send_all(_LEN.pack(len(head)) + head)
        emit(kind="start", phase=name, at=time.monotonic())
        batch: list[Any] = []
        for i in range(count):
            batch.append(make(i))
            if len(batch) == BUFFER:
                frame = cbor2.dumps(batch)
                await stream.send_all(_LEN.pack(len(frame)) + frame)
                batch = []
        if batch:
            frame = cbor2.dumps(batch)
            await stream.send_all(_LEN.pack(len(frame)) + frame)
        await stream.receive_some(1)  # the receiver closes once it has everything
        await stream.aclose()

    async def ping() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = cbor2.dumps({"name": "ping"})
        await stream.send_all(_LEN.pack(len(head)) + head)
        buf = bytearray()
        samples = []
        for i in range(pings):
            t0 = time.perf_counter()
            frame = cbor2.dumps(small(i))
            await stream.send_all(_LEN.pack(len(frame)) + frame)
            reply = await _read_frame(stream, buf)
            if reply is None:
                raise RuntimeError("ping-pong peer went away")
            cbor2.loads(reply)
            samples.append(time.perf_counter() - t0)
        await stream.aclose()
        emit(kind="latency", p50=statistics.median(samples))

    async def main() -> None:
        await throughput("small", count_small, small)
        await throughput("big", count_big, big)
        await ping()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        head = cbor2.dumps({"name": "quit"})
        await stream.send_all(_LEN.pack(len(head)) + head)
        await stream.aclose()

    trio.run(main)


# -------------------------------------------------------------------- pyzmq --


def child_zmq_pull(port: int) -> None:
    import cbor2
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{port}")
    emit(kind="ready")
    for phase in ("small", "big"):
        count = cbor2.loads(pull.recv())
        for _ in range(count):
            cbor2.loads(pull.recv())
        emit(kind="end", phase=phase, at=time.monotonic(), count=count)
    pull.close()
    ctx.term()


def child_zmq_push(port: int, count_small: int, count_big: int) -> None:
    import cbor2
    import zmq

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    for phase, count, make in (("small", count_small, small), ("big", count_big, big)):
        push.send(cbor2.dumps(count))
        emit(kind="start", phase=phase, at=time.monotonic())
        for i in range(count):
            push.send(cbor2.dumps(make(i)))
    push.close(linger=-1)
    ctx.term()


# --------------------------------------------------------------- trio_dchan --


def _settings() -> Any:
    import dataclasses

    from trio_dchan.cluster import Settings

    base = Settings()
    # Whole-cluster shutdown at the end of a phase: no quorum remains to
    # commit unregistrations, so do not wait the default time for them.
    return dataclasses.replace(
        base,
        dataplane=dataclasses.replace(
            base.dataplane,
            unregister_timeout=0.5,
            handoff_timeout=0.5,
        ),
    )


async def _wait_quit() -> None:
    import trio

    stream = trio.lowlevel.FdStream(os.dup(0))
    async with stream:
        while True:
            data = await stream.receive_some(1024)
            if not data or b"quit" in data:
                return


async def _wait_receivers(cluster: Any, namespace: str, n: int) -> None:
    import trio

    tx = cluster.send(namespace)
    with trio.fail_after(30):
        while tx.statistics().receivers < n:  # noqa: ASYNC110 - a statistic, no event
            await trio.sleep(0.01)
    tx.close()


def child_dchan_recv(fd: int, address: str, peers: list[str], counts: dict[str, int]) -> None:
    import trio

    from trio_dchan.cluster import open_cluster

    async def main() -> None:
        sock = socket.socket(fileno=fd)
        async with open_cluster(
            address, cluster_id="bench", peers=peers, settings=_settings(), sock=sock
        ) as cluster:
            stuck = cluster.receive("stuck", buffer=BUFFER)  # never reads
            channels = {
                ns: cluster.receive(
                    ns, buffer=BUFFER, prefetch=PREFETCH if ns.endswith("_prefetch") else 0
                )
                for ns in counts
            }
            for ch in (stuck, *channels.values()):
                await ch.wait_registered()
            emit(kind="ready")

            async def consume(ns: str, count: int) -> None:
                n = 0
                cpu0 = 0.0
                async for _ in channels[ns]:
                    if n == 0:
                        cpu0 = cpu_seconds()
                    n += 1
                    if n == count:
                        break
                cpu = (cpu_seconds() - cpu0) / max(n - 1, 1)
                emit(kind="end", phase=ns, at=time.monotonic(), count=n, cpu_per_message=cpu)

            async with trio.open_nursery() as nursery:
                for ns, count in counts.items():
                    nursery.start_soon(consume, ns, count)
            await _wait_quit()

    trio.run(main)


def child_dchan_send(
    fd: int, address: str, peers: list[str], counts: dict[str, int], pings: int, offer: int
) -> None:
    import trio

    from trio_dchan.cluster import open_cluster

    async def throughput(cluster: Any, ns: str, make: Any) -> None:
        count = counts[ns]
        await _wait_receivers(cluster, ns, 1)
        cpu0 = cpu_seconds()
        wait0 = runqueue_seconds()
        start = time.monotonic()
        emit(kind="start", phase=ns, at=start)
        async with cluster.send(ns) as tx:
            for i in range(count):
                await tx.send(make(i))
        emit(
            kind="cpu",
            phase=ns,
            per_message=(cpu_seconds() - cpu0) / count,
            runqueue_fraction=(runqueue_seconds() - wait0) / (time.monotonic() - start),
        )

    async def tracked(cluster: Any) -> None:
        count = counts["tracked"]
        await _wait_receivers(cluster, "tracked", 1)
        receipts: list[Any] = []
        more = trio.Event()
        failures = 0

        async def wait_receipts() -> None:
            nonlocal more, failures
            i = 0
            while i < count:
                if i == len(receipts):
                    more = trio.Event()
                    await more.wait()
                    continue
                if not await receipts[i].delivered():
                    failures += 1
                i += 1

        emit(kind="start", phase="tracked", at=time.monotonic())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_receipts)
            async with cluster.send("tracked") as tx:
                for i in range(count):
                    receipts.append(await tx.send_tracked(small(i)))
                    more.set()
        if failures:
            raise RuntimeError(f"{failures} tracked messages were not delivered")

    async def latency(cluster: Any) -> None:
        await _wait_receivers(cluster, "latency", 1)
        samples = []
        async with cluster.send("latency") as tx:
            for i in range(pings):
                t0 = time.perf_counter()
                receipt = await tx.send_tracked(small(i))
                if not await receipt.delivered():
                    raise RuntimeError("a latency probe was not delivered")
                samples.append(time.perf_counter() - t0)
        emit(kind="latency", p50=statistics.median(samples))

    async def backpressure(cluster: Any) -> None:
        # Every one of the `offer` messages is offered: send_nowait() takes
        # it or raises WouldBlock, so a sender that buffered without limit
        # would take them all (and grow). A checkpoint every thousand lets
        # the node's tasks run (credit, frames). Then one awaited send()
        # must block.
        await _wait_receivers(cluster, "stuck", 1)
        before = rss_bytes()
        accepted = 0
        async with cluster.send("stuck") as tx:
            for i in range(offer):
                try:
                    tx.send_nowait(small(i))
                    accepted += 1
                except trio.WouldBlock:
                    pass
                if i % 1000 == 999:
                    await trio.lowlevel.checkpoint()
            with trio.move_on_after(1.0) as waiting:
                await tx.send(small(offer))
            after = rss_bytes()
            tx.close()
        emit(
            kind="rss",
            growth=after - before,
            accepted=accepted,
            offered=offer,
            blocked=waiting.cancelled_caught,
        )

    async def main() -> None:
        sock = socket.socket(fileno=fd)
        async with open_cluster(
            address, cluster_id="bench", peers=peers, settings=_settings(), sock=sock
        ) as cluster:
            await throughput(cluster, "small", small)
            await throughput(cluster, "big", big)
            await throughput(cluster, "small_prefetch", small)
            await throughput(cluster, "big_prefetch", big)
            await tracked(cluster)
            await latency(cluster)
            await backpressure(cluster)
            emit(kind="done")
            await _wait_quit()

    trio.run(main)


def child_dchan_agg(fd: int, address: str, peers: list[str], count: int) -> None:
    import trio

    from trio_dchan.cluster import open_cluster

    async def main() -> None:
        sock = socket.socket(fileno=fd)
        async with open_cluster(
            address, cluster_id="bench3", peers=peers, settings=_settings(), sock=sock
        ) as cluster:
            rx = cluster.receive("agg", buffer=BUFFER)
            await rx.wait_registered()
            await _wait_receivers(cluster, "agg", len(peers))
            got = 0
            last = 0.0

            async def consume() -> None:
                nonlocal got, last
                async for _ in rx:
                    got += 1
                    last = time.monotonic()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                emit(kind="start", at=time.monotonic())
                async with cluster.send("agg") as tx:
                    for i in range(count):
                        await tx.send(small(i))
                emit(kind="sent")
                await _wait_quit()
                # Every sender finished: all messages sit in some buffer.
                while rx.statistics().current_buffer_used:  # noqa: ASYNC110
                    await trio.sleep(0.001)
                emit(kind="end", at=last, count=got)
                nursery.cancel_scope.cancel()
            # Unregister while every node is still up to commit it, then
            # leave once the others did the same.
            await rx.aclose()
            emit(kind="closed")
            await _wait_quit()

    trio.run(main)


# ------------------------------------------- the transport's link, alone --


def child_link_echo(fd: int, address: str, peer: str) -> None:
    """Serve data-plane streams that send every frame straight back."""
    import trio

    from trio_dchan.transport import open_transport

    class Echo:
        async def serve_stream(self, peer: str, link: Any) -> None:
            while True:
                try:
                    frame = await link.receive_frame()
                except trio.EndOfChannel:
                    return
                await link.send_frame(frame)

    async def main() -> None:
        sock = socket.socket(fileno=fd)
        async with open_transport(
            address, address, cluster_id="link", peers={peer: peer}, data_handler=Echo(), sock=sock
        ):
            emit(kind="ready")
            await _wait_quit()

    trio.run(main)


def child_link_ping(fd: int, address: str, peer: str, pings: int) -> None:
    """Frame ping-pong over one data link: the transport's own round trip."""
    import trio

    from trio_dchan import codec
    from trio_dchan.transport import open_transport

    async def main() -> None:
        sock = socket.socket(fileno=fd)
        async with open_transport(
            address, address, cluster_id="link", peers={peer: peer}, sock=sock
        ) as transport:
            link = await transport.open_link(peer)
            frame = codec.join_encoded([codec.encode(small(0))])
            samples = []
            for _ in range(pings):
                t0 = time.perf_counter()
                await link.send_frame(frame)
                await link.receive_frame()
                samples.append(time.perf_counter() - t0)
            await link.aclose()
            emit(kind="latency", p50=statistics.median(samples))

    trio.run(main)


# ------------------------------------------------------------------- driver --


class Child:
    def __init__(self, role: str, *args: str, fds: tuple[int, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, HERE, "--child", role, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=fds,
            text=True,
        )
        self.events: list[dict[str, Any]] = []

    def next(self, kind: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = json.loads(line)
            self.events.append(event)
            if event["kind"] == kind:
                return event
        raise RuntimeError(f"child {self.proc.args[3]} ended before reporting {kind!r}")

    def quit(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def wait(self, timeout: float = 30) -> None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"child {self.proc.args[3]} did not exit") from None
        if code:
            raise RuntimeError(f"child {self.proc.args[3]} exited with {code}")


def bound() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.set_inheritable(True)
    return sock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rate(start: dict[str, Any], end: dict[str, Any]) -> float:
    return float(end["count"]) / (end["at"] - start["at"])


def run_memchan(count: int) -> tuple[float, float]:
    child = Child("memchan", str(count))
    result = child.next("result")
    child.wait()
    return float(result["rate"]), float(result["runqueue_fraction"])


def run_tcp(counts: dict[str, int], pings: int) -> dict[str, float]:
    sock = bound()
    recv = Child("tcp-recv", str(sock.fileno()), fds=(sock.fileno(),))
    recv.next("ready")
    send = Child(
        "tcp-send",
        str(sock.getsockname()[1]),
        str(counts["small"]),
        str(counts["big"]),
        str(pings),
    )
    sock.close()
    out: dict[str, float] = {}
    for phase in ("small", "big"):
        start = send.next("start")
        out[phase] = rate(start, recv.next("end"))
    out["ping_p50_s"] = float(send.next("latency")["p50"])
    send.wait()
    recv.wait()
    return out


def run_zmq(counts: dict[str, int]) -> dict[str, float]:
    port = free_port()
    pull = Child("zmq-pull", str(port))
    pull.next("ready")
    push = Child("zmq-push", str(port), str(counts["small"]), str(counts["big"]))
    out: dict[str, float] = {}
    for phase in ("small", "big"):
        start = push.next("start")
        out[phase] = rate(start, pull.next("end"))
    push.wait()
    pull.wait()
    return out


def run_link_pingpong(pings: int) -> float:
    socks = [bound(), bound()]
    addrs = [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]
    echo = Child("link-echo", str(socks[1].fileno()), addrs[1], addrs[0], fds=(socks[1].fileno(),))
    try:
        echo.next("ready")
        ping = Child(
            "link-ping",
            str(socks[0].fileno()),
            addrs[0],
            addrs[1],
            str(pings),
            fds=(socks[0].fileno(),),
        )
        for s in socks:
            s.close()
        p50 = float(ping.next("latency")["p50"])
        ping.wait()
    finally:
        echo.quit()
    echo.wait()
    return p50


THROUGHPUT_PHASES = ("small", "big", "small_prefetch", "big_prefetch")


def run_dchan_pair(counts: dict[str, int], pings: int, offer: int) -> dict[str, Any]:
    socks = [bound(), bound()]
    addrs = [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]
    peers = json.dumps(addrs)
    recv_counts = {k: counts[k] for k in (*THROUGHPUT_PHASES, "tracked")} | {"latency": pings}
    recv = Child(
        "dchan-recv",
        str(socks[1].fileno()),
        addrs[1],
        peers,
        json.dumps(recv_counts),
        fds=(socks[1].fileno(),),
    )
    send = Child(
        "dchan-send",
        str(socks[0].fileno()),
        addrs[0],
        peers,
        json.dumps(counts),
        str(pings),
        str(offer),
        fds=(socks[0].fileno(),),
    )
    for s in socks:
        s.close()
    out: dict[str, Any] = {}
    try:
        recv.next("ready")
        for phase in THROUGHPUT_PHASES:
            start = send.next("start")
            end = recv.next("end")
            out[phase] = rate(start, end)
            out[f"{phase}_receiver_cpu_us_per_msg"] = end["cpu_per_message"] * 1e6
            cpu = send.next("cpu")
            out[f"{phase}_sender_cpu_us_per_msg"] = cpu["per_message"] * 1e6
            out[f"{phase}_sender_runqueue_fraction"] = cpu["runqueue_fraction"]
        out["tracked"] = rate(send.next("start"), recv.next("end"))
        out["latency_p50_s"] = float(send.next("latency")["p50"])
        rss = send.next("rss")
        out["rss_growth_bytes"] = int(rss["growth"])
        out["rss_accepted"] = int(rss["accepted"])
        out["rss_offered"] = int(rss["offered"])
        out["rss_send_blocked"] = bool(rss["blocked"])
        send.next("done")
    finally:
        # The receiving node leaves first, while the sending node still makes
        # a quorum to commit the unregistration of its receivers.
        recv.quit()
        try:
            recv.wait()
        finally:
            send.quit()
            send.wait()
    return out


def run_dchan_three(count: int) -> float:
    socks = [bound() for _ in range(3)]
    addrs = [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]
    peers = json.dumps(addrs)
    nodes = [
        Child("dchan-agg", str(s.fileno()), a, peers, str(count), fds=(s.fileno(),))
        for s, a in zip(socks, addrs, strict=True)
    ]
    for s in socks:
        s.close()
    try:
        starts = [n.next("start")["at"] for n in nodes]
        for n in nodes:
            n.next("sent")
    finally:
        for n in nodes:
            n.quit()
    ends = [n.next("end") for n in nodes]
    for n in nodes:
        n.next("closed")
    for n in nodes:
        n.quit()
    for n in nodes:
        n.wait()
    total = sum(e["count"] for e in ends)
    if total != 3 * count:
        raise RuntimeError(f"3-node run: {total} of {3 * count} messages received")
    return total / (max(e["at"] for e in ends) - min(starts))


def child_main(role: str, args: list[str]) -> None:
    target = os.environ.get("BENCH_PROFILE_DIR")
    if target and role.startswith(("dchan", "link")):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        try:
            _child_main(role, args)
        finally:
            profiler.disable()
            profiler.dump_stats(os.path.join(target, f"{role}-{os.getpid()}.prof"))
        return
    _child_main(role, args)


def _child_main(role: str, args: list[str]) -> None:
    if role == "memchan":
        child_memchan(int(args[0]))
    elif role == "floor":
        child_floor(int(args[0]))
    elif role == "tcp-recv":
        child_tcp_recv(int(args[0]))
    elif role == "tcp-send":
        child_tcp_send(int(args[0]), int(args[1]), int(args[2]), int(args[3]))
    elif role == "zmq-pull":
        child_zmq_pull(int(args[0]))
    elif role == "zmq-push":
        child_zmq_push(int(args[0]), int(args[1]), int(args[2]))
    elif role == "dchan-recv":
        child_dchan_recv(int(args[0]), args[1], json.loads(args[2]), json.loads(args[3]))
    elif role == "dchan-send":
        child_dchan_send(
            int(args[0]),
            args[1],
            json.loads(args[2]),
            json.loads(args[3]),
            int(args[4]),
            int(args[5]),
        )
    elif role == "link-echo":
        child_link_echo(int(args[0]), args[1], args[2])
    elif role == "link-ping":
        child_link_ping(int(args[0]), args[1], args[2], int(args[3]))
    elif role == "dchan-agg":
        child_dchan_agg(int(args[0]), args[1], json.loads(args[2]), int(args[3]))
    else:
        raise SystemExit(f"unknown child role {role!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    parser.add_argument(
        "--only-dchan", action="store_true", help="skip the baselines (while profiling)"
    )
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        child_main(opts.child[0], opts.child[1:])
        return
    scale = 0.2 if opts.quick else 1.0
    counts = {
        "small": int(300_000 * scale),
        "big": int(30_000 * scale),
        "small_prefetch": int(300_000 * scale),
        "big_prefetch": int(50_000 * scale),
        "tracked": int(150_000 * scale),
    }
    pings = int(2_000 * scale)
    offer = 1_000_000

    print(f"load average before: {os.getloadavg()}", flush=True)
    if opts.only_dchan:
        print(json.dumps(run_dchan_pair(counts, pings, offer)), flush=True)
        return
    memchan, memchan_wait = run_memchan(counts["small"])
    print(
        f"trio memory channel, 2 tasks:   {memchan:>10,.0f} msgs/s "
        f"(waiting for a CPU {memchan_wait:.0%} of the time)",
        flush=True,
    )
    floor = run_floor(counts["small"])
    print(
        f"floor per message: one Trio checkpoint {floor['checkpoint_us']:.2f} us, cbor2 encode "
        f"{floor['encode_us']:.2f} us, decode {floor['decode_us']:.2f} us; a two-process Trio "
        f"channel doing nothing else tops out at {floor['ceiling']:,.0f} msgs/s",
        flush=True,
    )
    tcp = run_tcp(counts, pings)
    print(
        f"raw trio TCP, batched cbor2:    {tcp['small']:>10,.0f} msgs/s small, "
        f"{tcp['big']:,.0f} msgs/s 4 KiB, ping-pong p50 {tcp['ping_p50_s'] * 1e6:.0f} us",
        flush=True,
    )
    link_p50 = run_link_pingpong(pings)
    print(
        f"gRPC data link alone, frame ping-pong p50: {link_p50 * 1e6:.0f} us "
        "(the transport's round trip under every tracked send)",
        flush=True,
    )
    zmq = run_zmq(counts)
    print(
        f"pyzmq PUSH/PULL:                {zmq['small']:>10,.0f} msgs/s small, "
        f"{zmq['big']:,.0f} msgs/s 4 KiB",
        flush=True,
    )
    dc = run_dchan_pair(counts, pings, offer)
    print(
        f"trio_dchan, 2 processes:        {dc['small']:>10,.0f} msgs/s small "
        f"({dc['small_sender_cpu_us_per_msg']:.1f} us sender CPU/msg, "
        f"{dc['small_receiver_cpu_us_per_msg']:.1f} us receiver CPU/msg, sender waiting for "
        f"a CPU {dc['small_sender_runqueue_fraction']:.0%} of the time), "
        f"{dc['big']:,.0f} msgs/s 4 KiB, {dc['tracked']:,.0f} msgs/s tracked, "
        f"tracked p50 {dc['latency_p50_s'] * 1e6:.0f} us",
        flush=True,
    )
    print(
        f"trio_dchan, receivers with prefetch={PREFETCH}: "
        f"{dc['small_prefetch']:>10,.0f} msgs/s small "
        f"({dc['small_prefetch_sender_cpu_us_per_msg']:.1f} us sender CPU/msg, "
        f"{dc['small_prefetch_receiver_cpu_us_per_msg']:.1f} us receiver CPU/msg), "
        f"{dc['big_prefetch']:,.0f} msgs/s 4 KiB",
        flush=True,
    )
    print(
        f"  never-reading receiver: {dc['rss_accepted']:,} of {dc['rss_offered']:,} "
        f"offered accepted, then send() "
        f"{'blocked' if dc['rss_send_blocked'] else 'did NOT block'}; "
        f"sender RSS growth {dc['rss_growth_bytes'] / 2**20:+.1f} MiB",
        flush=True,
    )
    three = run_dchan_three(int(50_000 * scale))
    print(
        f"trio_dchan, 3 nodes x (1 sender + 1 receiver): {three:,.0f} msgs/s aggregate", flush=True
    )

    figures: dict[str, Any] = {
        "memchan_small_msgs_per_s": round(memchan),
        "floor_checkpoint_us": round(floor["checkpoint_us"], 2),
        "floor_encode_us": round(floor["encode_us"], 2),
        "floor_decode_us": round(floor["decode_us"], 2),
        "ceiling_msgs_per_s": round(floor["ceiling"]),
        "tcp_small_msgs_per_s": round(tcp["small"]),
        "tcp_4k_msgs_per_s": round(tcp["big"]),
        "tcp_pingpong_p50_us": round(tcp["ping_p50_s"] * 1e6, 1),
        "link_pingpong_p50_us": round(link_p50 * 1e6, 1),
        "zmq_small_msgs_per_s": round(zmq["small"]),
        "zmq_4k_msgs_per_s": round(zmq["big"]),
        "dchan_small_msgs_per_s": round(dc["small"]),
        "dchan_small_sender_cpu_us_per_msg": round(dc["small_sender_cpu_us_per_msg"], 2),
        "dchan_small_sender_runqueue_fraction": round(dc["small_sender_runqueue_fraction"], 3),
        "memchan_runqueue_fraction": round(memchan_wait, 3),
        "dchan_small_receiver_cpu_us_per_msg": round(dc["small_receiver_cpu_us_per_msg"], 2),
        "dchan_4k_msgs_per_s": round(dc["big"]),
        "dchan_4k_receiver_cpu_us_per_msg": round(dc["big_receiver_cpu_us_per_msg"], 2),
        "dchan_prefetch": PREFETCH,
        "dchan_small_prefetch_msgs_per_s": round(dc["small_prefetch"]),
        "dchan_small_prefetch_sender_cpu_us_per_msg": round(
            dc["small_prefetch_sender_cpu_us_per_msg"], 2
        ),
        "dchan_small_prefetch_receiver_cpu_us_per_msg": round(
            dc["small_prefetch_receiver_cpu_us_per_msg"], 2
        ),
        "dchan_4k_prefetch_msgs_per_s": round(dc["big_prefetch"]),
        "dchan_4k_sender_cpu_us_per_msg": round(dc["big_sender_cpu_us_per_msg"], 2),
        "dchan_tracked_msgs_per_s": round(dc["tracked"]),
        "dchan_tracked_p50_us": round(dc["latency_p50_s"] * 1e6, 1),
        "dchan_stuck_rss_growth_mib": round(dc["rss_growth_bytes"] / 2**20, 2),
        "dchan_stuck_accepted": dc["rss_accepted"],
        "dchan_stuck_offered": dc["rss_offered"],
        "dchan_stuck_send_blocked": dc["rss_send_blocked"],
        "dchan_3x3_aggregate_msgs_per_s": round(three),
    }
    ratios = {
        "small_vs_memchan": dc["small"] / memchan,
        "small_vs_zmq": dc["small"] / zmq["small"],
        "small_vs_tcp": dc["small"] / tcp["small"],
        "small_vs_ceiling": dc["small"] / floor["ceiling"],
        "ceiling_vs_memchan": floor["ceiling"] / memchan,
        "ceiling_vs_zmq": floor["ceiling"] / zmq["small"],
        "4k_vs_zmq": dc["big"] / zmq["big"],
        "small_prefetch_vs_memchan": dc["small_prefetch"] / memchan,
        "small_prefetch_vs_zmq": dc["small_prefetch"] / zmq["small"],
        "4k_prefetch_vs_zmq": dc["big_prefetch"] / zmq["big"],
        "tracked_vs_untracked": dc["tracked"] / dc["small"],
        "latency_vs_tcp_pingpong": dc["latency_p50_s"] / tcp["ping_p50_s"],
        "latency_vs_link_pingpong": dc["latency_p50_s"] / link_p50,
    }
    targets = {
        "small_vs_memchan": ratios["small_vs_memchan"] >= 1.0,
        "small_vs_zmq": ratios["small_vs_zmq"] >= 0.4,
        "4k_vs_zmq": ratios["4k_vs_zmq"] >= 0.4,
        "small_prefetch_vs_memchan": ratios["small_prefetch_vs_memchan"] >= 1.0,
        "small_prefetch_vs_zmq": ratios["small_prefetch_vs_zmq"] >= 0.4,
        "4k_prefetch_vs_zmq": ratios["4k_prefetch_vs_zmq"] >= 0.4,
        "tracked_vs_untracked": ratios["tracked_vs_untracked"] >= 0.5,
        "latency_vs_tcp_pingpong": ratios["latency_vs_tcp_pingpong"] <= 6.0,
        "stuck_rss_below_64mib": dc["rss_growth_bytes"] < 64 * 2**20,
    }
    for name, value in ratios.items():
        verdict = ""
        if name in targets:
            verdict = " (meets target)" if targets[name] else " (misses target)"
        print(f"ratio {name}: {value:.2f}{verdict}")
    figures.update({f"ratio_{k}": round(v, 3) for k, v in ratios.items()})
    figures.update({f"target_{k}": v for k, v in targets.items()})
    figures["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
