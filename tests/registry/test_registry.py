"""The Registry state machine: commands, membership, snapshots and waiters."""

from __future__ import annotations

import struct

import cbor2
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_dchan.errors import DchanError
from trio_dchan.raft.types import ConfChange, ConfChangeType, Entry, EntryType
from trio_dchan.registry import (
    Command,
    CommandError,
    ReceiverInfo,
    RegisterReceiver,
    Registry,
    SnapshotError,
    UnregisterNode,
    UnregisterReceiver,
    decode_command,
    encode_command,
    result_error,
)

A, B, C = "10.0.0.1:7001", "10.0.0.2:7001", "10.0.0.3:7001"


class Log:
    """Feeds a Registry entries with consecutive indexes, as the driver does."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.index = registry.applied_index

    def entry(self, kind: EntryType, data: bytes) -> object:
        self.index += 1
        return self.registry.apply(Entry(1, self.index, kind, data))

    def cmd(self, command: Command) -> object:
        return self.entry(EntryType.NORMAL, encode_command(command))

    def raw(self, data: bytes) -> object:
        return self.entry(EntryType.NORMAL, data)

    def conf(self, kind: ConfChangeType, node: str, address: str | None = None) -> object:
        context = (address if address is not None else node).encode()
        return self.entry(EntryType.CONF_CHANGE, ConfChange(kind, node, context).encode())


def state(registry: Registry) -> object:
    return (
        {ns: registry.receivers(ns) for ns in registry.namespaces()},
        dict(registry.members),
        registry.applied_index,
    )


def test_register_and_unregister() -> None:
    reg = Registry({A: A, B: B})
    log = Log(reg)
    assert log.cmd(RegisterReceiver("orders", "r1", A, 10)) is True
    assert log.cmd(RegisterReceiver("orders", "r2", B, 0)) is True
    assert log.cmd(RegisterReceiver("audit", "r3", B, 5)) is True
    assert reg.receivers("orders") == (
        ReceiverInfo("r1", "orders", A, 10, 1),
        ReceiverInfo("r2", "orders", B, 0, 2),
    )
    assert reg.namespaces() == ("audit", "orders")
    assert reg.receiver("audit", "r3") == ReceiverInfo("r3", "audit", B, 5, 3)
    assert reg.version == 3
    assert log.cmd(UnregisterReceiver("orders", "r1")) is True
    assert reg.receivers("orders") == (ReceiverInfo("r2", "orders", B, 0, 2),)
    assert log.cmd(UnregisterReceiver("audit", "r3")) is True
    assert reg.namespaces() == ("orders",)
    assert reg.receivers("audit") == ()
    assert reg.applied_index == 5
    assert reg.version == 5


def test_duplicates_and_stale_commands_are_noops() -> None:
    reg = Registry({A: A})
    log = Log(reg)
    log.cmd(RegisterReceiver("ns", "r1", A, 1))
    before, version = state(reg), reg.version
    # Same id again, even with other fields: the first registration wins.
    assert log.cmd(RegisterReceiver("ns", "r1", A, 1)) is False
    assert log.cmd(RegisterReceiver("ns", "r1", B, 7)) is False
    assert log.cmd(UnregisterReceiver("ns", "nope")) is False
    assert log.cmd(UnregisterReceiver("other", "r1")) is False
    assert log.cmd(UnregisterNode(B)) is False
    assert reg.version == version
    assert state(reg)[:2] == before[:2]  # type: ignore[index]
    assert log.cmd(UnregisterReceiver("ns", "r1")) is True
    assert log.cmd(UnregisterReceiver("ns", "r1")) is False


def test_already_applied_entries_are_ignored() -> None:
    reg = Registry()
    reg.apply(Entry(1, 5, EntryType.NORMAL, encode_command(RegisterReceiver("n", "r", A, 1))))
    again = Entry(1, 5, EntryType.NORMAL, encode_command(RegisterReceiver("n", "x", A, 1)))
    assert reg.apply(again) is False
    assert [r.receiver_id for r in reg.receivers("n")] == ["r"]


def test_unregister_node_drops_all_its_receivers() -> None:
    reg = Registry({A: A, B: B})
    log = Log(reg)
    log.cmd(RegisterReceiver("x", "a1", A, 1))
    log.cmd(RegisterReceiver("x", "b1", B, 1))
    log.cmd(RegisterReceiver("y", "a2", A, 1))
    assert log.cmd(UnregisterNode(A)) is True
    assert reg.namespaces() == ("x",)
    assert [r.receiver_id for r in reg.receivers("x")] == ["b1"]
    assert dict(reg.members) == {A: A, B: B}  # membership is untouched
    # A's node is still a member, so it may register again.
    assert log.cmd(RegisterReceiver("y", "a3", A, 1)) is True


def test_membership_changes() -> None:
    reg = Registry({A: A})
    log = Log(reg)
    assert log.conf(ConfChangeType.ADD_VOTER, B, "127.0.0.1:9002") is True
    assert log.conf(ConfChangeType.ADD_LEARNER, C) is True
    assert dict(reg.members) == {A: A, B: "127.0.0.1:9002", C: C}
    assert log.conf(ConfChangeType.ADD_VOTER, C) is False  # promotion, same address
    assert log.conf(ConfChangeType.ADD_VOTER, B, "127.0.0.1:9999") is True  # address update
    assert reg.members[B] == "127.0.0.1:9999"
    # An empty context means the node id is the address.
    assert log.conf(ConfChangeType.ADD_VOTER, "10.9.9.9:1", "") is True
    assert reg.members["10.9.9.9:1"] == "10.9.9.9:1"


def test_remove_node_drops_member_and_receivers() -> None:
    reg = Registry({A: A, B: B})
    log = Log(reg)
    log.cmd(RegisterReceiver("x", "b1", B, 1))
    log.cmd(RegisterReceiver("x", "a1", A, 1))
    assert log.conf(ConfChangeType.REMOVE_NODE, B) is True
    assert dict(reg.members) == {A: A}
    assert [r.receiver_id for r in reg.receivers("x")] == ["a1"]
    # A registration from the removed node that commits late is stale.
    assert log.cmd(RegisterReceiver("x", "b2", B, 1)) is False
    assert log.conf(ConfChangeType.REMOVE_NODE, B) is False
    # Once the node is added back it may register again.
    assert log.conf(ConfChangeType.ADD_VOTER, B) is True
    assert log.cmd(RegisterReceiver("x", "b2", B, 1)) is True


def test_noop_entries_are_ignored() -> None:
    reg = Registry()
    assert reg.apply(Entry(1, 1, EntryType.NOOP)) is None
    assert reg.applied_index == 1
    assert reg.version == 0


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xff",
        cbor2.dumps("register"),
        cbor2.dumps([]),
        cbor2.dumps([9, "x"]),
        cbor2.dumps([True, "ns", "r", A, 1]),
        cbor2.dumps([1, "ns", "r", A]),
        cbor2.dumps([1, "ns", "r", A, -1]),
        cbor2.dumps([1, "ns", "r", A, True]),
        cbor2.dumps([1, "ns", "r", A, 2**40]),
        cbor2.dumps([1, "", "r", A, 1]),
        cbor2.dumps([1, "ns", b"r", A, 1]),
        cbor2.dumps([1, "x" * 5000, "r", A, 1]),
        cbor2.dumps([2, "ns"]),
        cbor2.dumps([3, None]),
        b"\x81" * 100_000 + b"\x00",  # deeply nested arrays
    ],
)
def test_malformed_command_changes_nothing(data: bytes) -> None:
    reg = Registry({A: A})
    log = Log(reg)
    log.cmd(RegisterReceiver("ns", "keep", A, 1))
    before, version = state(reg), reg.version
    result = log.raw(data)
    assert result_error(result) is not None
    assert state(reg) == (before[0], before[1], 2)  # type: ignore[index]
    assert reg.version == version
    with pytest.raises(CommandError):
        decode_command(data)


def test_malformed_conf_change_changes_nothing() -> None:
    reg = Registry({A: A})
    log = Log(reg)
    for data in (b"", b"\x07\x00\x00\x00\x01a", b"\x00\x00\x00\x00\x09ab"):
        assert result_error(log.entry(EntryType.CONF_CHANGE, data)) is not None
    bad_address = ConfChange(ConfChangeType.ADD_VOTER, B, b"\xff\xfe").encode()
    assert result_error(log.entry(EntryType.CONF_CHANGE, bad_address)) is not None
    assert dict(reg.members) == {A: A}
    assert reg.version == 0


def test_result_error() -> None:
    assert result_error(True) is None
    assert result_error(False) is None
    assert result_error(None) is None
    assert result_error({"error": "why"}) == "why"


def test_encode_refuses_invalid_commands() -> None:
    with pytest.raises(CommandError):
        encode_command(RegisterReceiver("", "r", A, 1))
    with pytest.raises(CommandError):
        encode_command(RegisterReceiver("ns", "r", A, -5))
    with pytest.raises(CommandError):
        encode_command("not a command")  # type: ignore[arg-type]
    assert issubclass(CommandError, DchanError)
    assert issubclass(SnapshotError, DchanError)


names = st.text(min_size=1, max_size=12)
commands = st.one_of(
    st.builds(RegisterReceiver, names, names, names, st.integers(0, 2**31 - 1)),
    st.builds(UnregisterReceiver, names, names),
    st.builds(UnregisterNode, names),
)


@given(commands)
def test_command_round_trip(cmd: Command) -> None:
    assert decode_command(encode_command(cmd)) == cmd


# -- snapshots ---------------------------------------------------------------

small_names = st.sampled_from(["n1", "n2", "n3", "n4"])
namespaces_st = st.sampled_from(["a", "b", "c"])
receiver_ids = st.sampled_from([f"r{i}" for i in range(8)])
addresses = st.sampled_from(["", "h:1"])
operations = st.lists(
    st.one_of(
        st.builds(RegisterReceiver, namespaces_st, receiver_ids, small_names, st.integers(0, 9)),
        st.builds(UnregisterReceiver, namespaces_st, receiver_ids),
        st.builds(UnregisterNode, small_names),
        st.tuples(
            st.sampled_from(list(ConfChangeType)), small_names, st.sampled_from(["", "h:1"])
        ),
        st.just("noop"),
    ),
    max_size=40,
)


def run_ops(reg: Registry, ops: list[object]) -> Log:
    log = Log(reg)
    for op in ops:
        if op == "noop":
            log.entry(EntryType.NOOP, b"")
        elif isinstance(op, tuple):
            kind, node, address = op
            log.conf(kind, node, address)
        else:
            log.cmd(op)  # type: ignore[arg-type]
    return log


@settings(max_examples=150, deadline=None)
@given(operations, operations)
def test_snapshot_restore_round_trip(first: list[object], then: list[object]) -> None:
    original = Registry({"n1": "n1", "n2": "h:2"})
    run_ops(original, first)
    image = original.snapshot()
    copy = Registry({"zz": "stale"})
    copy.apply(Entry(1, 1, EntryType.NORMAL, encode_command(RegisterReceiver("q", "q", "zz", 1))))
    copy.restore(image)
    assert state(copy) == state(original)
    assert copy.snapshot() == image
    # The restored copy goes on exactly like the original.
    run_ops(original, then)
    run_ops(copy, then)
    assert state(copy) == state(original)
    assert copy.snapshot() == original.snapshot()


def _populated() -> Registry:
    reg = Registry({A: A, B: B})
    log = Log(reg)
    log.cmd(RegisterReceiver("x", "r1", A, 3))
    log.cmd(RegisterReceiver("y", "r2", B, 4))
    log.conf(ConfChangeType.REMOVE_NODE, C)
    return reg


TWICE = [["ns", "r", "n", 1, 1], ["ns", "r", "m", 1, 2]]


def _framed(body: bytes, version: int = 1) -> bytes:
    import zlib

    return struct.pack("<4sII", b"DCRG", version, zlib.crc32(body)) + body


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (b"", "truncated"),
        (b"XXXX" + b"\0" * 20, "magic"),
        (_framed(cbor2.dumps([0, [], [], []]), version=99), "version 99"),
        (_framed(b"\xff"), "does not decode"),
        (_framed(cbor2.dumps({"a": 1})), "malformed"),
        (_framed(cbor2.dumps([1, [["n", 5]], [], []])), "malformed"),
        (_framed(cbor2.dumps([1, [], [], [["ns", "r", "n", 1, 2]]])), "malformed"),
        (
            _framed(cbor2.dumps([2, [], [], [["ns", "r", "n", 1, 1], ["ns", "r", "n", 1, 2]]])),
            "twice",
        ),
        (_framed(cbor2.dumps([2, [], [], [["ns", "r", "n", -1, 1]]])), "malformed"),
    ],
)
def test_bad_snapshot_is_rejected_and_state_kept(image: bytes, match: str) -> None:
    reg = _populated()
    before, version = state(reg), reg.version
    with pytest.raises(SnapshotError, match=match):
        reg.restore(image)
    assert state(reg) == before
    assert reg.version == version


def test_bit_flip_in_snapshot_is_detected() -> None:
    image = bytearray(_populated().snapshot())
    for pos in range(4, len(image)):
        flipped = bytearray(image)
        flipped[pos] ^= 0x04
        reg = Registry()
        with pytest.raises(SnapshotError):
            reg.restore(bytes(flipped))
        assert reg.namespaces() == ()


# -- waiting -----------------------------------------------------------------


async def test_wait_for_wakes_on_matching_change() -> None:
    reg = Registry({A: A})
    log = Log(reg)
    seen: list[tuple[ReceiverInfo, ...]] = []

    async def waiter() -> None:
        await reg.wait_for(lambda r: len(r.receivers("orders")) >= 2)
        seen.append(reg.receivers("orders"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        log.cmd(RegisterReceiver("orders", "r1", A, 1))
        log.cmd(RegisterReceiver("other", "o1", A, 1))
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []
        log.cmd(RegisterReceiver("orders", "r2", A, 1))
    assert [r.receiver_id for r in seen[0]] == ["r1", "r2"]


async def test_wait_for_returns_at_once_when_true() -> None:
    reg = Registry()
    with trio.fail_after(1):
        await reg.wait_for(lambda r: True)


async def test_wait_changed_returns_new_version_and_ignores_noops() -> None:
    reg = Registry({A: A})
    log = Log(reg)
    log.cmd(RegisterReceiver("n", "r", A, 1))
    results: list[int] = []

    async def waiter() -> None:
        results.append(await reg.wait_changed(reg.version))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        log.cmd(RegisterReceiver("n", "r", A, 1))  # duplicate: no change
        log.raw(b"garbage")
        log.entry(EntryType.NOOP, b"")
        await trio.testing.wait_all_tasks_blocked()
        assert results == []
        log.cmd(UnregisterReceiver("n", "r"))
    assert results == [2]
    # A version already passed returns at once.
    with trio.fail_after(1):
        assert await reg.wait_changed(0) == 2


async def test_restore_wakes_waiters() -> None:
    image = _populated().snapshot()
    reg = Registry()
    done = trio.Event()

    async def waiter() -> None:
        await reg.wait_for(lambda r: r.receiver("x", "r1") is not None)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        reg.restore(image)
        with trio.fail_after(1):
            await done.wait()


async def test_waiting_is_cancellable() -> None:
    reg = Registry()
    with trio.move_on_after(0.01) as scope:
        await reg.wait_changed(0)
    assert scope.cancelled_caught
    # The cancelled waiter left nothing behind: a change later still works.
    Log(reg).conf(ConfChangeType.ADD_VOTER, A)
    assert reg.version == 1
