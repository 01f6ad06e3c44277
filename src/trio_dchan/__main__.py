"""Command line: ``python -m trio_dchan demo``.

The demo starts a three-node cluster on loopback in this process, runs a
producer on two nodes and a consumer on every node of one namespace for a
few seconds with a live progress line, then drains, checks that every
message arrived exactly once, prints a summary and exits 0 (1 if a check
failed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import trio

from .cluster import Cluster, open_cluster

NAMESPACE = "orders"


def _free_ports(count: int) -> list[int]:
    """Ports the kernel reports free on 127.0.0.1 (held open together so they differ)."""
    with contextlib.ExitStack() as stack:
        socks = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]


@dataclass
class _Demo:
    addresses: list[str]
    seconds: float
    producers: int
    clusters: dict[str, Cluster] = field(default_factory=dict)
    sent: Counter[str] = field(default_factory=Counter)
    received: Counter[str] = field(default_factory=Counter)
    seen: set[tuple[int, int]] = field(default_factory=set)
    duplicates: int = 0
    receivers_closed: int = 0
    all_up: trio.Event = field(default_factory=trio.Event)
    stop_producing: trio.Event = field(default_factory=trio.Event)
    drained: trio.Event = field(default_factory=trio.Event)
    stop_nodes: trio.Event = field(default_factory=trio.Event)

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.received.values())


async def _node(demo: _Demo, address: str) -> None:
    async with open_cluster(address, cluster_id="demo", peers=demo.addresses) as cluster:
        demo.clusters[address] = cluster
        rx = cluster.receive(NAMESPACE, buffer=256)
        async with trio.open_nursery() as nursery:
            consumer = trio.CancelScope()
            nursery.start_soon(_consume, demo, address, rx, consumer)
            await rx.wait_registered()
            if len(demo.clusters) == len(demo.addresses):
                demo.all_up.set()
            await demo.all_up.wait()
            index = demo.addresses.index(address)
            if index < demo.producers:
                nursery.start_soon(_produce, demo, address, index, cluster)
            await demo.drained.wait()
            consumer.cancel()
            await rx.aclose()
        # Everyone stays up until every receiver is closed, so that each
        # unregistration still finds a quorum (and its leader).
        demo.receivers_closed += 1
        if demo.receivers_closed == len(demo.addresses):
            demo.stop_nodes.set()
        await demo.stop_nodes.wait()


async def _produce(demo: _Demo, address: str, producer: int, cluster: Cluster) -> None:
    async with cluster.send(NAMESPACE, buffer=256) as tx:
        seq = 0
        while not demo.stop_producing.is_set():
            await tx.send({"producer": producer, "seq": seq, "item": "widget", "qty": 3})
            demo.sent[address] += 1
            seq += 1


async def _consume(
    demo: _Demo,
    address: str,
    rx: trio.abc.ReceiveChannel[dict[str, int]],
    scope: trio.CancelScope,
) -> None:
    with scope:
        await _consume_until_cancelled(demo, address, rx)


async def _consume_until_cancelled(
    demo: _Demo, address: str, rx: trio.abc.ReceiveChannel[dict[str, int]]
) -> None:
    async for order in rx:
        key = (order["producer"], order["seq"])
        if key in demo.seen:
            demo.duplicates += 1
        demo.seen.add(key)
        demo.received[address] += 1
        if demo.stop_producing.is_set() and demo.total_received >= demo.total_sent:
            demo.drained.set()


def _progress(demo: _Demo, elapsed: float, rate: float) -> str:
    per_node = "  ".join(
        f"{addr.rsplit(':', 1)[1]}:{demo.received[addr]:>8,}" for addr in demo.addresses
    )
    return (
        f"\r{elapsed:5.1f}s  sent {demo.total_sent:>9,}  received {demo.total_received:>9,}"
        f"  {rate:>9,.0f} msgs/s  per node [{per_node}]"
    )


async def _run_demo(seconds: float, producers: int, nodes: int) -> dict[str, object]:
    ports = _free_ports(nodes)
    addresses = [f"127.0.0.1:{port}" for port in ports]
    demo = _Demo(addresses, seconds, producers)
    print(f"starting {nodes} nodes on {', '.join(addresses)} ...", flush=True)
    async with trio.open_nursery() as nursery:
        for address in addresses:
            nursery.start_soon(_node, demo, address)
        with trio.fail_after(30):
            await demo.all_up.wait()
        leader = demo.clusters[addresses[0]].leader
        print(f"cluster up, leader {leader}; producing for {seconds:g} s", flush=True)
        start = time.monotonic()
        last_t, last_n = start, 0
        while (now := time.monotonic()) - start < seconds:
            await trio.sleep(0.5)
            now = time.monotonic()
            rate = (demo.total_received - last_n) / max(now - last_t, 1e-9)
            last_t, last_n = now, demo.total_received
            sys.stdout.write(_progress(demo, now - start, rate))
            sys.stdout.flush()
        produced_for = time.monotonic() - start
        demo.stop_producing.set()
        with trio.fail_after(30):
            if demo.total_received >= demo.total_sent:
                demo.drained.set()
            await demo.drained.wait()
        sys.stdout.write(_progress(demo, produced_for, demo.total_received / produced_for) + "\n")
    ok = demo.duplicates == 0 and demo.total_received == demo.total_sent
    shares = [demo.received[a] for a in addresses]
    return {
        "ok": ok,
        "nodes": nodes,
        "leader": leader,
        "seconds": round(produced_for, 2),
        "sent": demo.total_sent,
        "received": demo.total_received,
        "duplicates": demo.duplicates,
        "msgs_per_s": round(demo.total_received / produced_for),
        "received_per_node": dict(zip(addresses, shares, strict=True)),
        "fairness_min_over_max": round(min(shares) / max(shares), 3) if max(shares) else math.nan,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trio_dchan")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a local multi-node cluster on loopback")
    demo.add_argument("--seconds", type=float, default=5.0, help="how long to produce")
    demo.add_argument("--nodes", type=int, default=3, help="cluster size")
    demo.add_argument("--producers", type=int, default=2, help="nodes that produce")
    args = parser.parse_args(argv)
    if args.nodes < 1 or not 1 <= args.producers <= args.nodes or args.seconds <= 0:
        parser.error("need nodes >= 1, 1 <= producers <= nodes and seconds > 0")
    summary = trio.run(_run_demo, args.seconds, args.producers, args.nodes)
    verdict = "every message arrived exactly once" if summary["ok"] else "CHECK FAILED"
    print(
        f"{summary['sent']:,} sent, {summary['received']:,} received, "
        f"{summary['duplicates']} duplicates: {verdict}"
    )
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
