"""Bytes from a peer are untrusted: every bad input ends in DecodeError.

Each test feeds the decoder something a hostile or broken peer could send and
checks that it is refused with :class:`DecodeError` (and nothing else), that
it never runs code that was not registered, and that a header claiming a
huge size cannot make the decoder allocate before it finds out.
"""

from __future__ import annotations

import dataclasses
import tracemalloc
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from trio_dchan import codec
from trio_dchan.codec import (
    DEFAULT_LIMITS,
    TAG_OBJECT,
    Limits,
    decode,
    decode_batch,
    encode,
    encode_batch,
    join_encoded,
    register,
    split_batch,
)
from trio_dchan.errors import DecodeError

# Small limits make the header walk run on small buffers too.
TINY = Limits(
    max_size=4096, max_depth=8, max_items=64, max_container_length=16, max_string_length=32
)


@register(name="hostile.Guarded")
@dataclasses.dataclass
class Guarded:
    amount: int

    def __post_init__(self) -> None:
        if self.amount < 0:
            raise ValueError("amount must not be negative")


def tagged(tag: int, value: Any) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(tag, value))


def refuses(data: bytes, match: str | None = None, limits: Limits | None = None) -> None:
    with pytest.raises(DecodeError, match=match):
        decode(data, limits=limits)


# ---------------------------------------------------------------------------
# Nothing unregistered is ever built or called
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "record",
    [
        ["os.system", 0, "echo hacked"],
        ["builtins.eval", 0, "1"],
        ["subprocess.Popen", 0, ["true"]],
        [f"{__name__}.Unregistered", 0],
    ],
)
def test_unknown_type_names_are_refused(record: list[Any]) -> None:
    refuses(tagged(TAG_OBJECT, record), match="unknown type name")


@pytest.mark.parametrize(
    "record",
    [
        "hostile.Guarded",
        [],
        ["hostile.Guarded"],
        [42, 0, 1],
        [["hostile.Guarded"], 0, 1],
        {"name": "hostile.Guarded"},
    ],
    ids=repr,
)
def test_malformed_records_are_refused(record: Any) -> None:
    refuses(tagged(TAG_OBJECT, record))


def test_record_with_another_field_layout_is_refused() -> None:
    good = cbor2.loads(encode(Guarded(1))).value
    refuses(tagged(TAG_OBJECT, [good[0], good[1] ^ 1, 1]), match="other fields")
    refuses(tagged(TAG_OBJECT, [good[0], good[1], 1, 2]), match="other fields")


def test_registered_constructor_errors_become_decode_errors() -> None:
    good = cbor2.loads(encode(Guarded(1))).value
    refuses(tagged(TAG_OBJECT, [good[0], good[1], -1]), match="must not be negative")


def test_unknown_enum_value_is_refused() -> None:
    import enum

    @register(name="hostile.Mode")
    class Mode(enum.Enum):
        ON = 1

    refuses(tagged(TAG_OBJECT, ["hostile.Mode", 2]), match="no member")
    refuses(tagged(TAG_OBJECT, ["hostile.Mode", [1]]), match="no member")


# ---------------------------------------------------------------------------
# Tags: only the ones the codec writes
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("tag", "content"),
    [
        (35, "^(a+)+$"),  # regular expression: would be compiled
        (36, "Content-Type: text/plain\n\nhi"),  # MIME message: would be parsed
        (28, [1, 2]),  # shareable value
        (29, 0),  # shared reference (cycles)
        (256, ["abc", cbor2.CBORTag(25, 0)]),  # string namespace
        (25, 0),  # string reference
        (1, 1e300),  # epoch datetime (not written by the codec)
        (4, [-2, 12345]),  # decimal fraction (the codec writes its own)
        (5, [10**6, 3]),  # bigfloat: 2 ** exponent
        (30, [1, 0]),  # rational
        (52, b"\x7f\x00\x00\x01"),  # IPv4
        (54, b"\x00" * 16),  # IPv6
        (260, b"\x00" * 4),
        (261, {b"\x00" * 4: 8}),
        (100, 0),
        (43000, [1.0, 2.0]),  # complex
        (55799, 1),  # self-described CBOR
        (12345, None),  # unknown
        (2**63, None),
    ],
)
def test_tags_the_codec_does_not_write_are_refused(tag: int, content: Any) -> None:
    refuses(tagged(tag, content), match=f"tag {tag} is not accepted")


@pytest.mark.parametrize(
    ("tag", "content"),
    [
        (codec.TAG_TUPLE, "abc"),
        (codec.TAG_FROZENSET, 5),
        (codec.TAG_FROZENSET, [[1], [2]]),  # unhashable elements
        (codec.TAG_NAIVE_DATETIME, "yesterday"),
        (codec.TAG_NAIVE_DATETIME, "2020-01-01T00:00:00+01:00"),
        (codec.TAG_NAIVE_DATETIME, 0),
        (codec.TAG_DECIMAL, "1.2.3"),
        (codec.TAG_DECIMAL, 12),
        (0, 17),  # datetime string that is not a string
        (0, "not a date"),
        (2, [1, 2]),  # bignum that is not bytes
        (37, b"short"),  # UUID of the wrong size
        (258, 5),  # set of a non-array
        (1004, "2020-13-45"),
    ],
    ids=repr,
)
def test_bad_content_under_accepted_tags_is_refused(tag: int, content: Any) -> None:
    refuses(tagged(tag, content))


# ---------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x1c",  # reserved additional information
        b"\x5e",
        b"\xff",  # lone break
        b"\x9f\x01\xff",  # indefinite array
        b"\x5f\x41a\xff",  # indefinite byte string
        b"\xbf\x01\x02\xff",  # indefinite map
        b"\x62\xff\xfe",  # invalid UTF-8
        b"\xf8\x10",  # two-byte simple value
    ],
    ids=lambda d: d.hex() or "empty",
)
def test_malformed_data_is_refused(data: bytes) -> None:
    refuses(data)
    refuses(data, limits=TINY)


def test_every_truncation_of_a_valid_message_is_refused() -> None:
    value = {"p": Guarded(3), "t": (1, "two", [3.0]), "b": b"\x00" * 40, "n": 2**80}
    data = encode(value)
    for cut in range(len(data)):
        refuses(data[:cut])
        refuses(data[:cut], limits=TINY)
        with pytest.raises(DecodeError):
            decode_batch(encode_batch([value])[: cut + 1])


@pytest.mark.parametrize("limits", [DEFAULT_LIMITS, TINY], ids=["default", "tiny"])
def test_trailing_bytes_are_refused(limits: Limits) -> None:
    refuses(encode(1) + b"\x00", match="trailing", limits=limits)
    refuses(encode([1, 2]) + encode(3), match="trailing", limits=limits)
    with pytest.raises(DecodeError, match="trailing"):
        decode_batch(encode_batch([1]) + b"\xf6", limits=limits)


@pytest.mark.parametrize(
    "data",
    [
        b"\xa2\x01\x01\x01\x02",  # {1: 1, 1: 2}
        b"\xa2\x61a\x00\x61a\x00",  # {"a": 0, "a": 0}
        b"\x81\xa2\x01\x01\x01\x02",  # inside an array
        b"\xa1\xa2\x01\x01\x01\x02\x00",  # inside a map used as a key
        b"\xa2\xd9\x9c\xa4\x81\x01\x00\xd9\x9c\xa4\x81\x01\x00",  # {(1,): 0, (1,): 0}
    ],
    ids=lambda d: d.hex(),
)
def test_duplicate_map_keys_are_refused(data: bytes) -> None:
    refuses(data)


@pytest.mark.parametrize("limits", [DEFAULT_LIMITS, TINY], ids=["default", "tiny"])
def test_nesting_deeper_than_the_limit_is_refused(limits: Limits) -> None:
    depth = limits.max_depth
    ok = b"\x81" * depth + b"\x00"
    assert decode(ok, limits=limits) is not None
    refuses(b"\x81" * (depth + 1) + b"\x00", limits=limits)
    # Tags count as levels too.
    refuses(b"\xd9\x9c\xa4" * (depth + 1) + b"\x80", limits=limits)
    # Far deeper than any stack allows: still only an error.
    refuses(b"\x81" * 1_000_000 + b"\x00", limits=limits)


def test_buffer_larger_than_max_size_is_refused_before_parsing() -> None:
    limits = Limits(max_size=100)
    refuses(encode(b"x" * 200), match="exceeds the limit", limits=limits)
    # Even garbage: the size check comes first.
    refuses(b"\xff" * 101, match="exceeds the limit", limits=limits)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (encode(list(range(100))), "container"),
        (encode({i: i for i in range(17)}), "container"),
        (encode(frozenset(range(17))), "container"),
        (encode("x" * 33), "string"),
        (encode(b"x" * 33), "string"),
        (encode([[]] * 65), "items|container"),
        (encode([[[[1]]]] * 16), "items"),
    ],
)
def test_walk_enforces_item_container_and_string_limits(data: bytes, match: str) -> None:
    refuses(data, match=match, limits=TINY)


# ---------------------------------------------------------------------------
# Declared lengths: no large allocation before the check
# ---------------------------------------------------------------------------
def peak_allocation(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        action()
    except DecodeError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize(
    "header",
    [
        b"\x5b" + (2**62).to_bytes(8, "big"),  # byte string of 4 EiB
        b"\x7b" + (2**62).to_bytes(8, "big"),  # text string
        b"\x9b" + (2**62).to_bytes(8, "big"),  # array
        b"\xbb" + (2**62).to_bytes(8, "big"),  # map
        b"\x5a" + (2**31).to_bytes(4, "big"),  # byte string of 2 GiB
        b"\xd9\x01\x02\x9b" + (2**62).to_bytes(8, "big"),  # set
        b"\xd9\x9c\xa4\x9b" + (2**62).to_bytes(8, "big"),  # tuple
    ],
    ids=lambda h: h.hex(),
)
@pytest.mark.parametrize("limits", [DEFAULT_LIMITS, TINY], ids=["default", "tiny"])
def test_huge_declared_lengths_fail_without_allocating(header: bytes, limits: Limits) -> None:
    data = header + b"\x00" * 16
    refuses(data, limits=limits)
    assert peak_allocation(lambda: decode(data, limits=limits)) < 1024 * 1024


def test_walk_refuses_a_declared_length_over_the_limit_even_if_present() -> None:
    # The bytes are all there, but the string is longer than allowed.
    limits = Limits(max_string_length=1000)
    refuses(encode("z" * 1001), match="string", limits=limits)
    refuses(encode(["z" * 1001]), match="string", limits=limits)


def test_many_tiny_items_are_bounded_by_max_items() -> None:
    # One byte per empty list: the worst ratio of objects to input bytes.
    data = b"\x9a" + (500_000).to_bytes(4, "big") + b"\x80" * 500_000
    refuses(data, match="items", limits=Limits(max_items=100_000))
    assert len(decode(data)) == 500_000  # within the defaults it decodes


# ---------------------------------------------------------------------------
# Fuzzing: arbitrary and mutated bytes raise DecodeError or decode
# ---------------------------------------------------------------------------
def decode_or_refuse(data: bytes) -> None:
    for limits in (DEFAULT_LIMITS, TINY):
        for function in (decode, decode_batch):
            try:
                function(data, limits=limits)
            except DecodeError:
                pass


@settings(max_examples=1000)
@given(st.binary(max_size=512))
@example(b"\xd8\x1b\x83\x6fhostile.Guarded\x00\x01")
@example(b"\xd8\x1b\x82\x6fhostile.Guarded\xa1\x00\x00")
@example(b"\xd9\x01\x02\x81\xa0")
@example(b"\xd9\x9c\xa5\x81\x80")
def test_arbitrary_bytes_only_ever_raise_decode_error(data: bytes) -> None:
    decode_or_refuse(data)


valid_messages = st.recursive(
    st.one_of(
        st.none(),
        st.integers(),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
        st.builds(Guarded, st.integers(min_value=0)),
        st.datetimes(),
        st.decimals(places=2, allow_nan=False),
        st.uuids(),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=4),
        st.frozensets(st.integers(), max_size=4),
        st.sets(st.text(max_size=3), max_size=4),
    ),
    max_leaves=12,
)


@settings(max_examples=500)
@given(
    valid_messages,
    st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from(["replace", "insert", "delete"]),
)
def test_mutated_messages_only_ever_raise_decode_error(
    value: Any, edits: list[tuple[int, int]], how: str
) -> None:
    data = bytearray(encode(value))
    for position, byte in edits:
        index = position % (len(data) + 1)
        if how == "replace" and index < len(data):
            data[index] = byte
        elif how == "insert":
            data.insert(index, byte)
        elif index < len(data):
            del data[index]
    decode_or_refuse(bytes(data))


@given(valid_messages)
def test_the_header_walk_accepts_what_the_codec_writes(value: Any) -> None:
    data = encode(value)
    # No string in ``data`` can be longer than ``data`` minus its header, so
    # this limit forces the walk without being exceeded.
    forced = Limits(max_string_length=max(len(data) - 1, 1))
    assert repr(decode(data, limits=forced)) == repr(decode(data))
    codec._walk(data, DEFAULT_LIMITS, DEFAULT_LIMITS.max_depth)


def test_in_a_batch_the_item_limit_applies_to_each_message() -> None:
    # 64 items allowed; each message holds 41, the batch 165.
    limits = Limits(max_items=64)
    value = list(range(40))
    batch = encode_batch([value] * 4)
    assert len(batch) > limits._walk_above
    assert decode_batch(batch, limits=limits) == [value] * 4
    with pytest.raises(DecodeError, match="items in one buffer"):
        decode(encode([value] * 4), limits=limits)
    with pytest.raises(DecodeError, match="items in one message"):
        decode_batch(encode_batch([value, list(range(70))]), limits=limits)


def test_split_batch_finds_the_messages_around_a_bad_one() -> None:
    deep: Any = []
    for _ in range(100):
        deep = [deep]
    parts = [encode(1), encode(deep), encode({"a": (1, 2)}), encode(Guarded(3))]
    batch = join_encoded(parts)
    with pytest.raises(DecodeError):
        decode_batch(batch)
    assert split_batch(batch) == parts
    outcomes = []
    for part in split_batch(batch):
        try:
            outcomes.append(decode(part))
        except DecodeError:
            outcomes.append("bad")
    assert outcomes == [1, "bad", {"a": (1, 2)}, Guarded(3)]


@pytest.mark.parametrize(
    "data",
    [
        b"",  # nothing
        b"\x01",  # not an array
        b"\x82\x01",  # one message short
        b"\x81\x01\x02",  # trailing bytes
        b"\x9f\x01\xff",  # indefinite length
        b"\x81\x5a\x00\x00\x10\x00",  # a string longer than the buffer
        b"\x81\x1c",  # reserved header value
    ],
)
def test_split_batch_refuses_broken_framing(data: bytes) -> None:
    with pytest.raises(DecodeError):
        split_batch(data)
