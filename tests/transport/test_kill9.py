"""SIGKILL real node processes during appends; nothing committed is lost or doubled."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trio_dchan.transport._node_main import NodeProcess, free_ports

SEED = 20261127

# Stands in for a node process: answers proposals only when told to, so the
# harness can be seen waiting for answers that have not come yet.
_SLOW_NODE = """
import json, sys
print(json.dumps({"event": "ready"}), flush=True)
held = []
for line in sys.stdin:
    request = json.loads(line)
    if request["op"] == "propose":
        held.append(request["id"])
    elif request["op"] == "answer":
        for n, key in enumerate(held):
            event = "committed" if n % 2 == 0 else "error"
            print(json.dumps({"event": event, "id": key, "index": n}), flush=True)
        held = []
"""


class _SlowNode(NodeProcess):
    def command(self) -> list[str]:
        return [sys.executable, "-c", _SLOW_NODE]


async def test_harness_waits_for_every_answer() -> None:
    """``wait_answered`` returns only once each proposal sent to the process has
    been answered (committed or error), or the process is gone."""
    node = _SlowNode("slow", ["slow"], data_dir=None)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await node.start(nursery)
            assert await node.send(op="propose", id="a", data="")
            assert await node.send(op="propose", id="b", data="")
            assert node.outstanding == {"a", "b"}
            answered = trio.Event()

            async def wait() -> None:
                await node.wait_answered()
                answered.set()

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert not answered.is_set()
            assert await node.send(op="answer")
            await answered.wait()
            # Everything reported is known once the wait is over.
            assert node.committed == {"a"}
            assert set(node.failed) == {"b"}
            assert node.outstanding == set()

            # A process that dies leaves nothing to wait for.
            assert await node.send(op="propose", id="c", data="")
            assert node.outstanding == {"c"}
            await node.kill()
            await node.wait_answered()
            assert node.outstanding == set()
            assert node.committed == {"a"}
            nursery.cancel_scope.cancel()


async def _dumps(nodes: list[NodeProcess]) -> list[dict[str, Any]]:
    for n in nodes:
        if not n.alive:
            log = await trio.Path(n.log_path).read_text() if n.log_path else ""
            raise AssertionError(
                f"node {n.node_id} died on its own; its log ends with:\n{log[-3000:]}"
            )
    return [await n.ask("dump", "dump") for n in nodes]


async def _current_leader(nodes: list[NodeProcess]) -> NodeProcess:
    """The running node that a running node names as leader (waits until there is one)."""
    while True:
        for asked in [n for n in nodes if n.alive]:
            status = await asked.ask("status", "status")
            leader = next((n for n in nodes if n.node_id == status["leader"]), None)
            if leader is not None and leader.alive:
                return leader
        await trio.sleep(0.05)


@pytest.mark.slow
async def test_kill9_during_appends(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    ids = [f"127.0.0.1:{p}" for p in free_ports(3)]
    nodes = [
        NodeProcess(
            node_id,
            ids,
            data_dir=str(tmp_path / f"n{k}"),
            cluster_id="kill9",
            seed=SEED + k,
            log_path=str(tmp_path / f"n{k}.log"),
        )
        for k, node_id in enumerate(ids)
    ]
    proposed: list[str] = []
    with trio.fail_after(55):
        async with trio.open_nursery() as nursery:
            for n in nodes:
                await n.start(nursery)
            stop_proposing = trio.Event()
            proposer_done = trio.Event()

            async def propose() -> None:
                # A steady stream of proposals, each to a random running node.
                counter = 0
                while not stop_proposing.is_set():
                    live = [n for n in nodes if n.alive]
                    if live:
                        target = rng.choice(live)
                        key = f"p{counter}"
                        counter += 1
                        if await target.send(op="propose", id=key, data=key.encode().hex()):
                            proposed.append(key)
                    await trio.sleep(0.002)
                proposer_done.set()

            nursery.start_soon(propose)
            leader_kills = 0
            for round_ in range(6):
                await trio.sleep(rng.uniform(0.3, 0.9))
                if round_ % 2 == 0:
                    victim = await _current_leader(nodes)
                    leader_kills += 1
                else:
                    victim = rng.choice(nodes)
                await victim.kill()
                await trio.sleep(rng.uniform(0.1, 0.6))
                await victim.start(nursery)
            stop_proposing.set()
            await proposer_done.wait()
            # Proposals still in flight (e.g. forwarded while leadership moved)
            # may commit at any later point: wait for every running node to
            # answer all of its proposals, so that the set of proposals reported
            # committed is final before the barrier below is proposed.
            for n in nodes:
                await n.wait_answered()
            committed = set().union(*(n.committed for n in nodes))

            # Wait until every node applied the same sequence, including a last
            # command committed after all the restarts (hence after every
            # proposal reported committed above). Its proposer may report it as
            # failed (e.g. outcome unknown while leadership settles), so propose
            # new ones until one shows up everywhere.
            barriers: list[str] = []
            settled = False
            while not settled:
                key = f"barrier{len(barriers)}"
                barriers.append(key)
                await nodes[len(barriers) % 3].send(op="propose", id=key, data=key.encode().hex())
                with trio.move_on_after(3):
                    while True:
                        dumps = await _dumps(nodes)
                        marks = {b.encode().hex() for b in barriers}
                        if all(marks & set(d["applied"]) for d in dumps) and all(
                            d["applied"] == dumps[0]["applied"] for d in dumps
                        ):
                            settled = True
                            break
                        await trio.sleep(0.1)
            logs = ""
            for n in nodes:
                if n.log_path:
                    text = await trio.Path(n.log_path).read_text()
                    warned = [line for line in text.splitlines() if "warn" in line.lower()]
                    logs += f"\n{n.node_id}: {warned[-10:]}"
            for n in nodes:
                await n.stop()
            nursery.cancel_scope.cancel()

    applied = [bytes.fromhex(x).decode() for x in dumps[0]["applied"]]
    assert leader_kills >= 2
    assert len(committed) > 50, "too few proposals committed to mean anything"
    # No two nodes disagree (checked above), nothing applied twice, every
    # proposal reported committed is present, nothing unknown appears.
    assert len(applied) == len(set(applied))
    missing = committed - set(applied)
    if missing:
        log_at = dict(zip(dumps[0]["indexes"], applied, strict=True))
        details = [
            (key, n.node_id, n.committed_at[key], log_at.get(n.committed_at[key]))
            for n in nodes
            for key in sorted(missing)
            if key in n.committed
        ]
        lo = min(i for _, _, i, _ in details if isinstance(i, int))
        around = [[e for e in d["seen"] if lo - 3 <= e[0] <= lo + 3] for d in dumps]
        raise AssertionError(
            f"committed but not applied (id, reported by, index, entry there now): {details}"
            f"\n(index, term, type) applied near index {lo} per node since restart: {around}"
            f"\nfinal log lengths: {[len(d['indexes']) for d in dumps]}{logs}"
        )
    assert set(applied) <= set(proposed) | set(barriers)
