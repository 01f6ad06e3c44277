"""The in-memory network: delivery, faults, forwarding and error types."""

from __future__ import annotations

import random

import pytest
import trio

from trio_dchan.errors import DchanError
from trio_dchan.raft.transport import MemoryNetwork, Proposal, ProposalKind, Unavailable
from trio_dchan.raft.types import Message, MessageType


class Recorder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.got: list[Message] = []
        self.forwarded: list[Proposal] = []

    def deliver(self, message: Message) -> None:
        self.got.append(message)

    async def handle_forward(self, proposal: Proposal) -> object:
        await trio.lowlevel.checkpoint()
        self.forwarded.append(proposal)
        if proposal.data == b"refuse":
            raise Unavailable("elsewhere", "refused on purpose", maybe_delivered=True)
        return [7, proposal.data + b"!"]


def msg(src: str, dst: str, term: int = 1) -> Message:
    return Message(MessageType.HEARTBEAT, to=dst, sender=src, term=term)


def make(n: int = 3, **kwargs: float) -> tuple[MemoryNetwork, dict[str, Recorder], dict]:
    net = MemoryNetwork(random.Random(1), **kwargs)
    recs = {f"n{i}": Recorder(f"n{i}") for i in range(n)}
    transports = {name: net.transport_for(name, rec) for name, rec in recs.items()}
    return net, recs, transports


def test_delivers_in_order_to_the_addressee() -> None:
    net, recs, tr = make()
    tr["n0"].send([msg("n0", "n1", 1), msg("n0", "n2", 1), msg("n0", "n1", 2)])
    assert [m.term for m in recs["n1"].got] == [1, 2]
    assert [m.term for m in recs["n2"].got] == [1]
    assert recs["n0"].got == []
    assert net.delivered == 3
    assert net.dropped == 0


def test_unknown_destination_is_dropped_not_raised() -> None:
    net, _recs, tr = make()
    tr["n0"].send([msg("n0", "ghost")])
    assert net.dropped == 1


def test_isolate_and_heal() -> None:
    net, recs, tr = make()
    net.isolate("n1")
    tr["n0"].send([msg("n0", "n1"), msg("n0", "n2")])
    tr["n1"].send([msg("n1", "n0"), msg("n1", "n2")])
    assert recs["n1"].got == []
    assert len(recs["n2"].got) == 1
    assert recs["n0"].got == []
    assert not net.connected("n1", "n2")
    net.heal("n1")
    tr["n1"].send([msg("n1", "n0")])
    assert len(recs["n0"].got) == 1


def test_isolation_covers_nodes_attached_later() -> None:
    net, _recs, tr = make()
    net.isolate("n0")
    late = Recorder("late")
    net.transport_for("late", late)
    tr["n0"].send([msg("n0", "late")])
    assert late.got == []


def test_partition_groups() -> None:
    net, recs, tr = make(4)
    net.partition(["n0", "n1"], ["n2"])
    tr["n0"].send([msg("n0", "n1"), msg("n0", "n2"), msg("n0", "n3")])
    assert len(recs["n1"].got) == 1
    assert recs["n2"].got == []
    assert recs["n3"].got == []
    net.heal()
    tr["n0"].send([msg("n0", "n2")])
    assert len(recs["n2"].got) == 1


def test_one_way_cut() -> None:
    net, recs, tr = make()
    net.cut("n0", "n1", both_ways=False)
    tr["n0"].send([msg("n0", "n1")])
    tr["n1"].send([msg("n1", "n0")])
    assert recs["n1"].got == []
    assert len(recs["n0"].got) == 1


def test_drop_rate_is_seeded_and_reproducible() -> None:
    def run() -> list[int]:
        _net, recs, tr = make(drop_rate=0.5)
        tr["n0"].send([msg("n0", "n1", t) for t in range(200)])
        return [m.term for m in recs["n1"].got]

    first = run()
    assert first == run()
    assert 50 < len(first) < 150


async def test_forward_returns_the_remote_result() -> None:
    _net, recs, tr = make()
    result = await tr["n0"].forward("n1", Proposal(ProposalKind.COMMAND, b"x"))
    assert result == [7, b"x!"]
    assert recs["n1"].forwarded == [Proposal(ProposalKind.COMMAND, b"x")]


async def test_forward_keeps_error_types() -> None:
    _net, _recs, tr = make()
    with pytest.raises(Unavailable) as info:
        await tr["n0"].forward("n1", Proposal(ProposalKind.COMMAND, b"refuse"))
    assert info.value.maybe_delivered
    assert isinstance(info.value, DchanError)


async def test_forward_to_unreachable_peer_raises_unavailable() -> None:
    net, recs, tr = make()
    net.isolate("n1")
    with pytest.raises(Unavailable) as info:
        await tr["n0"].forward("n1", Proposal(ProposalKind.COMMAND, b"x"))
    assert not info.value.maybe_delivered
    assert recs["n1"].forwarded == []
    with pytest.raises(Unavailable):
        await tr["n0"].forward("nobody", Proposal(ProposalKind.COMMAND, b"x"))


def test_reattach_replaces_and_detach_is_conditional() -> None:
    net, recs, tr = make()
    newer = Recorder("n1")
    net.transport_for("n1", newer)
    net.detach("n1", recs["n1"])  # the stale handler: no effect
    tr["n0"].send([msg("n0", "n1")])
    assert len(newer.got) == 1
    assert recs["n1"].got == []
    net.detach("n1")
    assert "n1" not in net.nodes


def test_observers_see_every_message_even_dropped_ones() -> None:
    net, _recs, tr = make()
    seen: list[Message] = []
    net.observers.append(seen.append)
    net.isolate("n2")
    sent = [msg("n0", "n1"), msg("n0", "n2")]
    tr["n0"].send(sent)
    assert seen == sent
    assert net.dropped == 1
