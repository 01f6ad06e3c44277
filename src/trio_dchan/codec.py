"""Values <-> CBOR bytes, for messages that cross the network.

What travels
------------
Plain data needs no set-up: ``None``, ``bool``, ``int`` (any size),
``float``, ``str``, ``bytes``, ``list``, ``tuple``, ``dict``, ``set``,
``frozenset``, ``datetime`` (naive or aware), ``date``, ``Decimal`` and
``UUID``, nested in any way. Each comes back as the same type (a ``tuple``
stays a ``tuple``, a ``frozenset`` stays a ``frozenset``); ``bytearray`` and
``memoryview`` arrive as ``bytes``, other sequences and mappings as ``list``
and ``dict``, and an aware datetime keeps its instant and UTC offset but
arrives with a fixed-offset ``tzinfo``.

Dataclasses and enums travel once they are registered with
:func:`register`, the analogue of Go's ``gob.Register``. The wire form names
the type (by default its module-qualified name), so both programs must
register the class under the same name; fields travel by name, so a field
with a default may be added on one side before the other.

Encoding an unsupported value raises :class:`~trio_dchan.errors.EncodeError`
in the calling task.

Untrusted input
---------------
:func:`decode` treats its input as hostile. It never imports, instantiates or
calls anything that was not registered; it accepts only the CBOR tags this
module writes (no regular expressions, MIME messages, shared or string
references, no unknown tags); it rejects duplicate map keys, indefinite
lengths, trailing bytes and nesting deeper than :attr:`Limits.max_depth`. A
buffer larger than :attr:`Limits.max_size` is refused before any parsing. For
buffers too small to break the other limits nothing more is needed: cbor2
reads lengths lazily, so a header that claims more data than the buffer holds
fails at the end of the buffer without a large allocation. Larger buffers are
first walked header by header (no values are built) to enforce
:attr:`Limits.max_items`, :attr:`Limits.max_container_length` and
:attr:`Limits.max_string_length` before cbor2 builds anything. Whatever goes
wrong, only :class:`~trio_dchan.errors.DecodeError` escapes.

Batches
-------
The data plane ships many messages in one frame. :func:`encode_batch` /
:func:`decode_batch` turn a sequence of values into one buffer and back with a
single call into cbor2 (the per-message work happens in cbor2's compiled
code). :func:`join_encoded` builds the same buffer from messages that were
already encoded one by one with :func:`encode` (so that each ``send()``
reports its own encoding error), without encoding them again. A batch made
only of plain data (exact ``dict``, ``list``, ``str``, ``int``, ``float``,
``bool``, ``None`` and ``bytes``) is encoded without the codec's type table,
which is faster and writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import inspect
import io
import itertools
import re
import threading
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from email.mime.text import MIMEText
from fractions import Fraction
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from typing import Any, Final, TypeVar, overload
from uuid import UUID

import cbor2

from .errors import CodecError, DecodeError, EncodeError, RegistrationError

__all__ = [
    "DEFAULT_LIMITS",
    "CodecError",
    "DecodeError",
    "EncodeError",
    "Limits",
    "RegistrationError",
    "decode",
    "decode_batch",
    "encode",
    "encode_batch",
    "join_encoded",
    "register",
    "split_batch",
]

T = TypeVar("T")

# --------------------------------------------------------------------------
# Wire tags
# --------------------------------------------------------------------------
# Tag 27 is CBOR's "object with a type name and constructor arguments":
# [type name, ...]. The others are private to trio_dchan peers; they sit
# in the first-come-first-served range and need a 3-byte header.
TAG_OBJECT: Final = 27
TAG_TUPLE: Final = 40100
TAG_FROZENSET: Final = 40101
TAG_NAIVE_DATETIME: Final = 40102
TAG_DECIMAL: Final = 40103

# Standard tags that cbor2 decodes itself and that this module writes:
# 0 datetime string, 2/3 bignums, 37 UUID, 258 set, 1004 date string.
_BUILTIN_TAGS: Final = frozenset({0, 2, 3, 37, 258, 1004})

_MiB: Final = 1024 * 1024


# --------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """What one decoded buffer may cost. Every limit applies to one call.

    The defaults keep the memory a hostile buffer can claim near 100 MB of
    Python objects, while leaving real messages (and batches of them) far
    from any limit. Pass a tighter or
    looser instance as ``limits=`` where a buffer's origin warrants it.
    """

    #: Largest buffer accepted at all, in bytes (a whole batch counts once).
    max_size: int = 16 * _MiB
    #: Deepest nesting of containers and tags in one value. A registered
    #: dataclass costs 2 levels (its tag and its record). 64 is far below
    #: the depth at which ``repr()`` or ``==`` on the result would hit
    #: Python's recursion limit in the receiving program.
    max_depth: int = 64
    #: Most CBOR data items (every scalar, key, container and tag) in one
    #: buffer, or in one message of a batch. Each item becomes a Python
    #: object of up to ~100 bytes, so this bounds memory growth from tiny
    #: items such as empty lists.
    max_items: int = 1 << 20
    #: Most elements in one array, set or map (map entries count once).
    max_container_length: int = 1 << 20
    #: Longest single ``str`` (in UTF-8 bytes) or ``bytes`` value.
    max_string_length: int = 16 * _MiB
    # Buffers no longer than this cannot break the item, container or string
    # limits, so they skip the header walk.
    _walk_above: int = dataclasses.field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        for name in (
            "max_size",
            "max_depth",
            "max_items",
            "max_container_length",
            "max_string_length",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")
        if self.max_depth > 10_000:
            raise ValueError("Limits.max_depth must be at most 10000")
        object.__setattr__(
            self,
            "_walk_above",
            min(self.max_items, self.max_container_length, self.max_string_length),
        )


DEFAULT_LIMITS: Final = Limits()
# For walks that only check the framing.
_NO_LIMITS: Final = Limits(
    max_size=1 << 62,
    max_items=1 << 62,
    max_container_length=1 << 62,
    max_string_length=1 << 62,
)


# --------------------------------------------------------------------------
# Registry of user types
# --------------------------------------------------------------------------
class _Entry:
    __slots__ = ("build", "cls", "layout", "name", "positional_size")

    def __init__(
        self,
        cls: type,
        name: str,
        build: Callable[[Sequence[Any]], Any],
        *,
        layout: int = -1,
        positional_size: int = -1,
    ) -> None:
        self.cls = cls
        self.name = name
        #: Full decoding with every check and a precise error message.
        self.build = build
        #: For dataclasses built from positional arguments: the record size
        #: and layout id that allow the decoder's fast path (-1: never).
        self.layout = layout
        self.positional_size = positional_size


_by_name: dict[str, _Entry] = {}
_by_type: dict[type, _Entry] = {}
_registry_lock = threading.Lock()


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _layout_id(field_names: Sequence[str]) -> int:
    # Records carry field values by position; this checksum of the field
    # names (in order) makes a sender and receiver whose classes differ
    # fail loudly instead of filling the wrong fields.
    return zlib.crc32(",".join(field_names).encode())


def _dataclass_encoder(
    name: str, layout: int, field_names: Sequence[str]
) -> Callable[[Any, Any], None]:
    # Generated straight-line code: attribute reads in a list display are
    # several times faster than a loop over getattr, and a positional record
    # is much cheaper to build and encode than a map of field names.
    values = "".join(f", obj.{f}" for f in field_names)
    source = (
        "def encode_record(encoder, obj):\n"
        f"    ENCODE_SEMANTIC(encoder, {TAG_OBJECT}, [NAME, LAYOUT{values}])\n"
    )
    namespace: dict[str, Any] = {
        "NAME": name,
        "LAYOUT": layout,
        "ENCODE_SEMANTIC": cbor2.CBOREncoder.encode_semantic,
    }
    exec(source, namespace)
    encoder: Callable[[Any, Any], None] = namespace["encode_record"]
    return encoder


def _dataclass_builder(
    cls: type, name: str, layout: int, field_names: Sequence[str], keywords: bool
) -> Callable[[Sequence[Any]], Any]:
    size = len(field_names) + 2

    def build(record: Sequence[Any]) -> Any:
        if len(record) != size or record[1] != layout:
            raise DecodeError(
                f"the sender's {name!r} has other fields than this program's "
                f"{cls.__qualname__} ({', '.join(field_names)}); both sides must run "
                "the same class definition"
            )
        try:
            if keywords:
                return cls(**dict(zip(field_names, record[2:], strict=True)))
            return cls(*record[2:])
        except Exception as exc:
            raise DecodeError(
                f"cannot rebuild registered type {name!r}: {_short(str(exc), 200)}"
            ) from exc

    return build


def _enum_encoder(name: str) -> Callable[[Any, Any], None]:
    encode_semantic = cbor2.CBOREncoder.encode_semantic

    def encode_member(encoder: Any, member: Any) -> None:
        encode_semantic(encoder, TAG_OBJECT, [name, member.value])

    return encode_member


def _enum_builder(cls: type, name: str) -> Callable[[Sequence[Any]], Any]:
    def build(record: Sequence[Any]) -> Any:
        if len(record) != 2:
            raise DecodeError(f"a record of enum {name!r} must be [name, value]")
        try:
            return cls(record[1])
        except Exception as exc:
            raise DecodeError(
                f"no member of registered enum {name!r} has the value {_short(repr(record[1]))}"
            ) from exc

    return build


@overload
def register(cls: type[T], *, name: str | None = None) -> type[T]: ...
@overload
def register(cls: None = None, *, name: str | None = None) -> Callable[[type[T]], type[T]]: ...


def register(
    cls: type[T] | None = None, *, name: str | None = None
) -> type[T] | Callable[[type[T]], type[T]]:
    """Make a dataclass or an enum sendable, like Go's ``gob.Register``.

    ``name`` is the type's name on the wire; it defaults to
    ``"module.QualifiedName"``. Programs that exchange the type must register
    it under the same name (pass ``name=`` when the modules differ). Returns
    the class, so it also works as ``@register`` or ``@register(name=...)``.

    Raises :class:`~trio_dchan.errors.RegistrationError` if ``cls`` is not a
    dataclass or enum, if ``name`` is already taken by another class, or if
    the class is already registered under another name. Registering the same
    class under the same name again does nothing.
    """
    if cls is None:

        def decorator(inner: type[T]) -> type[T]:
            return register(inner, name=name)

        return decorator

    if not isinstance(cls, type):
        raise RegistrationError(f"register() needs a class, got {cls!r}")
    wire_name = f"{cls.__module__}.{cls.__qualname__}" if name is None else name
    if type(wire_name) is not str or not wire_name:
        raise RegistrationError(f"the wire name must be a non-empty str, got {wire_name!r}")

    build: Callable[[Sequence[Any]], Any]
    encode_value: Callable[[Any, Any], None]
    layout = positional_size = -1
    if issubclass(cls, enum.Enum):
        build = _enum_builder(cls, wire_name)
        encode_value = _enum_encoder(wire_name)
    elif dataclasses.is_dataclass(cls):
        init_fields = [f for f in dataclasses.fields(cls) if f.init]
        names = [f.name for f in init_fields]
        try:
            parameters = list(inspect.signature(cls).parameters)
        except (TypeError, ValueError):
            parameters = []
        if sorted(parameters) != sorted(names):
            raise RegistrationError(
                f"{cls.__qualname__} cannot be rebuilt from its fields: its __init__ takes "
                f"({', '.join(parameters)}) but its init fields are ({', '.join(names)}); "
                "InitVar parameters and custom __init__ signatures are not supported"
            )
        keywords = any(f.kw_only for f in init_fields)
        layout = _layout_id(names)
        build = _dataclass_builder(cls, wire_name, layout, names, keywords)
        encode_value = _dataclass_encoder(wire_name, layout, names)
        if not keywords:
            positional_size = len(names) + 2
    else:
        raise RegistrationError(
            f"register() accepts dataclasses and enums; {cls.__qualname__} is neither"
        )

    with _registry_lock:
        existing = _by_name.get(wire_name)
        if existing is not None:
            if existing.cls is cls:
                return cls
            raise RegistrationError(
                f"the name {wire_name!r} is already registered for "
                f"{existing.cls.__module__}.{existing.cls.__qualname__}"
            )
        previous = _by_type.get(cls)
        if previous is not None:
            raise RegistrationError(
                f"{cls.__qualname__} is already registered as {previous.name!r}"
            )
        entry = _Entry(cls, wire_name, build, layout=layout, positional_size=positional_size)
        _by_name[wire_name] = entry
        _by_type[cls] = entry
        _ENCODERS[cls] = encode_value
    return cls


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------
_Encoder = cbor2.CBOREncoder


def _encode_none(encoder: Any, _value: None) -> None:
    encoder.encode_none()


def _encode_tuple(encoder: Any, value: tuple[Any, ...]) -> None:
    encoder.encode_semantic(TAG_TUPLE, list(value))


def _encode_frozenset(encoder: Any, value: frozenset[Any]) -> None:
    encoder.encode_semantic(TAG_FROZENSET, list(value))


def _encode_datetime(encoder: Any, value: datetime) -> None:
    if value.utcoffset() is None:
        encoder.encode_semantic(TAG_NAIVE_DATETIME, value.replace(tzinfo=None).isoformat())
    else:
        encoder.encode_datetime(value)


def _encode_decimal(encoder: Any, value: Decimal) -> None:
    # The string form is exact: sign of zero, exponent, NaN payloads and
    # infinities all survive (cbor2's tag 4 loses some of these).
    encoder.encode_semantic(TAG_DECIMAL, str(value))


def _encode_bytes_like(encoder: Any, value: bytearray | memoryview) -> None:
    encoder.encode_bytes(bytes(value))


def _refuse(encoder: Any, value: Any) -> None:
    raise EncodeError(
        f"values of type {type(value).__module__}.{type(value).__qualname__} "
        "are not supported by trio_dchan's codec; convert the value to plain data"
    )


def _unencodable(encoder: Any, value: Any) -> None:
    cls = type(value)
    qualname = f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(value, enum.Enum) or dataclasses.is_dataclass(value):
        hint = (
            f"call trio_dchan.register({cls.__qualname__}) in every program "
            "that sends or receives it"
        )
    else:
        hint = (
            "convert it to plain data, or make it a dataclass and call "
            f"trio_dchan.register({cls.__qualname__})"
        )
    raise EncodeError(f"cannot encode a value of unregistered type {qualname}: {hint}")


def _file_type(cls: type) -> Callable[[Any, Any], None] | None:
    """The table entry for a type met for the first time, or None if not ours.

    A subclass of a supported type is encoded as its base (an ``OrderedDict``
    as a dict, a named tuple as a tuple), while an enum or dataclass that was
    not registered is refused instead of slipping through as its base type
    (an ``IntEnum`` as an int).
    """
    if issubclass(cls, enum.Enum) or dataclasses.is_dataclass(cls):
        return _unencodable
    if issubclass(cls, _REFUSED):
        return _refuse
    for base in _SUBCLASSABLE:
        if issubclass(cls, base):
            return _ENCODERS[base]
    return None


def _first_of_its_type(encoder: Any, value: Any) -> None:
    """Encode a value whose type has no entry in :data:`_ENCODERS` yet.

    The table's lookup put this function under the new type; it now files
    the type under its real entry (so the next value of that type is a plain
    hit) and encodes the value with it. Types that are not ours (other
    mappings and sequences, which cbor2 writes as maps and arrays, and
    classes nobody can send) keep this function as their entry and are
    classified again each time, as cbor2 itself would.
    """
    cls = type(value)
    entry = _file_type(cls)
    if entry is not None:
        with _registry_lock:
            # register() may have filed the class meanwhile; keep its entry.
            if _ENCODERS.get(cls) is _first_of_its_type:
                _ENCODERS[cls] = entry
            entry = _ENCODERS[cls]
        entry(encoder, value)
    elif isinstance(value, Mapping):
        encoder.encode_map(value)
    elif isinstance(value, Sequence):
        encoder.encode_array(value)
    else:
        _unencodable(encoder, value)


def _unfiled() -> Callable[[Any, Any], None]:
    return _first_of_its_type


# Exact type -> encoder, consulted by cbor2 for every value it encodes.
#
# Every common type has an entry, even those cbor2 handles natively: a hit is
# cheaper than a miss, and each call through the table counts towards
# Python's recursion limit, so absurdly deep values raise instead of
# overflowing the C stack. A type without an entry gets one on its first
# lookup: the defaultdict files :func:`_first_of_its_type` under it, which
# then replaces itself with the right entry.
#
# The table must be a ``defaultdict`` itself, not a subclass of ``dict`` or
# ``defaultdict``: ``dict`` defines ``__getitem__`` as a method, so a
# subclass defined in Python reaches its items through that method on every
# lookup, which costs about 10 ns per encoded value (a tenth of the whole
# encoding cost of a small dict). A ``defaultdict`` is looked up as fast as a
# ``dict`` and still files unknown types on a miss.
_ENCODERS: Final[defaultdict[type, Callable[[Any, Any], None]]] = defaultdict(
    _unfiled,
    {
        str: _Encoder.encode_string,
        int: _Encoder.encode_int,
        bool: _Encoder.encode_bool,
        float: _Encoder.encode_float,
        bytes: _Encoder.encode_bytes,
        dict: _Encoder.encode_map,
        list: _Encoder.encode_array,
        set: _Encoder.encode_set,
        type(None): _encode_none,
        tuple: _encode_tuple,
        frozenset: _encode_frozenset,
        datetime: _encode_datetime,
        date: _Encoder.encode_date,
        Decimal: _encode_decimal,
        UUID: _Encoder.encode_uuid,
        bytearray: _encode_bytes_like,
        memoryview: _encode_bytes_like,
    },
)
# Bases whose subclasses are encoded as the base; datetime before date,
# since every datetime is a date.
_SUBCLASSABLE: Final = (
    str,
    int,
    float,
    bytes,
    dict,
    list,
    tuple,
    set,
    frozenset,
    datetime,
    date,
    Decimal,
    UUID,
    bytearray,
)
# Types cbor2 would write but the decoder refuses: fail at the sender.
_REFUSED: Final = (
    complex,
    Fraction,
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    MIMEText,
    re.Pattern,
    cbor2.CBORTag,
    cbor2.CBORSimpleValue,
    type(cbor2.undefined),
)
for _refused in _REFUSED:
    _ENCODERS[_refused] = _refuse
del _refused


# --------------------------------------------------------------------------
# Plain data skips the table
# --------------------------------------------------------------------------
# Every value that passes through the table costs a Python-level call into
# cbor2, about 25 ns, which is most of the difference to plain cbor2 for
# small messages. A value built only of the types below is encoded by an
# encoder without a table instead: cbor2's own dispatch writes exactly the
# same bytes for them as the table's entries (every entry for these types
# is the cbor2 method that its dispatch calls), and no other type can be
# inside, so nothing can slip through as a base type. Checking costs one
# ``type()`` per value, done level by level in C: ``gc.get_referents()``
# lists every item of a list and every value of a dict, and the keys of a
# dict unless all of them are exact ``str`` (CPython's dicts keep such keys
# in a separate table that the garbage collector skips). Nesting deeper than
# _PLAIN_MAX_DEPTH takes the table path, whose every level counts towards
# Python's recursion limit, so a cyclic or absurdly deep value still raises
# EncodeError instead of running cbor2 into its native stack limit.
_PLAIN_SCALARS: Final = frozenset({str, int, float, bool, type(None), bytes})
_PLAIN_CONTAINERS: Final = frozenset({dict, list})
_PLAIN_TYPES: Final = _PLAIN_SCALARS | _PLAIN_CONTAINERS
_PLAIN_MAX_DEPTH: Final = 64
_referents = gc.get_referents


def _referents_list_every_item() -> bool:
    """Whether ``gc.get_referents`` behaves as the plain-data check needs.

    Checked once, on this interpreter: every item of a list, every value of a
    dict, and every key of a dict that has any key other than an exact
    ``str``, including values the garbage collector does not track (atoms,
    and containers of atoms). If not, every value takes the table path.
    """

    class Name(str):
        pass

    atoms: list[Any] = [1, "s", None, 1.5, b"b", True, 2**70, Decimal(1), 1j, (1,), {"a": 1}, [2]]
    by_name = {f"k{i}": atom for i, atom in enumerate(atoms)}
    odd_keys: dict[Any, Any] = {"s": 0, Name("n"): 1, Decimal(2): 2, 3: Decimal(4), (5,): 6}
    odd_items = [item for pair in odd_keys.items() for item in pair]
    if _referents(1, "s", None, 1.5, b"b", True, 2**70):
        return False
    for container, expected in ((atoms, atoms), (by_name, atoms), (odd_keys, odd_items)):
        if sorted(map(id, _referents(container))) != sorted(map(id, expected)):
            return False
    return True


_PLAIN_PATH: Final = _referents_list_every_item()


def _is_plain(value: Any) -> bool:
    """Whether ``value`` holds only plain types, nested at most
    :data:`_PLAIN_MAX_DEPTH` containers deep (a top-level scalar counts as
    plain if its type is)."""
    kind = type(value)
    if kind is not dict and kind is not list:
        return kind in _PLAIN_SCALARS
    if not _PLAIN_PATH:
        return False
    level: list[Any] = [value]
    for _ in range(_PLAIN_MAX_DEPTH):
        # Scalars in ``level`` have no referents. A cyclic value runs out of
        # levels and takes the table path, which reports the cycle.
        children = _referents(*level)
        if len(children) <= 8:
            # A loop is cheaper than building a set for a handful of values.
            nested = False
            for child in children:
                kind = type(child)
                if kind not in _PLAIN_SCALARS:
                    if kind is not dict and kind is not list:
                        return False
                    nested = True
            if not nested:
                return True
        else:
            kinds = set(map(type, children))
            if not kinds <= _PLAIN_TYPES:
                return False
            if kinds.isdisjoint(_PLAIN_CONTAINERS):
                return True
        level = children
    return False


class _EncoderSlot(threading.local):
    """This thread's encoders: with the type table, and without for plain data."""

    encoder: Any = None
    plain_encoder: Any = None


_encoder_slot = _EncoderSlot()


def _new_encoder() -> Any:
    return cbor2.CBOREncoder(io.BytesIO(), encoders=_ENCODERS, default=_unencodable)


def _new_plain_encoder() -> Any:
    # Only ever given plain data; the default hook is a safety net.
    return cbor2.CBOREncoder(io.BytesIO(), default=_unencodable)


def encode(value: Any) -> bytes:
    """Encode one value into CBOR bytes.

    Raises :class:`~trio_dchan.errors.EncodeError` (in the calling task) for
    an unregistered class, an unsupported type or a cyclic value.
    """
    # Always through the table: for a message of a few values, checking
    # whether it is plain data costs more than skipping the table saves.
    slot = _encoder_slot
    encoder = slot.encoder
    if encoder is None:
        encoder = slot.encoder = _new_encoder()
    try:
        data: bytes = encoder.encode_to_bytes(value)
    except EncodeError:
        # A failed encode can leave the encoder's bookkeeping behind; start
        # the next call with a fresh one.
        slot.encoder = None
        raise
    except Exception as exc:
        slot.encoder = None
        raise _encode_error(exc) from exc
    return data


def _encode_plain(value: Any) -> bytes:
    """Encode a value for which :func:`_is_plain` holds, without the table."""
    slot = _encoder_slot
    encoder = slot.plain_encoder
    if encoder is None:
        encoder = slot.plain_encoder = _new_plain_encoder()
    try:
        data: bytes = encoder.encode_to_bytes(value)
    except EncodeError:
        slot.plain_encoder = None
        raise
    except Exception as exc:
        # Plain data fails only on a str that is not valid Unicode (a lone
        # surrogate), or if another thread changes the value meanwhile.
        slot.plain_encoder = None
        raise _encode_error(exc) from exc
    return data


def _encode_error(exc: Exception) -> EncodeError:
    if isinstance(exc, RecursionError):
        return EncodeError("value is nested too deeply to encode")
    if isinstance(exc, cbor2.CBOREncodeValueError) and "cyclic" in str(exc):
        return EncodeError("cannot encode a value that contains itself (a cycle)")
    return EncodeError(f"cannot encode value: {type(exc).__name__}: {_short(str(exc), 200)}")


def encode_batch(values: Iterable[Any]) -> bytes:
    """Encode many values into one buffer that :func:`decode_batch` reads.

    Equivalent to ``join_encoded([encode(v) for v in values])`` but encodes
    in one call. Raises :class:`~trio_dchan.errors.EncodeError` if any value
    cannot be encoded (nothing is returned then).
    """
    if type(values) is not list:
        values = list(values)
    if _is_plain(values):
        return _encode_plain(values)
    return encode(values)


def batch_header(count: int) -> bytes:
    """The bytes that open a batch of ``count`` encoded values.

    ``batch_header(len(items)) + b"".join(items)`` is :func:`join_encoded`
    of ``items``, for a caller that copies the items into a larger buffer
    of its own.
    """
    return _array_header(count)


def _array_header(count: int) -> bytes:
    if count < 24:
        return bytes((0x80 | count,))
    if count < 0x100:
        return bytes((0x98, count))
    if count < 0x10000:
        return b"\x99" + count.to_bytes(2, "big")
    if count < 0x100000000:
        return b"\x9a" + count.to_bytes(4, "big")
    return b"\x9b" + count.to_bytes(8, "big")


def join_encoded(items: Sequence[bytes]) -> bytes:
    """Frame values already encoded with :func:`encode` as one batch buffer.

    The result is exactly what :func:`encode_batch` of the original values
    returns; the items are copied once and never re-encoded. Each item must
    be the output of :func:`encode`: this function does not inspect them
    (a malformed item makes :func:`decode_batch` fail on the receiving side).
    """
    parts = [_array_header(len(items))]
    parts.extend(items)
    return b"".join(parts)


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------
_frozendict: type = getattr(cbor2, "frozendict", dict)


def _decode_object(record: Any) -> Any:
    # The hot path of the data plane for registered types: keep it to one
    # dictionary lookup, two comparisons and the constructor call.
    kind = type(record)
    if (kind is list or kind is tuple) and len(record) >= 2:
        name = record[0]
        entry = _by_name.get(name) if type(name) is str else None
        if entry is not None:
            if len(record) == entry.positional_size and record[1] == entry.layout:
                try:
                    return entry.cls(*record[2:])
                except Exception as exc:
                    raise DecodeError(
                        f"cannot rebuild registered type {name!r}: {_short(str(exc), 200)}"
                    ) from exc
            return entry.build(record)
    return _decode_object_slow(record)


def _decode_object_slow(record: Any) -> Any:
    if (type(record) is not list and type(record) is not tuple) or len(record) < 2:
        raise DecodeError("a registered-type record must be [type name, ...]")
    name = record[0]
    if type(name) is not str:
        raise DecodeError("a registered-type record must start with the type's name")
    raise DecodeError(
        f"unknown type name {_short(name)!r}: the receiving program must call "
        "trio_dchan.register() on the class the sender registered under that name"
    )


def _decode_tuple(value: Any) -> tuple[Any, ...]:
    if type(value) is not list and type(value) is not tuple:
        raise DecodeError("a tuple must be encoded as an array")
    return tuple(value)


def _decode_frozenset(value: Any) -> frozenset[Any]:
    if type(value) is not list and type(value) is not tuple:
        raise DecodeError("a frozenset must be encoded as an array")
    try:
        return frozenset(value)
    except TypeError as exc:
        raise DecodeError(f"frozenset element is not hashable: {exc}") from exc


def _decode_naive_datetime(value: Any) -> datetime:
    if type(value) is not str or len(value) > 64:
        raise DecodeError("a naive datetime must be a short ISO 8601 string")
    try:
        result = datetime.fromisoformat(value)
    except ValueError as exc:
        raise DecodeError(f"invalid naive datetime {value!r}") from exc
    if result.tzinfo is not None:
        raise DecodeError(f"naive datetime {value!r} carries a UTC offset")
    return result


def _decode_decimal(value: Any) -> Decimal:
    if type(value) is not str:
        raise DecodeError("a Decimal must be encoded as a string")
    try:
        return Decimal(value)
    except Exception as exc:
        raise DecodeError(f"invalid Decimal {_short(value)!r}") from exc


def _tag_decoder(finish: Callable[[Any], Any]) -> Callable[[bool], Any]:
    """Wrap ``finish(content)`` in cbor2's two-stage decoder protocol.

    cbor2 calls a decoder that carries the ``_cbor2_name`` attribute with the
    ``immutable`` flag and expects ``(container, callback)``; it then calls
    ``callback(content)``. That path costs a fraction of the plain
    ``decoder(content, immutable)`` one, whose attribute probe raises and
    swallows an AttributeError on every tag.
    """
    frame = (None, finish)

    def begin(_immutable: bool) -> tuple[None, Callable[[Any], Any]]:
        return frame

    setattr(begin, "_cbor2_name", None)  # noqa: B010 - attributes on a function
    setattr(begin, "_cbor2_immutable", False)  # noqa: B010
    return begin


class _TagTable(dict[int, Callable[[bool], Any]]):
    """Tag number -> decoder, consulted by cbor2 before it decodes a tag.

    cbor2 falls back to its built-in decoder for a tag when the lookup raises
    ``LookupError``; that is allowed only for the standard tags this module
    writes. Any other tag is refused before its content is read.
    """

    def __missing__(self, tag: int) -> Callable[[bool], Any]:
        if tag in _BUILTIN_TAGS:
            raise KeyError(tag)
        raise DecodeError(f"CBOR tag {tag} is not accepted")


_TAGS = _TagTable(
    {
        TAG_OBJECT: _tag_decoder(_decode_object),
        TAG_TUPLE: _tag_decoder(_decode_tuple),
        TAG_FROZENSET: _tag_decoder(_decode_frozenset),
        TAG_NAIVE_DATETIME: _tag_decoder(_decode_naive_datetime),
        TAG_DECIMAL: _tag_decoder(_decode_decimal),
    }
)


def _walk(
    data: bytes,
    limits: Limits,
    max_depth: int,
    *,
    batch: bool = False,
    cuts: list[int] | None = None,
) -> None:
    """Check a buffer's headers against ``limits`` without building values.

    Also rejects what cbor2 would reject anyway (truncation, indefinite
    lengths, reserved header values, trailing bytes), so that cbor2 only
    ever runs on buffers whose sizes are known to be within bounds. With
    ``batch``, ``limits.max_items`` applies to each element of the
    top-level array instead of to the whole buffer, and ``cuts`` (if given)
    receives the offset where each element begins.
    """
    end = len(data)
    max_items = limits.max_items
    max_container = limits.max_container_length
    max_string = limits.max_string_length
    pos = 0
    items = 0
    remaining = 1  # items still to read in the innermost open container
    stack: list[int] = []  # ``remaining`` of each enclosing container
    while True:
        if remaining == 0:
            if not stack:
                break
            remaining = stack.pop()
            continue
        remaining -= 1
        if pos >= end:
            raise DecodeError("truncated CBOR data")
        if batch and len(stack) == 1:
            items = 0  # a message of the batch begins
            if cuts is not None:
                cuts.append(pos)
        initial = data[pos]
        pos += 1
        items += 1
        if items > max_items:
            raise DecodeError(
                f"more than {max_items} CBOR items in one "
                + ("message" if batch and stack else "buffer")
            )
        major = initial >> 5
        info = initial & 0x1F
        if info < 24:
            argument = info
        elif info == 24:
            if pos >= end:
                raise DecodeError("truncated CBOR data")
            argument = data[pos]
            pos += 1
        elif info <= 27:
            width = 1 << (info - 24)
            if pos + width > end:
                raise DecodeError("truncated CBOR data")
            argument = int.from_bytes(data[pos : pos + width], "big")
            pos += width
        elif info == 31:
            raise DecodeError("indefinite-length CBOR items are not accepted")
        else:
            raise DecodeError(f"reserved CBOR header value {info}")
        if major == 2 or major == 3:
            if argument > max_string:
                raise DecodeError(f"string of {argument} bytes exceeds the limit of {max_string}")
            pos += argument
            if pos > end:
                raise DecodeError("truncated CBOR data")
        elif major == 4 or major == 5:
            if argument > max_container:
                raise DecodeError(
                    f"container of {argument} elements exceeds the limit of {max_container}"
                )
            if argument:
                if len(stack) >= max_depth:
                    raise DecodeError(f"nesting deeper than {max_depth}")
                stack.append(remaining)
                remaining = argument if major == 4 else 2 * argument
        elif major == 6:
            if len(stack) >= max_depth:
                raise DecodeError(f"nesting deeper than {max_depth}")
            stack.append(remaining)
            remaining = 1
    if pos != end:
        raise DecodeError(f"{end - pos} trailing bytes after the CBOR value")


def _find_decode_error(exc: BaseException) -> DecodeError | None:
    # cbor2 wraps exceptions raised by tag decoders in CBORDecodeError with
    # the original as __cause__; surface ours with their own message.
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 16:
        if isinstance(current, DecodeError):
            return current
        current = current.__cause__
        seen += 1
    return None


class _DecoderPool(threading.local):
    """Idle cbor2 decoders of this thread, with their streams, by nesting limit.

    Building a ``CBORDecoder`` costs more than decoding a small message, and
    so does pointing one at a new stream (its ``fp`` setter probes the
    stream with three calls). So each thread keeps one idle decoder per
    ``max_depth`` together with its ``BytesIO``, and re-initializes that
    stream in place with the next buffer (no copy). A decoder is taken out
    while in use (a decode nested inside a registered type's constructor
    builds its own) and is dropped, not returned, after any failure.
    """

    def __init__(self) -> None:
        self.idle: dict[int, tuple[Any, io.BytesIO]] = {}


_decoder_pool = _DecoderPool()
_reset_stream = io.BytesIO.__init__
# One read of the whole buffer; BytesIO.read never allocates past its end.
_READ_SIZE: Final = 1 << 30
# An idle decoder keeps its last buffer alive; pool only for small ones.
_POOL_MAX_SIZE: Final = 256 * 1024


def split_batch(data: bytes | bytearray | memoryview) -> list[bytes]:
    """Cut a batch buffer into the encodings of its messages, decoding none.

    For a batch that :func:`decode_batch` refused: decoding the parts one by
    one with :func:`decode` tells the bad messages from the good ones. Only
    the framing is checked (an array of complete CBOR items, no indefinite
    lengths, nothing after it); a buffer that fails it raises
    :class:`~trio_dchan.errors.DecodeError`. Runs in pure Python, at a
    fraction of a microsecond per CBOR item.
    """
    if type(data) is not bytes:
        data = bytes(memoryview(data))
    if not data or data[0] >> 5 != 4:
        raise DecodeError("a batch must be a CBOR array of messages")
    cuts: list[int] = []
    _walk(data, _NO_LIMITS, len(data), batch=True, cuts=cuts)
    cuts.append(len(data))
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


def _decode(data: Any, limits: Limits | None, extra_depth: int) -> Any:
    if limits is None:
        limits = DEFAULT_LIMITS
    if type(data) is not bytes:
        data = bytes(memoryview(data))
    size = len(data)
    if size > limits.max_size:
        raise DecodeError(f"buffer of {size} bytes exceeds the limit of {limits.max_size}")
    max_depth = limits.max_depth + extra_depth
    if size > limits._walk_above:
        _walk(data, limits, max_depth, batch=extra_depth > 0)
    idle = _decoder_pool.idle
    try:
        reader = idle.pop(max_depth, None)
        if reader is None:
            stream = io.BytesIO(data)
            decoder = cbor2.CBORDecoder(
                stream,
                read_size=_READ_SIZE,
                semantic_decoders=_TAGS,
                max_depth=max_depth,
                allow_indefinite=False,
                allow_duplicate_keys=False,
            )
            reader = (decoder, stream)
        else:
            decoder, stream = reader
            _reset_stream(stream, data)
        value = decoder.decode()
    except DecodeError:
        raise
    except Exception as exc:
        ours = _find_decode_error(exc)
        if ours is not None:
            raise DecodeError(str(ours)) from exc
        raise DecodeError(
            f"malformed CBOR data: {type(exc).__name__}: {_short(str(exc), 200)}"
        ) from exc
    if size <= _POOL_MAX_SIZE:
        idle[max_depth] = reader
    consumed = stream.tell()
    if consumed != size:
        raise DecodeError(f"{size - consumed} trailing bytes after the CBOR value")
    return value


def decode(data: bytes | bytearray | memoryview, *, limits: Limits | None = None) -> Any:
    """Decode one value produced by :func:`encode`.

    ``data`` is untrusted; anything wrong with it raises
    :class:`~trio_dchan.errors.DecodeError`. ``limits`` defaults to
    :data:`DEFAULT_LIMITS`.
    """
    return _decode(data, limits, 0)


def decode_batch(
    data: bytes | bytearray | memoryview, *, limits: Limits | None = None
) -> list[Any]:
    """Decode a buffer from :func:`encode_batch` or :func:`join_encoded`.

    Each value gets the full ``limits.max_depth`` and ``limits.max_items``;
    the other limits apply to the buffer as a whole. A buffer that is not a
    batch, or any invalid message in it, raises
    :class:`~trio_dchan.errors.DecodeError` for the whole buffer
    (:func:`split_batch` then finds the messages that decode).
    """
    value = _decode(data, limits, 1)
    if type(value) is not list:
        raise DecodeError("a batch must be a CBOR array of messages")
    return value
