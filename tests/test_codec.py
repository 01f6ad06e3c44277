"""The codec round-trips what users send, and refuses what it cannot send."""

from __future__ import annotations

import dataclasses
import enum
import math
import threading
from collections import OrderedDict
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from ipaddress import IPv4Address
from typing import Any
from uuid import UUID

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

import trio_dchan
from trio_dchan import codec
from trio_dchan.codec import (
    DEFAULT_LIMITS,
    Limits,
    decode,
    decode_batch,
    encode,
    encode_batch,
    join_encoded,
    register,
)
from trio_dchan.errors import (
    CodecError,
    DchanError,
    DecodeError,
    EncodeError,
    RegistrationError,
)


# ---------------------------------------------------------------------------
# Exact comparison: == alone would accept 1 for True, a list for a tuple, a
# set for a frozenset, or a datetime whose UTC offset changed.
# ---------------------------------------------------------------------------
def assert_same(expected: Any, actual: Any) -> None:
    assert type(actual) is type(expected), (expected, actual)
    if isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual)
        else:
            assert actual == expected
            assert math.copysign(1.0, actual) == math.copysign(1.0, expected)
    elif isinstance(expected, Decimal):
        assert str(actual) == str(expected)
    elif isinstance(expected, datetime):
        assert actual == expected
        assert actual.utcoffset() == expected.utcoffset()
        assert (actual.tzinfo is None) == (expected.tzinfo is None)
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected)
        for e, a in zip(expected, actual, strict=True):
            assert_same(e, a)
    elif isinstance(expected, dict):
        # Keys are compared with == (they hold no NaN); values one by one.
        assert actual.keys() == expected.keys()
        actual_keys = {k: k for k in actual}
        for key, value in expected.items():
            assert_same(key, actual_keys[key])
            assert_same(value, actual[key])
    elif isinstance(expected, set | frozenset):
        assert actual == expected
        actual_items = {x: x for x in actual}
        for item in expected:
            assert_same(item, actual_items[item])
    elif dataclasses.is_dataclass(expected):
        for field in dataclasses.fields(expected):
            assert_same(getattr(expected, field.name), getattr(actual, field.name))
    else:
        assert actual == expected


def roundtrip(value: Any) -> Any:
    return decode(encode(value))


# ---------------------------------------------------------------------------
# Plain data
# ---------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(),
    st.text(),
    st.binary(),
    st.decimals(),
    st.uuids(),
    st.dates(),
    st.datetimes(),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5, minutes=-30))])),
)
hashables = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(), st.binary(), st.uuids()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(tuple),
        st.frozensets(inner, max_size=4),
    ),
    max_leaves=10,
)
plain_data = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.lists(inner, max_size=5).map(tuple),
        st.dictionaries(hashables, inner, max_size=5),
        st.sets(hashables, max_size=5),
        st.frozensets(hashables, max_size=5),
    ),
    max_leaves=30,
)


@given(plain_data)
def test_plain_data_round_trips_exactly(value: Any) -> None:
    assert_same(value, roundtrip(value))


@given(st.lists(plain_data, max_size=20))
def test_batches_round_trip_and_join_matches_encode_batch(values: list[Any]) -> None:
    batch = encode_batch(values)
    assert batch == join_encoded([encode(v) for v in values])
    assert_same(values, decode_batch(batch))


@pytest.mark.parametrize(
    "value",
    [
        (),
        (1, (2, (3,)), [4, (5,)]),
        frozenset(),
        frozenset({(1, 2), frozenset({3})}),
        {(1, "a"): {frozenset({1}): [()]}},
        {True: 1, 2: "two", "three": 3.0, b"four": None, None: 0},
        2**64,
        -(2**64) - 1,
        10**100,
        float("inf"),
        float("-inf"),
        float("nan"),
        -0.0,
        Decimal("-0"),
        Decimal("NaN"),
        Decimal("-sNaN12"),
        Decimal("-Infinity"),
        Decimal("1.2300E+5"),
        Decimal("1E-999999"),
        datetime(2024, 2, 29, 23, 59, 59, 999999),
        datetime(2024, 2, 29, 12, tzinfo=timezone(timedelta(hours=5, minutes=45))),
        date(1, 1, 1),
        UUID(int=0),
        "",
        "\u0000\U0010ffff",
        b"",
    ],
    ids=repr,
)
def test_edge_values_round_trip(value: Any) -> None:
    assert_same(value, roundtrip(value))


def test_bytes_like_values_arrive_as_bytes() -> None:
    assert_same([b"ab", b"cd"], roundtrip([bytearray(b"ab"), memoryview(b"cd")]))


def test_other_mappings_and_sequences_arrive_as_dict_and_list() -> None:
    assert_same({"a": [0, 1, 2]}, roundtrip(OrderedDict(a=range(3))))


def test_decode_accepts_any_bytes_like_buffer() -> None:
    data = encode({"k": [1, 2]})
    assert decode(bytearray(data)) == {"k": [1, 2]}
    assert decode(memoryview(b"xx" + data)[2:]) == {"k": [1, 2]}


# ---------------------------------------------------------------------------
# Registered types
# ---------------------------------------------------------------------------
@register
@dataclasses.dataclass(frozen=True, slots=True)
class Point:
    x: int
    y: int = 0


@register(name="tests.codec.Shape")
@dataclasses.dataclass
class Shape:
    name: str
    points: list[Point] = dataclasses.field(default_factory=list)
    origin: Point | None = None
    tags: frozenset[str] = frozenset()


@register
@dataclasses.dataclass(kw_only=True)
class Options:
    verbose: bool
    level: int = 1


@register
@dataclasses.dataclass
class Derived:
    base: int
    double: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if self.base < 0:
            raise ValueError("base must not be negative")
        self.double = 2 * self.base


@register
class Color(enum.Enum):
    RED = "red"
    GREEN = (0, 255, 0)


@register
class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


@register
class Perm(enum.Flag):
    R = 4
    W = 2
    X = 1


def test_register_returns_the_class_and_uses_the_qualified_name_by_default() -> None:
    assert codec._by_type[Point].name == f"{__name__}.Point"
    assert codec._by_type[Shape].name == "tests.codec.Shape"
    assert trio_dchan.register is register


def test_registered_dataclasses_round_trip_nested() -> None:
    shape = Shape(
        "triangle",
        [Point(0), Point(1, 2), Point(-5, 10**30)],
        origin=Point(7),
        tags=frozenset({"a", "b"}),
    )
    assert_same(shape, roundtrip(shape))
    assert_same({Point(1): [Point(2)]}, roundtrip({Point(1): [Point(2)]}))
    assert_same(frozenset({Point(3)}), roundtrip(frozenset({Point(3)})))


def test_keyword_only_and_init_false_fields() -> None:
    assert_same(Options(verbose=True), roundtrip(Options(verbose=True)))
    derived = roundtrip(Derived(21))
    assert derived.double == 42  # recomputed by __post_init__ on the receiver


def test_enums_round_trip_as_their_members() -> None:
    values = [Color.RED, Color.GREEN, Priority.HIGH, Perm.R | Perm.X, Perm(0)]
    out = roundtrip(values)
    assert out == values
    assert all(a is b for a, b in zip(out, values, strict=True))
    assert type(out[2]) is Priority  # not demoted to int


@given(
    st.lists(
        st.builds(
            Shape,
            name=st.text(),
            points=st.lists(st.builds(Point, st.integers(), st.integers()), max_size=4),
            origin=st.none() | st.builds(Point, st.integers()),
            tags=st.frozensets(st.text(max_size=3), max_size=3),
        ),
        max_size=6,
    ),
    st.lists(st.sampled_from([*Color, *Priority, *Perm]), max_size=5),
)
def test_registered_types_round_trip_property(shapes: list[Shape], members: list[Any]) -> None:
    value = {"shapes": shapes, "members": members, "by_point": {s.origin: s for s in shapes}}
    assert_same(value, roundtrip(value))
    assert_same(shapes, decode_batch(join_encoded([encode(s) for s in shapes])))


def test_wire_form_names_the_type() -> None:
    tag = cbor2.loads(encode(Point(1, 2)))
    assert isinstance(tag, cbor2.CBORTag)
    assert tag.tag == codec.TAG_OBJECT
    assert tag.value[0] == f"{__name__}.Point"
    assert list(tag.value[2:]) == [1, 2]


def test_registering_twice_is_harmless_but_names_are_unique() -> None:
    register(Point)  # same class, same name: nothing happens
    with pytest.raises(RegistrationError, match="already registered"):
        register(Point, name="another.name")

    @dataclasses.dataclass
    class Impostor:
        x: int

    with pytest.raises(RegistrationError, match=r"tests\.codec\.Shape"):
        register(Impostor, name="tests.codec.Shape")
    with pytest.raises(RegistrationError, match="already registered"):
        register(Impostor, name=f"{__name__}.Point")
    assert issubclass(RegistrationError, DchanError)


@pytest.mark.parametrize("bad", [int, object, type("Plain", (), {}), 42, "Point"])
def test_only_dataclasses_and_enums_can_be_registered(bad: Any) -> None:
    with pytest.raises(RegistrationError):
        register(bad)


def test_the_wire_name_must_be_a_non_empty_string() -> None:
    @dataclasses.dataclass
    class Unnamed:
        pass

    with pytest.raises(RegistrationError):
        register(Unnamed, name="")


# ---------------------------------------------------------------------------
# Encoding errors happen in the caller, with an actionable message
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class NotRegistered:
    x: int


class Plain:
    pass


def test_unregistered_dataclass_names_the_type_and_says_register() -> None:
    with pytest.raises(EncodeError, match=r"NotRegistered.*trio_dchan\.register\(NotRegistered\)"):
        encode({"deep": [NotRegistered(1)]})


def test_unregistered_plain_class_is_refused() -> None:
    with pytest.raises(EncodeError, match=r"test_codec\.Plain"):
        encode([Plain()])


def test_subclass_of_registered_class_must_be_registered_itself() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Point3(Point):
        z: int = 0

    with pytest.raises(EncodeError, match="Point3"):
        encode(Point3(1, 2, 3))


@pytest.mark.parametrize(
    "value",
    [
        1 + 2j,
        type("ComplexSubclass", (complex,), {})(1, 2),
        Fraction(1, 3),
        IPv4Address("127.0.0.1"),
        __import__("re").compile("a+"),
        cbor2.CBORTag(35, "a+"),
        cbor2.CBORSimpleValue(0),
        cbor2.undefined,
        print,
        Point,
    ],
    ids=repr,
)
def test_values_the_receiver_would_refuse_fail_at_the_sender(value: Any) -> None:
    with pytest.raises(EncodeError):
        encode([value])


def test_cycles_and_absurd_depth_raise_encode_error() -> None:
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(EncodeError, match="cycle"):
        encode(cyclic)
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(EncodeError, match="deeply"):
        encode(deep)


def test_a_failed_encode_does_not_disturb_the_next_one() -> None:
    shared = [1, 2]
    for _ in range(3):
        with pytest.raises(EncodeError):
            encode([shared, shared, Plain()])
        # The same list twice is not a cycle.
        assert decode(encode([shared, shared])) == [[1, 2], [1, 2]]


def test_encode_batch_fails_as_a_whole() -> None:
    with pytest.raises(EncodeError):
        encode_batch([1, Plain(), 3])


def test_error_family() -> None:
    for cls in (EncodeError, DecodeError, RegistrationError):
        assert issubclass(cls, CodecError)
        assert issubclass(cls, DchanError)
    assert trio_dchan.CodecError is CodecError
    assert trio_dchan.EncodeError is EncodeError
    assert trio_dchan.DecodeError is DecodeError


def test_threads_encode_concurrently_without_mixing_output() -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(seed: int) -> None:
        try:
            barrier.wait()
            for i in range(300):
                value = {"seed": seed, "i": i, "t": (seed, i), "p": Point(seed, i)}
                assert decode(encode(value)) == value
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("count", [0, 1, 23, 24, 255, 256, 65535, 65536])
def test_join_encoded_frames_any_count(count: int) -> None:
    items = [encode(i % 7) for i in range(count)]
    batch = join_encoded(items)
    assert batch == encode_batch([i % 7 for i in range(count)])
    assert decode_batch(batch) == [i % 7 for i in range(count)]


@given(st.lists(plain_data, max_size=20))
def test_split_batch_cuts_a_batch_into_its_messages(values: list[Any]) -> None:
    parts = [encode(v) for v in values]
    assert codec.split_batch(join_encoded(parts)) == parts
    assert codec.split_batch(memoryview(join_encoded(parts))) == parts


def test_encode_batch_accepts_any_iterable() -> None:
    assert decode_batch(encode_batch(x for x in (Point(1), (2,)))) == [Point(1), (2,)]


def test_each_batched_message_gets_the_full_depth_allowance() -> None:
    value: Any = 0
    for _ in range(DEFAULT_LIMITS.max_depth):
        value = [value]
    assert decode(encode(value)) == value
    assert decode_batch(encode_batch([value, value])) == [value, value]
    with pytest.raises(DecodeError):
        decode(encode([value]))
    with pytest.raises(DecodeError):
        decode_batch(encode_batch([[value]]))


def test_a_single_message_is_not_a_batch() -> None:
    with pytest.raises(DecodeError, match="batch"):
        decode_batch(encode({"not": "a batch"}))


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------
def test_limits_have_safe_defaults_and_validate() -> None:
    assert Limits() == DEFAULT_LIMITS
    assert DEFAULT_LIMITS.max_depth <= 100
    assert DEFAULT_LIMITS.max_size <= 64 * 1024 * 1024
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=0)
    with pytest.raises(ValueError, match="max_size"):
        Limits(max_size=-1)
    with pytest.raises(ValueError, match="max_items"):
        Limits(max_items=1.5)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_LIMITS.max_size = 1  # type: ignore[misc]


def test_limits_are_exact_bounds() -> None:
    value = {"blob": b"x" * 5000, "items": list(range(2000)), "text": "y" * 3000}
    data = encode(value)
    # map + 3 keys + bytes + array + 2000 ints + text
    exact = {
        "max_size": len(data),
        "max_items": 2007,
        "max_container_length": 2000,
        "max_string_length": 5000,
    }
    assert decode(data, limits=Limits(**exact)) == value
    for name, bound in exact.items():
        with pytest.raises(DecodeError):
            decode(data, limits=Limits(**{**exact, name: bound - 1}))


# ---------------------------------------------------------------------------
# Decoder reuse: each thread keeps idle decoders; nesting and failures must
# not leak state from one decode into the next.
# ---------------------------------------------------------------------------
@register(name="tests.codec.Envelope")
@dataclasses.dataclass
class Envelope:
    sealed: bytes
    opened: Any = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        # Decoding inside a constructor that runs during a decode.
        self.opened = decode(self.sealed)


def test_decode_nested_in_a_registered_constructor() -> None:
    inner = {"k": (1, Point(2))}
    batch = encode_batch([Envelope(encode(inner)), Envelope(encode([inner]))])
    for _ in range(3):
        first, second = decode_batch(batch)
        assert_same(inner, first.opened)
        assert_same([inner], second.opened)


def test_failures_and_other_limits_do_not_disturb_later_decodes() -> None:
    good = encode({"a": [1, 2, (3,)], "p": Point(1)})
    tight = Limits(max_depth=4)
    for bad in (good[:-1], good + b"\x00", b"\xd9\x9c\xa4\x61x", b"\x81" * 100 + b"\x00"):
        with pytest.raises(DecodeError):
            decode(bad)
        with pytest.raises(DecodeError):
            decode(bad, limits=tight)
        assert_same({"a": [1, 2, (3,)], "p": Point(1)}, decode(good))
        assert_same({"a": [1, 2, (3,)], "p": Point(1)}, decode(good, limits=tight))
    with pytest.raises(DecodeError):
        decode(encode([[[[[1]]]]]), limits=tight)


def test_dataclasses_that_cannot_be_rebuilt_from_their_fields_are_refused() -> None:
    @dataclasses.dataclass
    class WithInitVar:
        total: int = 0
        seed: dataclasses.InitVar[int] = 0

        def __post_init__(self, seed: int) -> None:
            self.total += seed

    @dataclasses.dataclass
    class CustomInit:
        x: int

        def __init__(self, value: str) -> None:
            self.x = int(value)

    for cls in (WithInitVar, CustomInit):
        with pytest.raises(RegistrationError, match="cannot be rebuilt"):
            register(cls)
        with pytest.raises(EncodeError):
            encode(cls(1) if cls is WithInitVar else cls("1"))


def test_unregistered_enums_do_not_slip_through_as_their_base_type() -> None:
    class Level(enum.IntEnum):
        LOW = 1

    class Mood(enum.StrEnum):
        HAPPY = "happy"

    for member in (Level.LOW, Mood.HAPPY):
        with pytest.raises(EncodeError, match=r"trio_dchan\.register"):
            encode([member])
    # Registering later makes the same type sendable.
    register(Level, name="tests.codec.Level")
    assert roundtrip([Level.LOW])[0] is Level.LOW


def test_subclasses_of_plain_types_arrive_as_the_base_type() -> None:
    import collections

    Pair = collections.namedtuple("Pair", "left right")

    class Name(str):
        pass

    class Stamp(datetime):
        pass

    value = [
        Pair(1, 2),
        Name("n"),
        collections.defaultdict(list, {"k": [1]}),
        Stamp(2020, 1, 2, 3, 4, 5),
    ]
    assert_same(
        [(1, 2), "n", {"k": [1]}, datetime(2020, 1, 2, 3, 4, 5)],
        roundtrip(value),
    )


# ---------------------------------------------------------------------------
# Types met for the first time: the encoder files each new type once, and
# must give its first value, and every later one, the same treatment.
# ---------------------------------------------------------------------------
def test_first_and_later_values_of_a_new_subclass_encode_alike() -> None:
    class Label(str):
        pass

    class Count(int):
        pass

    class Row(tuple[int, ...]):
        pass

    for _ in range(3):
        assert encode([Label("a"), Count(7), Row((1, 2))]) == encode(["a", 7, (1, 2)])


def test_other_mappings_and_sequences_keep_working_after_the_first_value() -> None:
    import collections
    import types
    from collections.abc import Iterator, Mapping

    class Frozen(Mapping[str, int]):
        def __init__(self, items: dict[str, int]) -> None:
            self._items = items

        def __getitem__(self, key: str) -> int:
            return self._items[key]

        def __iter__(self) -> Iterator[str]:
            return iter(self._items)

        def __len__(self) -> int:
            return len(self._items)

    for i in range(3):
        value = [
            Frozen({"a": i}),
            types.MappingProxyType({"b": i}),
            collections.deque([i, i]),
            range(i),
        ]
        assert_same([{"a": i}, {"b": i}, [i, i], list(range(i))], roundtrip(value))


def test_unsupported_classes_stay_refused_on_every_encode() -> None:
    class Opaque:
        pass

    for _ in range(3):
        with pytest.raises(EncodeError, match=r"Opaque"):
            encode({"k": Opaque()})
        with pytest.raises(EncodeError, match=r"Fraction"):
            encode({"k": type("MyFraction", (Fraction,), {})(1, 3)})


def test_a_dataclass_refused_before_registration_travels_after_it() -> None:
    @dataclasses.dataclass
    class Late:
        n: int

    for _ in range(2):
        with pytest.raises(EncodeError, match=r"trio_dchan\.register\(.*Late\)"):
            encode([Late(1)])
    register(Late, name="tests.codec.Late")
    assert_same([Late(2)], roundtrip([Late(2)]))


def test_threads_meeting_new_types_at_once_all_encode_them_correctly() -> None:
    kinds = [type(f"Name{n}", (str,), {}) for n in range(20)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        try:
            barrier.wait()
            for kind in kinds:
                assert_same(["x", 1], roundtrip([kind("x"), 1]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# ---------------------------------------------------------------------------
# Batches of plain data skip the type table; anything else inside them must
# still get the table's treatment.
# ---------------------------------------------------------------------------
plain_only = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(2**200), max_value=2**200),
        st.floats(),
        st.text(),
        st.binary(),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=4), inner, max_size=5),
        st.dictionaries(st.integers() | st.booleans() | st.binary(max_size=4), inner, max_size=3),
    ),
    max_leaves=30,
)


def test_the_plain_data_check_is_available_on_this_interpreter() -> None:
    # If this fails, gc.get_referents() no longer lists what the check
    # relies on: batches stay correct but lose the faster path.
    assert codec._PLAIN_PATH


@given(st.lists(plain_only, max_size=20))
def test_plain_batches_encode_exactly_as_message_by_message(values: list[Any]) -> None:
    batch = encode_batch(values)
    assert batch == join_encoded([encode(v) for v in values])
    assert_same(values, decode_batch(batch))


def test_a_non_plain_value_anywhere_in_a_batch_keeps_its_type() -> None:
    class Field(enum.StrEnum):
        ID = "id"

    class Level(enum.IntEnum):
        LOW = 1

    class Name(str):
        pass

    deep: Any = (1, 2)
    for _ in range(10):
        deep = [{"k": deep}]
    cases: list[tuple[Any, Any]] = [
        (deep, deep),
        ({Decimal("1.0"): 1}, {Decimal("1.0"): 1}),
        ({Name("n"): 1}, {"n": 1}),
        ({"a": [1, 2, frozenset({3})]}, {"a": [1, 2, frozenset({3})]}),
        ([OrderedDict(a=1)], [{"a": 1}]),
        ([datetime(2020, 1, 2, 3, 4, 5)], [datetime(2020, 1, 2, 3, 4, 5)]),
        ({"x": bytearray(b"ab")}, {"x": b"ab"}),
    ]
    for value, expected in cases:
        plain = [{"id": i, "item": "widget"} for i in range(20)]
        batch = encode_batch([*plain, value, *plain])
        assert_same([*plain, expected, *plain], decode_batch(batch))
    # An unregistered enum is refused even where an equal plain key or value
    # is in the same batch (a set of the batch's keys would hide it).
    for value in ({Field.ID: 1}, {"id": Level.LOW}, [Level.LOW]):
        with pytest.raises(EncodeError, match=r"trio_dchan\.register"):
            encode_batch([{"id": 1}, [1], value, {"id": 2}])


def test_plain_batches_nested_beyond_the_check_or_cyclic_still_fail_cleanly() -> None:
    nested: list[Any] = [1]
    for _ in range(codec._PLAIN_MAX_DEPTH + 5):
        nested = [nested]
    assert decode_batch(encode_batch([nested]), limits=Limits(max_depth=200)) == [nested]
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(EncodeError, match="deeply"):
        encode_batch([{"a": 1}, deep])
    cyclic: list[Any] = [1]
    cyclic.append({"again": cyclic})
    with pytest.raises(EncodeError, match="cycle"):
        encode_batch([cyclic])


def test_a_failed_plain_batch_does_not_disturb_the_next_one() -> None:
    for _ in range(3):
        with pytest.raises(EncodeError, match="UnicodeEncodeError"):
            encode_batch([{"a": "\ud800"}])
        assert decode_batch(encode_batch([{"a": "ok"}])) == [{"a": "ok"}]
