"""Unit tests of RaftCore driven by hand, without the simulator."""

from __future__ import annotations

import random

import pytest

from trio_dchan.raft.core import RaftConfig, RaftCore
from trio_dchan.raft.errors import (
    CompactedError,
    InvalidMessage,
    InvalidRequest,
    NotLeader,
    RaftError,
    SnapshotOutOfDate,
)
from trio_dchan.raft.types import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    PersistedState,
    Role,
    SnapshotMeta,
)

IDS = ["a", "b", "c"]


def make_cluster(ids: list[str] = IDS) -> dict[str, RaftCore]:
    conf = ConfState(voters=frozenset(ids))
    return {
        node: RaftCore(RaftConfig(node), PersistedState(initial_conf=conf), random.Random(k))
        for k, node in enumerate(ids)
    }


def pump(cores: dict[str, RaftCore], applied: dict[str, list[Entry]]) -> None:
    queue: list[Message] = []
    while True:
        busy = False
        for node, core in cores.items():
            while core.has_ready():
                busy = True
                rd = core.ready()
                queue.extend(rd.messages)
                applied[node].extend(rd.committed_entries)
                core.advance(rd)
        while queue:
            busy = True
            m = queue.pop(0)
            if m.to in cores:  # messages to nodes left out are lost
                cores[m.to].step(m)
        if not busy:
            return


def elect(cores: dict[str, RaftCore], applied: dict[str, list[Entry]]) -> RaftCore:
    for _ in range(100):
        for core in cores.values():
            core.tick()
        pump(cores, applied)
        leaders = [c for c in cores.values() if c.role is Role.LEADER]
        if leaders:
            assert len(leaders) == 1
            return leaders[0]
    raise AssertionError("no leader elected")


def test_bootstrap_election_and_replication() -> None:
    cores = make_cluster()
    applied: dict[str, list[Entry]] = {n: [] for n in IDS}
    leader = elect(cores, applied)
    assert all(c.leader == leader.id and c.term == leader.term for c in cores.values())
    last = leader.propose_many([b"cmd%d" % i for i in range(500)])
    pump(cores, applied)
    for node, core in cores.items():
        assert core.commit_index == last
        normal = [e.data for e in applied[node] if e.type is EntryType.NORMAL]
        assert normal == [b"cmd%d" % i for i in range(500)]
        # The bootstrap entries describe the initial membership.
        assert [e.type for e in applied[node][:3]] == [EntryType.CONF_CHANGE] * 3
        assert core.conf == ConfState(voters=frozenset(IDS))


def test_follower_refuses_proposal_with_leader_hint() -> None:
    cores = make_cluster()
    applied: dict[str, list[Entry]] = {n: [] for n in IDS}
    leader = elect(cores, applied)
    follower = next(c for c in cores.values() if c is not leader)
    with pytest.raises(NotLeader) as info:
        follower.propose(b"x")
    assert info.value.leader == leader.id


def test_malformed_messages_raise_and_change_nothing() -> None:
    core = make_cluster()["a"]
    bad = [
        Message(MessageType.APPEND, "b", "c", 5),  # wrong recipient
        Message(MessageType.APPEND, "a", "a", 5),  # from itself
        Message(MessageType.APPEND, "a", "b", -1),
        Message(
            MessageType.APPEND, "a", "b", 5, index=3, entries=(Entry(5, 7, EntryType.NORMAL),)
        ),
        Message(MessageType.SNAPSHOT, "a", "b", 5),
    ]
    for m in bad:
        with pytest.raises(InvalidMessage):
            core.step(m)
    assert core.term == 1
    assert core.role is Role.FOLLOWER


def test_advance_requires_the_outstanding_ready() -> None:
    core = make_cluster()["a"]
    assert core.has_ready()
    rd = core.ready()
    assert not core.has_ready()
    with pytest.raises(InvalidRequest):
        core.ready()
    core.advance(rd)
    with pytest.raises(InvalidRequest):
        core.advance(rd)


def test_joiner_never_campaigns() -> None:
    core = RaftCore(RaftConfig("z"), PersistedState(), random.Random(1))
    for _ in range(200):
        core.tick()
        while core.has_ready():
            rd = core.ready()
            assert not rd.messages
            core.advance(rd)
    assert core.role is Role.FOLLOWER
    assert core.term == 0


def test_vote_survives_restart() -> None:
    conf = ConfState(voters=frozenset(IDS))
    stored = {"hs": HardState(), "entries": []}

    def persist(core: RaftCore) -> list[Message]:
        out: list[Message] = []
        while core.has_ready():
            rd = core.ready()
            if rd.hard_state is not None:
                stored["hs"] = rd.hard_state
            if rd.entries:
                stored["entries"] = list(rd.entries)  # type: ignore[assignment]
            out.extend(rd.messages)
            core.advance(rd)
        return out

    core = RaftCore(RaftConfig("a"), PersistedState(initial_conf=conf), random.Random(1))
    persist(core)
    core.step(Message(MessageType.VOTE, "a", "b", 5, log_term=1, index=3))
    (granted,) = persist(core)
    assert granted.type is MessageType.VOTE_RESP
    assert not granted.reject
    # Crash and restart from what was persisted: the vote for b stands.
    hs = stored["hs"]
    assert isinstance(hs, HardState)
    restarted = RaftCore(
        RaftConfig("a"),
        PersistedState(hard_state=hs, entries=tuple(stored["entries"])),  # type: ignore[arg-type]
        random.Random(2),
    )
    assert restarted.term == 5
    assert restarted.vote == "b"
    restarted.step(Message(MessageType.VOTE, "a", "c", 5, log_term=1, index=3))
    (refused,) = persist(restarted)
    assert refused.reject


def test_compacted_entries_are_refused_by_name() -> None:
    cores = make_cluster()
    applied: dict[str, list[Entry]] = {n: [] for n in IDS}
    leader = elect(cores, applied)
    last = leader.propose_many([b"e%d" % i for i in range(20)])
    pump(cores, applied)
    leader.compact(last - 5, b"image")
    with pytest.raises(CompactedError):
        leader.entries(1, last)
    assert [e.index for e in leader.entries(last - 4, last)] == list(range(last - 4, last + 1))
    with pytest.raises(SnapshotOutOfDate):
        leader.compact(last - 6, b"older")
    with pytest.raises(InvalidRequest):
        leader.compact(last + 1, b"not applied")
    rd = leader.ready()
    assert rd.snapshot is not None
    assert rd.snapshot.meta.index == last - 5
    assert not rd.install_snapshot
    leader.advance(rd)


def test_snapshot_transfer_ignores_answers_about_another_snapshot() -> None:
    conf = ConfState(voters=frozenset(IDS))
    cores = {
        node: RaftCore(
            RaftConfig(node, snapshot_chunk_size=50),
            PersistedState(initial_conf=conf),
            random.Random(k),
        )
        for k, node in enumerate(IDS)
    }
    applied: dict[str, list[Entry]] = {n: [] for n in IDS}
    leader = elect(cores, applied)
    lagging = next(n for n in IDS if n != leader.id)
    rest = {n: c for n, c in cores.items() if n != lagging}
    last = leader.propose_many([b"e%d" % i for i in range(20)])
    pump(rest, applied)
    assert leader.commit_index == last
    pump(rest, applied)
    leader.compact(leader.applied_index, bytes(range(250)) * 2)

    def leader_out() -> list[Message]:
        out: list[Message] = []
        while leader.has_ready():
            rd = leader.ready()
            out.extend(rd.messages)
            leader.advance(rd)
        return out

    # Heartbeats until the leader probes the lagging node and finds it needs
    # the snapshot: the first chunk goes out.
    first: Message | None = None
    for _ in range(10):
        leader.tick()
        for m in leader_out():
            if m.to == lagging and m.type is MessageType.SNAPSHOT:
                first = m
            elif m.to == lagging:
                cores[lagging].step(m)
                for rd_m in _drain(cores[lagging]):
                    leader.step(rd_m)
        if first is not None:
            break
    assert first is not None
    assert first.snapshot_offset == 0
    # A late answer about some other snapshot claims a far offset: ignored.
    assert first.snapshot is not None
    other = SnapshotMeta(first.snapshot.index - 1, first.snapshot.term, first.snapshot.conf)
    leader.step(
        Message(
            MessageType.SNAPSHOT_RESP,
            leader.id,
            lagging,
            leader.term,
            snapshot=other,
            snapshot_offset=450,
        )
    )
    assert leader_out() == []
    # The real transfer proceeds chunk by chunk and installs the snapshot.
    queue = [first]
    chunks = 0
    while queue:
        m = queue.pop(0)
        if m.to == lagging:
            chunks += m.type is MessageType.SNAPSHOT
            cores[lagging].step(m)
            queue.extend(_drain(cores[lagging]))
        elif m.to == leader.id:
            leader.step(m)
            queue.extend(x for x in leader_out() if x.to == lagging)
    assert chunks == 10
    assert cores[lagging].commit_index >= leader.snapshot.meta.index  # type: ignore[union-attr]


def _drain(core: RaftCore) -> list[Message]:
    out: list[Message] = []
    while core.has_ready():
        rd = core.ready()
        out.extend(rd.messages)
        core.advance(rd)
    return out


def random_message(rng: random.Random, to: str, last: int) -> Message:
    kind = rng.choice(list(MessageType))
    sender = rng.choice(["b", "c", "zz"])
    term = rng.randint(0, 6)
    index = rng.randint(0, last + 5)
    entries: tuple[Entry, ...] = ()
    if kind is MessageType.APPEND and rng.random() < 0.7:
        start = index + 1 if rng.random() < 0.8 else index + rng.randint(2, 4)
        t = rng.randint(0, term)
        entries = tuple(
            Entry(
                t,
                start + k,
                rng.choice(list(EntryType)),
                rng.choice([b"", b"x", b"\x02\x00\x00\x00\x01z", bytes(rng.randbytes(8))]),
            )
            for k in range(rng.randint(1, 4))
        )
    snapshot = None
    if kind in (MessageType.SNAPSHOT, MessageType.SNAPSHOT_RESP) and rng.random() < 0.9:
        snapshot = SnapshotMeta(rng.randint(0, last + 5), rng.randint(0, term), ConfState())
    return Message(
        kind,
        to,
        sender,
        term,
        log_term=rng.randint(0, term),
        index=index,
        entries=entries,
        commit=rng.randint(0, last + 5),
        reject=rng.random() < 0.3,
        reject_hint=rng.randint(0, last + 5),
        conflict_term=rng.randint(0, term),
        snapshot=snapshot,
        snapshot_offset=rng.randint(0, 8),
        snapshot_data=rng.randbytes(rng.randint(0, 4)),
        snapshot_done=rng.random() < 0.5,
        context=rng.choice([b"", b"transfer"]),
    )


def test_garbage_from_peers_only_raises_raft_errors() -> None:
    """Nonsense from the network never escapes as anything but a RaftError,
    and never breaks the core's own bookkeeping."""
    rng = random.Random(99)
    for round_ in range(30):
        cores = make_cluster()
        applied: dict[str, list[Entry]] = {n: [] for n in IDS}
        if round_ % 2:
            elect(cores, applied)
        core = cores["a"]
        for _ in range(200):
            m = random_message(rng, "a", core.last_index)
            try:
                core.step(m)
            except RaftError:
                pass
            if rng.random() < 0.2:
                core.tick()
            while core.has_ready():
                rd = core.ready()
                core.advance(rd)
            assert core.commit_index <= core.last_index
            assert core.applied_index <= core.commit_index
            assert core.first_index <= core.commit_index + 1


def test_a_snapshot_larger_than_the_limit_is_refused_not_assembled() -> None:
    conf = ConfState(voters=frozenset(IDS))
    follower = RaftCore(
        RaftConfig("b", max_snapshot_bytes=100),
        PersistedState(initial_conf=conf),
        random.Random(1),
    )
    meta = SnapshotMeta(10, 1, conf)
    start = follower.commit_index

    def chunk(offset: int, size: int, done: bool = False) -> list[Message]:
        follower.step(
            Message(
                MessageType.SNAPSHOT,
                "b",
                "a",
                1,
                snapshot=meta,
                snapshot_offset=offset,
                snapshot_data=b"s" * size,
                snapshot_done=done,
            )
        )
        return [m for m in _drain(follower) if m.type is MessageType.SNAPSHOT_RESP]

    [ok] = chunk(0, 60)
    assert (ok.reject, ok.snapshot_offset) == (False, 60)
    [refused] = chunk(60, 60, done=True)
    assert refused.reject
    assert follower.refused_snapshots == 1
    assert follower.commit_index == start  # nothing was installed
    # What was gathered is gone: the next chunk of that transfer is refused too.
    [again] = chunk(120, 10, done=True)
    assert again.reject
    # A snapshot within the limit still installs.
    [first] = chunk(0, 50)
    assert not first.reject
    # The last chunk installs it (the answer is an APPEND_RESP, not a SNAPSHOT_RESP).
    assert chunk(50, 50, done=True) == []
    assert follower.commit_index == 10
