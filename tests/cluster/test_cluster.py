"""The public API end to end: real nodes, Raft and gRPC on 127.0.0.1, one process."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import pytest
import trio
import trio.testing
from _cluster_harness import FAST, STEP, bound_socket, local_cluster

import trio_dchan
from trio_dchan.cluster import ClusterUnavailable, open_cluster
from trio_dchan.testing import check_channel_pair

_names = itertools.count()


@trio_dchan.register(name="tests.cluster.Order")
@dataclass(frozen=True)
class Order:
    id: int
    item: str
    qty: int = 1


async def test_design_example_runs_as_written() -> None:
    """The user code of the design notes, on a 1-node cluster."""
    sock = bound_socket()
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    received: list[Any] = []
    async with open_cluster(
        address, cluster_id="shop", peers=[address], settings=FAST, sock=sock
    ) as cluster:
        rx = cluster.receive("orders", buffer=10)

        async def consume() -> None:
            async for order in rx:
                received.append(order)
                if len(received) == 3:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            async with cluster.send("orders", buffer=10) as tx:
                await tx.send({"id": 1, "item": "widget"})
                receipt = await tx.send_tracked({"id": 2}, timeout=30)
                assert await receipt.delivered()
                await tx.send(Order(3, "gadget", qty=2))
        await rx.aclose()
    assert received == [{"id": 1, "item": "widget"}, {"id": 2}, Order(3, "gadget", 2)]


async def test_conformance_on_one_node() -> None:
    async with local_cluster(1) as lc:
        node = lc.nodes[0]

        @asynccontextmanager
        async def pair(buffer: int) -> AsyncIterator[tuple[Any, Any]]:
            namespace = f"one-{next(_names)}"
            rx = node.receive(namespace, buffer)
            with trio.fail_after(STEP):
                await rx.wait_registered()
            tx = node.send(namespace)
            async with tx, rx:
                yield tx, rx

        async def settle() -> None:
            await _settled(node)

        await check_channel_pair(pair, ends_when_senders_close=False, settle=settle)


async def test_conformance_across_nodes_of_three() -> None:
    async with local_cluster(3, seed=1) as lc:
        a, b, _ = lc.nodes

        @asynccontextmanager
        async def pair(buffer: int) -> AsyncIterator[tuple[Any, Any]]:
            namespace = f"cross-{next(_names)}"
            rx = b.receive(namespace, buffer)
            with trio.fail_after(STEP):
                await rx.wait_registered()
                # The sending node must know the receiver before the checks start.
                await a.raft.wait_for(lambda n: n.applied_index >= b.raft.applied_index)
            tx = a.send(namespace)
            async with tx, rx:
                yield tx, rx

        async def settle() -> None:
            await _settled(a, b)

        await check_channel_pair(pair, ends_when_senders_close=False, settle=settle)


async def test_many_to_many_exactly_once_and_fair() -> None:
    """2 senders on 2 nodes, 3 receivers on 3 nodes, 10,000 tracked messages."""
    total = 10_000
    async with local_cluster(3, seed=2) as lc:
        nodes = lc.nodes
        receivers = [n.receive("work", buffer=64) for n in nodes]
        with trio.fail_after(STEP):
            for rx in receivers:
                await rx.wait_registered()
            for n in nodes:
                await n.raft.wait_for(lambda r: r.applied_index >= nodes[2].raft.applied_index)
        got: list[Counter[int]] = [Counter() for _ in receivers]
        done = trio.Event()
        receipts: list[Any] = []

        async def consume(i: int) -> None:
            async for value in receivers[i]:
                got[i][value] += 1
                if sum(sum(c.values()) for c in got) == total:
                    done.set()

        async def produce(node_index: int, values: range) -> None:
            async with nodes[node_index].send("work", buffer=128) as tx:
                for v in values:
                    receipts.append(await tx.send_tracked(v, timeout=STEP))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(len(receivers)):
                    nursery.start_soon(consume, i)
                async with trio.open_nursery() as producers:
                    producers.start_soon(produce, 0, range(0, total, 2))
                    producers.start_soon(produce, 1, range(1, total, 2))
                await done.wait()
                outcomes = [await r.delivered() for r in receipts]
                nursery.cancel_scope.cancel()
        merged = sum(got, Counter())
        assert set(merged) == set(range(total))
        assert max(merged.values()) == 1, "a message arrived twice"
        assert all(outcomes), "every tracked send reports delivered"
        shares = [sum(c.values()) for c in got]
        assert min(shares) >= total / len(receivers) / 3, f"unfair shares {shares}"
        for rx in receivers:
            await rx.aclose()


async def test_unencodable_value_raises_in_send_and_enqueues_nothing() -> None:
    class Unregistered:
        pass

    async with local_cluster(1) as lc:
        node = lc.nodes[0]
        rx = node.receive("bad", buffer=4)
        await rx.wait_registered()
        async with node.send("bad") as tx:
            with pytest.raises(trio_dchan.EncodeError, match="register"):
                await tx.send(Unregistered())
            await tx.send("fine")
        with trio.fail_after(STEP):
            assert await rx.receive() == "fine"
        with pytest.raises(trio.WouldBlock):
            rx.receive_nowait()
        await rx.aclose()


async def _settled(*nodes: Any) -> None:
    """Every message accepted on these nodes was delivered or failed, then a quiet moment."""
    with trio.fail_after(STEP):
        for node in nodes:
            await node._plane.wait_settled()
        await trio.testing.wait_all_tasks_blocked(cushion=0.003)


async def test_leader_failure_keeps_traffic_flowing_between_survivors() -> None:
    async with local_cluster(3, seed=4) as lc:
        leader = await lc.leader()
        survivors = [c for c in lc.nodes if c is not leader]
        src, dst = survivors
        rx = dst.receive("jobs", buffer=32)
        await rx.wait_registered()
        await src.raft.wait_for(lambda n: n.applied_index >= dst.raft.applied_index)
        received: list[int] = []
        count = 2_000

        async def consume() -> None:
            async for v in rx:
                received.append(v)
                if len(received) == count:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            async with src.send("jobs", buffer=32) as tx:
                for i in range(count):
                    if i == count // 4:
                        await lc.kill(leader.node_id)
                    await tx.send(i)
        assert sorted(received) == list(range(count))
        # A new leader among the survivors accepts new registrations.
        new_leader = await lc.leader(lambda: [src, dst])
        assert new_leader.node_id != leader.node_id
        late = src.receive("after", buffer=1)
        with trio.fail_after(STEP):
            await late.wait_registered()
        await late.aclose()
        await rx.aclose()


async def test_receiver_close_hands_buffered_messages_to_another_receiver() -> None:
    async with local_cluster(2, seed=5) as lc:
        a, b = lc.nodes
        first = b.receive("handoff", buffer=20)
        await first.wait_registered()
        await a.raft.wait_for(lambda n: n.applied_index >= b.raft.applied_index)
        async with a.send("handoff") as tx:
            for i in range(10):
                await tx.send(i)
        assert first.statistics().current_buffer_used == 10
        second = a.receive("handoff", buffer=20)
        await second.wait_registered()
        await b.raft.wait_for(lambda n: n.applied_index >= a.raft.applied_index)
        await first.aclose()
        with trio.fail_after(STEP):
            got = sorted([await second.receive() for _ in range(10)])
        assert got == list(range(10))
        await second.aclose()


async def test_open_cluster_without_a_quorum_fails_clearly() -> None:
    sock = bound_socket()
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    dead = [bound_socket() for _ in range(2)]  # bound, never listening: nobody answers
    peers = [address] + [f"127.0.0.1:{s.getsockname()[1]}" for s in dead]
    settings = type(FAST)(
        raft=FAST.raft, dataplane=FAST.dataplane, transport=FAST.transport, start_timeout=1.0
    )
    with pytest.raises(ClusterUnavailable, match="majority"):
        async with open_cluster(
            address, cluster_id="lonely", peers=peers, settings=settings, sock=sock
        ):
            pytest.fail("a node without a quorum must not start")
    for s in dead:
        s.close()


async def test_restart_from_data_dir_rejoins(tmp_path: Any) -> None:
    async with local_cluster(3, seed=6, start=False) as lc:
        dirs = {a: tmp_path / f"n{i}" for i, a in enumerate(lc.addresses)}
        for a in lc.addresses:
            lc.start(a, data_dir=dirs[a])
        await lc.wait_up()
        victim = lc.addresses[0]
        term_before = lc[victim].raft.term
        await lc.close(victim)
        lc.start(victim, data_dir=dirs[victim])
        await lc.wait_up(victim)
        node = lc[victim]
        assert node.raft.term >= term_before
        rx = node.receive("back", buffer=2)
        with trio.fail_after(STEP):
            await rx.wait_registered()
        other = lc[lc.addresses[1]]
        await other.raft.wait_for(lambda n: n.applied_index >= node.raft.applied_index)
        async with other.send("back") as tx:
            await tx.send("hello again")
        with trio.fail_after(STEP):
            assert await rx.receive() == "hello again"
        await rx.aclose()


async def test_a_node_outside_the_peer_list_joins_and_can_leave() -> None:
    async with local_cluster(3, seed=7) as lc:
        sock = bound_socket()
        newcomer = f"127.0.0.1:{sock.getsockname()[1]}"
        lc._members[newcomer] = type(lc._members[lc.addresses[0]])(newcomer, sock)
        # It knows only a follower: the join must find its way to the leader.
        leader = await lc.leader()
        follower = next(a for a in lc.addresses if a != leader.node_id)
        lc.start(newcomer, peers=[follower])
        await lc.wait_up(newcomer)
        node = lc[newcomer]
        assert newcomer in node.members.voters
        rx = node.receive("newcomer", buffer=1)
        await rx.wait_registered()
        sender = lc[lc.addresses[0]]
        await sender.raft.wait_for(lambda n: n.applied_index >= node.raft.applied_index)
        async with sender.send("newcomer") as tx:
            await tx.send(42)
        with trio.fail_after(STEP):
            assert await rx.receive() == 42
        await rx.aclose()
        node.leave()
        await lc.close(newcomer)
        with trio.fail_after(STEP):
            await sender.raft.wait_for(lambda n: newcomer not in n.members.members)


async def test_the_leader_can_leave_and_the_rest_carry_on() -> None:
    async with local_cluster(3, seed=8) as lc:
        leader = await lc.leader()
        rest = [c for c in lc.nodes if c is not leader]
        leader.leave()
        await lc.close(leader.node_id)
        with trio.fail_after(STEP):
            for node in rest:
                await node.raft.wait_for(lambda n: leader.node_id not in n.members.members)
        await lc.leader(lambda: rest)
        a, b = rest
        rx = b.receive("after-leave", buffer=1)
        await rx.wait_registered()
        await a.raft.wait_for(lambda n: n.applied_index >= b.raft.applied_index)
        async with a.send("after-leave") as tx:
            await tx.send("still here")
        with trio.fail_after(STEP):
            assert await rx.receive() == "still here"
        await rx.aclose()


async def test_restart_removes_the_receivers_of_the_earlier_run(tmp_path: Any) -> None:
    async with local_cluster(3, seed=9, start=False) as lc:
        dirs = {a: tmp_path / f"n{i}" for i, a in enumerate(lc.addresses)}
        for a in lc.addresses:
            lc.start(a, data_dir=dirs[a])
        await lc.wait_up()
        victim, other = lc.addresses[0], lc[lc.addresses[1]]
        rx = lc[victim].receive("stale", buffer=1)
        await rx.wait_registered()
        await other.raft.wait_for(lambda n: n.applied_index >= lc[victim].raft.applied_index)
        assert [r.node_id for r in other._plane.registry.receivers("stale")] == [victim]
        await lc.kill(victim)  # no graceful unregistration
        assert [r.node_id for r in other._plane.registry.receivers("stale")] == [victim]
        lc.start(victim, data_dir=dirs[victim])
        await lc.wait_up(victim)
        await other.raft.wait_for(lambda n: n.applied_index >= lc[victim].raft.applied_index)
        assert other._plane.registry.receivers("stale") == ()


async def test_removing_a_dead_node_unregisters_its_receivers() -> None:
    async with local_cluster(3, seed=10) as lc:
        a, b, c = (lc[addr] for addr in lc.addresses)
        gone = c.node_id
        rx = c.receive("orphans", buffer=4)
        await rx.wait_registered()
        await a.raft.wait_for(lambda n: n.applied_index >= c.raft.applied_index)
        await lc.kill(gone)  # crashed: its receiver stays registered
        async with a.send("orphans", buffer=8) as tx:
            # The receiver exists but cannot be reached: a timeout, not "no receiver".
            receipt = await tx.send_tracked("lost", timeout=0.3)
            assert not await receipt.delivered()
            assert receipt.outcome is trio_dchan.Outcome.TIMED_OUT
            # Accepted into the channel's buffer, waiting for a receiver with room.
            await tx.send("waits")
            with pytest.raises(ValueError, match="leave"):
                await a.remove_node(a.node_id)
            await a.remove_node(gone)
            assert gone not in a.members.members
            assert tx.statistics().receivers == 0
            await b.raft.wait_for(lambda n: gone not in n.members.members)
            with pytest.raises(trio_dchan.UnknownNode):
                await b.remove_node(gone)
            receipt = await tx.send_tracked("nobody", timeout=0.3)
            assert not await receipt.delivered()
            assert receipt.outcome is trio_dchan.Outcome.NO_RECEIVER
            # A receiver registering now gets what waited, then new messages.
            fresh = b.receive("orphans", buffer=4)
            with trio.fail_after(STEP):
                await fresh.wait_registered()
                receipt = await tx.send_tracked("after")
                assert await receipt.delivered()
                assert [await fresh.receive(), await fresh.receive()] == ["waits", "after"]
        await fresh.aclose()
        # The two remaining nodes are the whole cluster: a majority of two commits.
        late = a.receive("later", buffer=1)
        with trio.fail_after(STEP):
            await late.wait_registered()
        await late.aclose()


async def test_the_whole_cluster_stopping_at_once_does_not_wait_out_unregistrations() -> None:
    # The last node to stop has no quorum left to commit its receivers' removal:
    # it gives up once it has known no leader for two election timeouts, not
    # after unregister_timeout.
    settings = replace(FAST, dataplane=replace(FAST.dataplane, unregister_timeout=60.0))
    async with local_cluster(3, seed=11, start=False) as lc:
        lc.settings = settings
        for address in lc.addresses:
            lc.start(address)
        await lc.wait_up()
        receivers = [c.receive("everywhere", buffer=2) for c in lc.nodes]
        for rx in receivers:
            await rx.wait_registered()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for address in lc.addresses:
                    nursery.start_soon(lc.close, address)
        for rx in receivers:  # the node's shutdown ended them
            with pytest.raises(trio.EndOfChannel):
                rx.receive_nowait()


async def test_a_start_survives_the_leader_dying_under_its_first_proposal(tmp_path: Any) -> None:
    # A node restarting from its data_dir unregisters the receivers of its
    # earlier run through the leader. The leader stalls on that proposal and
    # dies; the survivors elect another within start_timeout, so the start
    # must go on there, not fail with the proposal's unknown outcome.
    from trio_dchan.raft.transport import Proposal, ProposalKind

    async with local_cluster(3, seed=31, start=False) as lc:
        dirs = {a: tmp_path / f"n{i}" for i, a in enumerate(lc.addresses)}
        for a in lc.addresses:
            lc.start(a, data_dir=dirs[a])
        await lc.wait_up()
        leader = await lc.leader()
        restarting = next(a for a in lc.addresses if a != leader.node_id)
        await lc.close(restarting)
        arrived = trio.Event()
        real = leader.raft.handle_forward

        async def stalled(proposal: Proposal) -> object:
            if proposal.kind == ProposalKind.COMMAND:
                arrived.set()
                await trio.sleep_forever()  # a stalled leader (GC pause, slow disk) ...
            return await real(proposal)

        leader.raft.handle_forward = stalled  # type: ignore[method-assign]
        lc.start(restarting, data_dir=dirs[restarting])
        with trio.fail_after(STEP):
            await arrived.wait()
        await lc.kill(leader.node_id)  # ... that then dies
        await lc.wait_up(restarting)
        assert lc.error(restarting) is None


async def test_a_leader_whose_listed_peers_are_gone_can_leave() -> None:
    # A rolling replacement: d and e joined through s, then s left. When the
    # leader of {d, e} leaves, nobody in its own peer list is left to ask; it
    # must run the removal itself, or the survivor is left without a quorum.
    async with local_cluster(1, seed=41) as lc:
        (seed,) = lc.addresses
        joined = []
        for _ in range(2):
            sock = bound_socket()
            address = f"127.0.0.1:{sock.getsockname()[1]}"
            lc._members[address] = type(lc._members[seed])(address, sock)
            lc.start(address, peers=[seed])
            await lc.wait_up(address)
            joined.append(address)
        lc[seed].leave()
        await lc.close(seed)
        leader = await lc.leader(lambda: [lc[a] for a in joined])
        (survivor,) = [a for a in joined if a != leader.node_id]
        leader.leave()
        await lc.close(leader.node_id)
        with trio.fail_after(STEP):
            await lc[survivor].raft.wait_for(lambda n: n.members.voters == {survivor})


async def test_leaving_as_the_last_voter_fails_at_once_with_the_reason() -> None:
    sock = bound_socket()
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    with trio.fail_after(FAST.leave_timeout / 2):
        with pytest.raises(ClusterUnavailable, match="last voter"):
            async with open_cluster(
                address, cluster_id="solo", peers=[address], settings=FAST, sock=sock
            ) as cluster:
                cluster.leave()


@pytest.mark.parametrize(
    "address", ["127.0.0.1", "127.0.0.1:", "127.0.0.1:http", ":7000", "127.0.0.1:70000"]
)
async def test_a_malformed_address_is_refused_at_once(address: str) -> None:
    with trio.fail_after(FAST.start_timeout / 2):
        with pytest.raises(ValueError, match="port"):
            async with open_cluster(address, cluster_id="c", peers=[address], settings=FAST):
                pass  # pragma: no cover - never entered
