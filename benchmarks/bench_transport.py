"""Raft over gRPC, 3 node processes on loopback, against PySyncObj in the same run.

Measured for both (each in its own 3 processes, replicated log/counter):

* committed proposals/s with 64 concurrent proposers (issued on the leader);
* p50/p99 commit latency with one proposer;
* fail-over: SIGKILL the leader's process, time until the first commit on a
  new leader (probes run on both survivors), default timings, 3 trials.

Ours runs with its log in memory (like PySyncObj's default) and again with
fsync'ed files (``data_dir``). PySyncObj runs at its defaults (batching on a
100 ms timer) and with batching off; its best-case throughput with many
thousands of writes in flight is reported too. Ratios: ours / PySyncObj
(for latency and fail-over, PySyncObj / ours, so > 1 means ours is better).

Run: ``.venv/bin/python benchmarks/bench_transport.py`` (about 2-3 minutes).
The last line printed is one JSON object with every figure and ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

COUNT = 20_000  # proposals in the throughput run
LATENCY_COUNT = 1_000  # proposals in the one-proposer run
TRIALS = 3  # fail-over trials


# ---------------------------------------------------------------- PySyncObj side --


def pysyncobj_child(self_addr: str, partners: list[str], batch: bool) -> None:
    """A PySyncObj node driven through stdin/stdout like trio_dchan's node process."""
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated

    class Counter(SyncObj):  # type: ignore[misc]
        def __init__(self) -> None:
            conf = SyncObjConf(appendEntriesUseBatch=batch)
            super().__init__(self_addr, partners, conf)
            self.value = 0

        @replicated  # type: ignore[misc]
        def inc(self, payload: bytes = b"") -> int:
            # The payload only travels, like the bytes of our proposals.
            self.value += 1
            return self.value

    counter = Counter()

    def emit(**event: Any) -> None:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()

    def bench(concurrency: int, count: int, size: int) -> None:
        payload = b"x" * size
        lock = threading.Lock()
        finished = threading.Event()
        latencies: list[float] = []
        state = {"issued": 0, "errors": 0}

        def issue() -> None:
            with lock:
                if state["issued"] >= count:
                    return
                state["issued"] += 1
            start = time.perf_counter()
            counter.inc(payload, callback=lambda result, error: done(start, error))

        def done(start: float, error: Any) -> None:
            with lock:
                if error == FAIL_REASON.SUCCESS:
                    latencies.append(time.perf_counter() - start)
                else:
                    state["errors"] += 1
                    state["issued"] -= 1
                if len(latencies) >= count:
                    finished.set()
                    return
            issue()

        started = time.perf_counter()
        for _ in range(concurrency):
            issue()
        finished.wait(timeout=120)
        elapsed = time.perf_counter() - started
        latencies.sort()

        def pct(p: float) -> float:
            return (
                latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0
            )

        emit(
            event="bench",
            committed=len(latencies),
            errors=state["errors"],
            seconds=elapsed,
            rate=len(latencies) / elapsed,
            p50=pct(0.5),
            p99=pct(0.99),
        )

    def probe(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                counter.inc(sync=True, timeout=1.0)
            except Exception:
                time.sleep(0.005)
                continue
            emit(event="probe", t=time.monotonic())
            return
        emit(event="probe", t=None)

    emit(event="ready")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        if op == "status":
            leader = counter._getLeader()
            emit(
                event="status",
                leader=None if leader is None else leader.address,
                role="leader" if counter._isLeader() else "follower",
            )
        elif op == "bench":
            threading.Thread(
                target=bench,
                args=(
                    int(request["concurrency"]),
                    int(request["count"]),
                    int(request.get("size", 0)),
                ),
            ).start()
        elif op == "probe":
            threading.Thread(target=probe, args=(float(request.get("timeout", 30)),)).start()
        elif op == "exit":
            break
    counter.destroy()


# --------------------------------------------------------------------- driver --


async def _leader(nodes: list[Any], limit_s: float = 30) -> Any:
    import trio

    with trio.fail_after(limit_s):
        while True:
            for n in nodes:
                if not n.alive:
                    continue
                status = await n.ask("status", "status")
                leader = next((m for m in nodes if m.node_id == status["leader"]), None)
                if leader is not None and leader.alive:
                    check = await leader.ask("status", "status")
                    if check["role"] == "leader":
                        return leader
            await trio.sleep(0.05)


async def _run_cluster(
    kind: str, *, data_dir: str | None, batch: bool, failover: bool, extra: dict[str, Any]
) -> dict[str, Any]:
    import trio

    from trio_dchan.transport._node_main import NodeProcess, free_ports

    class PsoProcess(NodeProcess):
        def command(self) -> list[str]:
            others = [p for p in self.peers if p != self.node_id]
            cmd = [sys.executable, __file__, "--pysyncobj-child", "--self", self.node_id]
            cmd += ["--partners", ",".join(others)]
            return cmd + ([] if batch else ["--no-batch"])

    ids = [f"127.0.0.1:{p}" for p in free_ports(3)]
    cls = PsoProcess if kind == "pysyncobj" else NodeProcess
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        nodes = [
            cls(
                node_id,
                ids,
                data_dir=str(Path(tmp) / f"n{k}") if data_dir else None,
                cluster_id="bench",
                seed=k,
                log_path=str(Path(tmp) / f"n{k}.log"),
            )
            for k, node_id in enumerate(ids)
        ]
        async with trio.open_nursery() as nursery:
            for n in nodes:
                await n.start(nursery)
            leader = await _leader(nodes)
            # Warm up (connections, first elections' tail), then measure.
            await leader.ask("bench", "bench", concurrency=8, count=500, size=64)
            # A baseline that commits a few hundred entries a second gets a
            # fifth of the counts (its figures are rates and percentiles; the
            # run with many in flight keeps its count, to fill the window).
            scale = extra.get("scale", 1.0)
            count = int(COUNT * scale)
            r = await leader.ask("bench", "bench", concurrency=64, count=count, size=64)
            out["throughput_64"] = r["rate"]
            out["throughput_64_errors"] = r["errors"]
            if "many_inflight" in extra:
                r = await leader.ask(
                    "bench", "bench", concurrency=extra["many_inflight"], count=100_000, size=64
                )
                out["throughput_many_inflight"] = r["rate"]
            latency_count = int(LATENCY_COUNT * scale)
            r = await leader.ask("bench", "bench", concurrency=1, count=latency_count, size=64)
            out["p50_ms"] = r["p50"] * 1000
            out["p99_ms"] = r["p99"] * 1000
            if failover:
                times = []
                for _ in range(TRIALS):
                    leader = await _leader(nodes)
                    survivors = [n for n in nodes if n is not leader]
                    killed_at = time.monotonic()
                    await leader.kill()
                    for s in survivors:
                        await s.send(op="probe", timeout=30)
                    probes = []
                    for s in survivors:
                        while True:
                            event = await s.events.receive()
                            if event.get("event") == "probe":
                                probes.append(event["t"])
                                break
                    firsts = [t for t in probes if t is not None]
                    times.append(min(firsts) - killed_at if firsts else float("inf"))
                    await leader.start(nursery)
                out["failover_s_trials"] = times
                out["failover_s"] = statistics.median(times)
            for n in nodes:
                await n.stop()
            nursery.cancel_scope.cancel()
    return out


def _measure(kind: str, **kwargs: Any) -> dict[str, Any]:
    import trio

    label = f"{kind} ({'fsync files' if kwargs.get('data_dir') else 'in memory'}"
    label += "" if kwargs.get("batch", True) else ", batching off"
    label += ")"
    print(f"measuring {label} ...", flush=True)
    result = trio.run(lambda: _run_cluster(kind, extra=kwargs.pop("extra", {}), **kwargs))
    for name, value in result.items():
        print(f"  {name}: {value if not isinstance(value, float) else round(value, 4)}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pysyncobj-child", action="store_true")
    parser.add_argument("--self")
    parser.add_argument("--partners", default="")
    parser.add_argument("--no-batch", action="store_true")
    args = parser.parse_args()
    if args.pysyncobj_child:
        pysyncobj_child(args.self, [p for p in args.partners.split(",") if p], not args.no_batch)
        return

    ours = _measure("trio_dchan", data_dir=None, batch=True, failover=True)
    ours_fsync = _measure("trio_dchan", data_dir="yes", batch=True, failover=False)
    pso = _measure(
        "pysyncobj",
        data_dir=None,
        batch=True,
        failover=True,
        extra={"many_inflight": 50_000, "scale": 0.2},
    )
    pso_nobatch = _measure("pysyncobj", data_dir=None, batch=False, failover=False)

    figures: dict[str, Any] = {
        "ours_mem_throughput_64": ours["throughput_64"],
        "ours_mem_p50_ms": ours["p50_ms"],
        "ours_mem_p99_ms": ours["p99_ms"],
        "ours_mem_failover_s": ours["failover_s"],
        "ours_mem_failover_trials_s": ours["failover_s_trials"],
        "ours_fsync_throughput_64": ours_fsync["throughput_64"],
        "ours_fsync_p50_ms": ours_fsync["p50_ms"],
        "ours_fsync_p99_ms": ours_fsync["p99_ms"],
        "pysyncobj_throughput_64": pso["throughput_64"],
        "pysyncobj_throughput_50k_inflight": pso["throughput_many_inflight"],
        "pysyncobj_p50_ms": pso["p50_ms"],
        "pysyncobj_p99_ms": pso["p99_ms"],
        "pysyncobj_failover_s": pso["failover_s"],
        "pysyncobj_failover_trials_s": pso["failover_s_trials"],
        "pysyncobj_nobatch_throughput_64": pso_nobatch["throughput_64"],
        "pysyncobj_nobatch_p50_ms": pso_nobatch["p50_ms"],
        "pysyncobj_nobatch_p99_ms": pso_nobatch["p99_ms"],
        "ours_mem_throughput_64_errors": ours["throughput_64_errors"],
        "ours_fsync_throughput_64_errors": ours_fsync["throughput_64_errors"],
        "pysyncobj_throughput_64_errors": pso["throughput_64_errors"],
        "pysyncobj_nobatch_throughput_64_errors": pso_nobatch["throughput_64_errors"],
    }
    ratios = {
        "throughput_64_vs_pysyncobj": ours["throughput_64"] / pso["throughput_64"],
        "throughput_64_vs_pysyncobj_nobatch": ours["throughput_64"] / pso_nobatch["throughput_64"],
        "throughput_64_vs_pysyncobj_50k_inflight": ours["throughput_64"]
        / pso["throughput_many_inflight"],
        "fsync_throughput_64_vs_pysyncobj": ours_fsync["throughput_64"] / pso["throughput_64"],
        "p50_pysyncobj_over_ours": pso["p50_ms"] / ours["p50_ms"],
        "p50_pysyncobj_nobatch_over_ours": pso_nobatch["p50_ms"] / ours["p50_ms"],
        "failover_pysyncobj_over_ours": pso["failover_s"] / ours["failover_s"],
    }
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    print(json.dumps({**figures, **ratios}))


if __name__ == "__main__":
    main()
