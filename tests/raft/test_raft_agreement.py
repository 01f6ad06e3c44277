"""Log replication: agreement, failures, divergent logs, message economy."""

from __future__ import annotations

from collections import Counter

from trio_dchan.raft.sim import Simulator
from trio_dchan.raft.types import EntryType, Message, MessageType, Role

ELECTION = 10


def test_basic_agree() -> None:
    sim = Simulator(3, seed=11)
    sim.wait_leader()
    # Indices 1-3 hold the bootstrap membership, the first leader's no-op follows.
    first = None
    for k in range(5):
        expected = None if first is None else first + k
        if expected is not None:
            assert sim.n_applied(expected) == 0, sim.fail("applied before it was proposed")
        index = sim.one(b"cmd%d" % k, 3, retry=False)
        if first is None:
            first = index
        else:
            assert index == expected, sim.fail(f"got index {index}, expected {expected}")
    assert first is not None
    assert first == 5


def test_rpc_bytes() -> None:
    sim = Simulator(3, seed=12)
    sim.wait_leader()
    sent: Counter[tuple[str, int, int]] = Counter()

    def count(m: Message) -> None:
        if m.type is MessageType.APPEND:
            for e in m.entries:
                if e.type is EntryType.NORMAL:
                    sent[(m.to, e.index, e.term)] += 1

    sim.on_send = count
    total = 0
    for k in range(10):
        cmd = bytes([k]) * 5000
        sim.one(cmd, 3, retry=False)
        total += len(cmd)
    # Every command travelled exactly once to each of the two followers.
    assert len(sent) == 20
    assert set(sent.values()) == {1}, sim.fail(f"resent entries: {sent}")


def test_fail_agree() -> None:
    sim = Simulator(3, seed=13)
    sim.one(b"101", 3)
    lead = sim.wait_leader()
    follower = next(n for n in sim.alive() if n != lead)
    sim.isolate(follower)
    # The leader and the remaining follower keep agreeing.
    for cmd in (b"102", b"103", b"104", b"105"):
        sim.one(cmd, 2)
    sim.heal()
    # The follower catches up and takes part again.
    index = sim.one(b"106", 3)
    sim.one(b"107", 3)
    assert sim.nodes[follower].app.log[index - 1] == b"106"


def test_fail_no_agree() -> None:
    sim = Simulator(5, seed=14)
    sim.one(b"10", 5)
    lead = sim.wait_leader()
    ids = sorted(sim.nodes)
    buddy = next(n for n in ids if n != lead)
    majority = [n for n in ids if n not in (lead, buddy)]
    before = {n: sim.core(n).commit_index for n in ids}
    sim.partition([lead, buddy], majority)
    placed = sim.propose(lead, b"20")
    assert placed is not None
    index, _ = placed
    sim.run_ticks(2 * ELECTION)
    # The minority side cannot commit anything.
    assert sim.n_applied(index, None) == 0 or all(
        sim.nodes[n].app.log[index - 1] != b"20" for n in ids if sim.nodes[n].app.index >= index
    )
    for n in (lead, buddy):
        assert sim.core(n).commit_index == before[n], sim.fail(f"{n} committed in a minority")
    sim.heal()
    sim.wait_leader()
    sim.one(b"30", 5)
    sim.one(b"1000", 5)


def test_concurrent_starts() -> None:
    sim = Simulator(3, seed=15)
    for attempt in range(5):
        lead = sim.wait_leader()
        core = sim.core(lead)
        term = core.term
        placed = [sim.propose(lead, b"c%d-%d" % (attempt, k)) for k in range(5)]
        assert all(p is not None for p in placed)
        indices = [p[0] for p in placed if p is not None]
        assert indices == list(range(indices[0], indices[0] + 5))
        sim.run_until(
            lambda indices=indices, lead=lead, term=term: (
                all(sim.n_applied(i) == 3 for i in indices) or sim.core(lead).term != term
            ),
            4 * ELECTION,
            "the concurrent proposals to be applied",
        )
        if sim.core(lead).term != term:
            continue  # leadership changed under us; try again
        for k, i in enumerate(indices):
            assert sim.n_applied(i, b"c%d-%d" % (attempt, k)) == 3
        return
    raise sim.fail("term changed too often")


def test_rejoin() -> None:
    sim = Simulator(3, seed=16)
    sim.one(b"101", 3)
    lead1 = sim.wait_leader()
    # The leader is cut off and accepts entries it can never commit.
    sim.isolate(lead1)
    stale = [sim.propose(lead1, cmd) for cmd in (b"102", b"103", b"104")]
    assert all(p is not None for p in stale)
    others = [n for n in sim.nodes if n != lead1]
    sim.one(b"103", 2, nodes=others)
    lead2 = sim.wait_leader(among=others)
    # The new leader is cut off; the old one comes back with the third node.
    third = next(n for n in others if n != lead2)
    sim.partition([lead1, third], [lead2])
    sim.one(b"104", 2, nodes=[lead1, third])
    sim.heal()
    sim.one(b"105", 3)
    # The stale leader's uncommitted entries were overwritten everywhere.
    for node in sim.nodes.values():
        assert b"102" not in node.app.log, sim.fail(f"{node.id} applied a stale entry")
    core1 = sim.core(lead1)
    for p in stale:
        assert p is not None
        index, term = p
        assert core1.log_term(index) != term


def test_backup() -> None:
    sim = Simulator(5, seed=17)
    sim.one(b"start", 5)
    ids = sorted(sim.nodes)
    lead1 = sim.wait_leader()
    k = ids.index(lead1)
    pal1 = ids[(k + 1) % 5]
    rest = [n for n in ids if n not in (lead1, pal1)]
    # The leader and one follower accept 50 entries they cannot commit.
    sim.partition([lead1, pal1], rest)
    for i in range(50):
        sim.propose(lead1, b"lost-a%d" % i)
    sim.run_ticks(2)
    # The other three commit 50 entries of their own.
    sim.partition(rest, [lead1, pal1])
    for i in range(50):
        sim.one(b"won-a%d" % i, 3, nodes=rest)
    lead2 = sim.wait_leader(among=rest)
    other = next(n for n in rest if n != lead2)
    # Their leader accepts 50 more entries, cut off with one follower.
    pal2 = next(n for n in rest if n not in (lead2, other))
    sim.partition([lead2, pal2], [other], [lead1, pal1])
    for i in range(50):
        sim.propose(lead2, b"lost-b%d" % i)
    sim.run_ticks(2)
    # The old leader, its follower and `other` form a majority: `other` has the
    # committed entries, the two others 50 divergent ones to back up over.
    rejected: Counter[str] = Counter()

    def count(m: Message) -> None:
        if m.type is MessageType.APPEND_RESP and m.reject:
            rejected[m.sender] += 1

    sim.on_send = count
    sim.partition([lead1, pal1, other], [lead2], [n for n in rest if n not in (lead2, other)])
    for i in range(50):
        sim.one(b"won-b%d" % i, 3, nodes=[lead1, pal1, other])
    sim.on_send = None
    # Fast back-off: a handful of rejections, not one per divergent entry.
    assert max(rejected[lead1], rejected[pal1]) <= 5, sim.fail(f"rejections: {rejected}")
    sim.heal()
    sim.one(b"end", 5)
    for node in sim.nodes.values():
        assert not any(v is not None and v.startswith(b"lost") for v in node.app.log)


def test_count() -> None:
    sim = Simulator(3, seed=18)
    counts: Counter[MessageType] = Counter()
    sim.on_send = lambda m: counts.update([m.type])
    lead = sim.wait_leader()
    sim.run_until(
        lambda: all(sim.core(n).leader == lead for n in sim.nodes), ELECTION, "followers"
    )
    election = sum(counts.values())
    vote_msgs = sum(
        counts[t]
        for t in (
            MessageType.PRE_VOTE,
            MessageType.PRE_VOTE_RESP,
            MessageType.VOTE,
            MessageType.VOTE_RESP,
        )
    )
    # One pre-vote round and one vote round: 2 requests + 2 answers each, maybe a
    # split vote or two; plus the heartbeats of the few ticks it took.
    assert vote_msgs <= 24, sim.fail(f"too many election messages: {counts}")
    assert election <= 60, sim.fail(f"too many messages to elect: {counts}")

    # Agreement, one proposal per Ready: each costs one append and one answer
    # per follower, plus at most one commit notification (and its answer).
    term = sim.core(lead).term
    counts.clear()
    last = 0
    for k in range(10):
        placed = sim.propose(lead, b"x%d" % k)
        assert placed is not None
        last = placed[0]
    sim.deliver_all()
    sim.run_until(lambda: sim.n_applied(last) == 3, ELECTION, "agreement")
    assert sim.core(lead).term == term
    appends = counts[MessageType.APPEND] + counts[MessageType.APPEND_RESP]
    # (+4: answers still in flight from the election.)
    assert appends <= 10 * 2 * 4 + 4, sim.fail(f"too many append messages: {counts}")

    # Batched: 100 proposals in one Ready travel in one append per follower.
    counts.clear()
    placed = sim.propose_many(lead, [b"y%d" % k for k in range(100)])
    assert placed is not None
    sim.deliver_all()
    sim.run_until(lambda: sim.n_applied(placed[0]) == 3, ELECTION, "batched agreement")
    appends = counts[MessageType.APPEND] + counts[MessageType.APPEND_RESP]
    assert appends <= 2 * 4, sim.fail(f"too many append messages for a batch: {counts}")

    # Idle: only heartbeats (and their answers) flow, one round per tick.
    counts.clear()
    idle = 5 * ELECTION
    sim.run_ticks(idle)
    assert counts[MessageType.APPEND] <= 2, sim.fail(f"appends while idle: {counts}")
    assert sum(counts.values()) <= 4 * idle + 4, sim.fail(f"too chatty while idle: {counts}")
    assert sim.core(lead).role is Role.LEADER
    assert sim.core(lead).term == term


def test_append_size_limits() -> None:
    sim = Simulator(3, seed=19, config={"max_bytes_per_message": 10_000})
    lead = sim.wait_leader()
    sizes: list[tuple[int, int]] = []

    def record(m: Message) -> None:
        if m.type is MessageType.APPEND and m.entries:
            sizes.append((len(m.entries), sum(len(e.data) for e in m.entries)))

    sim.on_send = record
    placed = sim.propose_many(lead, [bytes(4_000)] * 10 + [bytes(30_000)])
    assert placed is not None
    sim.run_until(lambda: sim.n_applied(placed[0]) == 3, 50, "the batch to commit")
    # Messages stay under the byte cap; an entry larger than the cap goes alone.
    assert all(size <= 10_000 or count == 1 for count, size in sizes), sizes
    assert sum(count for count, _ in sizes) == 2 * 11
    assert max(count for count, _ in sizes) == 2
