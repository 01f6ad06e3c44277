"""Whole nodes replicating the real Registry: what the rest of the library relies on."""

from __future__ import annotations

import dataclasses

import trio
import trio.testing
from _node_harness import TEST_SETTINGS, Cluster

from trio_dchan.raft.types import ConfState
from trio_dchan.registry import (
    RegisterReceiver,
    Registry,
    UnregisterNode,
    encode_command,
)

IDS = ["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"]


def registry_factory(_node_id: str) -> Registry:
    return Registry(initial_members={i: i for i in IDS})


def reg(cluster: Cluster, node_id: str) -> Registry:
    machine = cluster.machines[node_id]
    assert isinstance(machine, Registry)
    return machine


def view(registry: Registry, namespace: str) -> list[tuple[str, str, int]]:
    return [(r.receiver_id, r.node_id, r.buffer) for r in registry.receivers(namespace)]


async def test_registrations_replicate_survive_failover_and_snapshots(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = dataclasses.replace(TEST_SETTINGS, snapshot_every=8)
    async with trio.open_nursery() as nursery:
        cluster = Cluster(
            nursery, IDS, seed=21, settings=settings, machine_factory=registry_factory
        )
        await cluster.start_all()
        with trio.fail_after(30):
            leader = await cluster.wait_leader()
            lagging = next(i for i in IDS if i != leader.id)
            cluster.network.isolate(lagging)
            # Every node registers a receiver through its own node (followers forward).
            for number, node_id in enumerate(IDS):
                if node_id == lagging:
                    continue
                result = await cluster.nodes[node_id].propose(
                    encode_command(RegisterReceiver("orders", f"rx{number}", node_id, 10))
                )
                assert result is True
                # Read-your-writes on the proposing node.
                assert reg(cluster, node_id).receiver("orders", f"rx{number}") is not None
            # A repeat is a harmless no-op.
            first = next(i for i in IDS if i != lagging)
            again = await leader.propose(
                encode_command(RegisterReceiver("orders", f"rx{IDS.index(first)}", first, 10))
            )
            assert again is False
            for i in range(20):  # enough entries for several snapshots
                await leader.propose(
                    encode_command(RegisterReceiver("audit", f"a{i}", leader.id, 1))
                )
            cluster.network.heal()
            # The lagging node catches up from a snapshot, waiting without polling.
            lag_registry = reg(cluster, lagging)
            await lag_registry.wait_for(lambda r: len(r.receivers("audit")) == 20)
            assert view(lag_registry, "orders") == view(reg(cluster, leader.id), "orders")

            # The leader dies; its receivers are removed through the new leader.
            cluster.crash(leader.id)
            survivors = [i for i in IDS if i != leader.id]
            new = await cluster.wait_leader(survivors)
            other = next(i for i in survivors if i != new.id)
            assert await cluster.nodes[other].propose(encode_command(UnregisterNode(leader.id)))
            await cluster.wait_applied(new.applied_index, among=survivors)
            for node_id in survivors:
                assert all(
                    r.node_id != leader.id for r in reg(cluster, node_id).receivers("orders")
                )
                assert reg(cluster, node_id).receivers("audit") == ()
        nursery.cancel_scope.cancel()


async def test_added_member_address_reaches_every_registry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    new_id = "127.0.0.1:7004"
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, [*IDS, new_id], seed=22, machine_factory=registry_factory)
        conf = ConfState(voters=frozenset(IDS))
        for node_id in IDS:
            await cluster.start(node_id, initial_conf=conf)
        with trio.fail_after(30):
            leader = await cluster.wait_leader(IDS)
            await cluster.start(new_id)
            await leader.add_voter(new_id, "10.0.0.4:7004")
            await cluster.wait_applied(leader.applied_index, among=[*IDS, new_id])
            for node_id in [*IDS, new_id]:
                assert reg(cluster, node_id).members[new_id] == "10.0.0.4:7004"
            assert new_id in cluster.nodes[new_id].members.voters
        nursery.cancel_scope.cancel()
