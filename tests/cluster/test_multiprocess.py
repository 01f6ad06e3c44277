"""Three nodes in three OS processes: traffic across processes, and SIGKILL of the leader.

Each process runs one node (see ``_proc_node.py``) and reports, as JSON lines,
every message its receivers took and the receipt of every message it sent;
the checks below compare those reports cluster-wide.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import trio
from _proc_node import STEP, ProcNode, proc_cluster


async def _register(node: ProcNode, ns: str, buffer: int) -> tuple[str, int]:
    """Register a receiver of ``ns`` on ``node``; its id and the index it committed at."""
    reply = await node.request("receive", ns=ns, buffer=buffer)
    return reply["rid"], reply["applied"]


async def _leader(nodes: list[ProcNode]) -> ProcNode:
    """The node all of ``nodes`` name as leader, once it says it leads."""
    with trio.fail_after(STEP):
        while True:
            statuses = {n.address: await n.request("status") for n in nodes}
            leaders = {s["leader"] for s in statuses.values()}
            if len(leaders) == 1 and None not in leaders:
                (leader,) = leaders
                if statuses.get(leader, {}).get("role") == "leader":
                    return next(n for n in nodes if n.address == leader)
            # Elections take a few hundred ms with the fast timings; ask again.
            await trio.sleep(0.02)


async def test_three_processes_many_to_many_exactly_once_and_fair(tmp_path: Path) -> None:
    """Senders on 2 processes, receivers on all 3, 10,000 tracked messages."""
    total = 10_000
    async with proc_cluster(3, tmp_path, seed=11) as board:
        nodes = board.nodes
        registered = [await _register(n, "work", 64) for n in nodes]
        # Every node knows every receiver before the first message leaves.
        top = max(index for _, index in registered)
        for n in nodes:
            await n.request("wait_applied", index=top)

        with trio.fail_after(40):
            sends = [
                await nodes[0].submit(
                    "send", ns="work", start=0, stop=total, step=2, buffer=128, timeout=STEP
                ),
                await nodes[1].submit(
                    "send", ns="work", start=1, stop=total, step=2, buffer=128, timeout=STEP
                ),
            ]
            results = [await nodes[0].reply(sends[0]), await nodes[1].reply(sends[1])]
            # Every send reported: wait for the receivers' reports to catch up.
            await board.wait_until(
                lambda: sum(n.received("work") for n in nodes) >= total,
                "every message to be reported received",
            )
            for n in nodes:
                await n.request("close", ns="work")

        # Per (sending node, receiving node), messages of one send channel keep their order.
        for n in nodes:
            for rid, values in n.got["work"].items():
                for parity in (0, 1):
                    stream = [v for v in values if v % 2 == parity]
                    assert stream == sorted(stream), f"{rid} got sender {parity}'s out of order"
        shares = {rid: Counter(values) for n in nodes for rid, values in n.got["work"].items()}
        merged = sum(shares.values(), Counter())
        assert set(merged) == set(range(total)), "every message arrived"
        assert max(merged.values()) == 1, "a message arrived twice"
        for result in results:
            assert not result["failed"], f"tracked sends failed: {result['failed']}"
        delivered = {
            rid: sorted(v for result in results for v in result["delivered"].get(rid, []))
            for rid in shares
        }
        assert sum(len(v) for v in delivered.values()) == total
        # Each receipt names the receiver that really took the message.
        for rid, taken in shares.items():
            assert sorted(taken) == delivered[rid], f"receipts disagree for {rid}"
        assert {rid for rid, _ in registered} == set(shares)
        counts = [sum(c.values()) for c in shares.values()]
        assert min(counts) >= total / 3 / 3, f"unfair shares {counts}"
        for n in nodes:
            assert await n.exit() == 0, n.log_tail()


async def test_sigkill_of_the_leader_process_while_survivors_exchange(tmp_path: Path) -> None:
    """Kill -9 the leader's process mid-traffic; the two others carry on and elect."""
    count = 4_000
    async with proc_cluster(3, tmp_path, seed=12) as board:
        nodes = board.nodes
        leader = await _leader(nodes)
        src, dst = (n for n in nodes if n is not leader)
        # The doomed node holds a receiver of the namespace too: messages on
        # their way to it when it dies must never show up a second time.
        dst_rid, dst_index = await _register(dst, "jobs", 32)
        doomed_rid, doomed_index = await _register(leader, "jobs", 32)
        await src.request("wait_applied", index=max(dst_index, doomed_index))

        with trio.fail_after(40):
            send = await src.submit(
                "send", ns="jobs", start=0, stop=count, step=1, buffer=64, timeout=STEP
            )
            await board.wait_until(
                lambda: dst.received("jobs") >= count // 8 and leader.received("jobs") > 0,
                "traffic to flow to both receivers",
            )
            before = await leader.request("status")
            assert before["role"] == "leader", "the leader changed before the kill"
            await leader.kill()
            at_kill = dst.received("jobs")
            result = await src.reply(send)

            # The survivors elect a new leader, which takes new registrations.
            new_leader = await _leader([src, dst])
            assert (await new_leader.request("status"))["term"] > before["term"]
            late_rid, late_index = await _register(src, "after", 4)
            await dst.request("wait_applied", index=late_index)
            late = await dst.request(
                "send", ns="after", start=-1, stop=0, step=1, buffer=0, timeout=STEP
            )
            await board.wait_until(
                lambda: src.received("after") == 1, "the late receiver's message"
            )
            assert late["delivered"] == {late_rid: [-1]}
            assert src.got["after"][late_rid] == [-1]

            await board.wait_until(
                lambda: dst.received("jobs") >= len(result["delivered"][dst_rid]),
                "the survivor's receiver to report every message delivered to it",
            )
            for n in (src, dst):
                await n.request("close", ns="after" if n is src else "jobs")

        received = Counter(v for n in nodes for got in n.got["jobs"].values() for v in got)
        assert set(received) <= set(range(count))
        assert max(received.values()) == 1, "at-most-once: a message arrived twice"
        delivered = result["delivered"]
        assert set(delivered) <= {dst_rid, doomed_rid}
        # Between the survivors every message went through, exactly once.
        assert sorted(dst.got["jobs"][dst_rid]) == sorted(delivered[dst_rid])
        # Only messages on their way to the dead node have no definite outcome.
        assert set(result["failed"]) <= {"unknown"}, result["failed"]
        # The dead node took only messages delivered to it or whose ack its
        # death cut off (its last reports may be lost).
        unacked = set(leader.got["jobs"][doomed_rid]) - set(delivered.get(doomed_rid, []))
        assert unacked <= set(result["failed"].get("unknown", [])), sorted(unacked)
        # Traffic kept flowing after the kill: the sender was at most a credit
        # window plus buffers ahead of the survivor's receiver when it happened.
        assert len(delivered[dst_rid]) - at_kill >= count // 4
        for n in (src, dst):
            assert await n.exit() == 0, n.log_tail()
