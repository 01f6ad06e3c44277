"""Errors and apply results crossing a forwarded call.

An error raised by the remote :meth:`RaftHandler.handle_forward` travels as
its class name, its message and its plain attributes (strings, numbers,
booleans, ``None``), and is rebuilt here as the same class with the same
attributes, so a caller can rely on ``NotLeader.leader`` and friends. Only
classes of the library's Raft layer are rebuilt; anything else becomes a
:class:`RemoteCallError`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import cbor2

from trio_dchan import codec
from trio_dchan._proto.dchan import v1 as pb
from trio_dchan.errors import DchanError, DecodeError
from trio_dchan.raft.transport import Unavailable

from .errors import PeerProtocolError, RemoteCallError

# Modules whose DchanError subclasses may be rebuilt from a peer's answer.
_ERROR_MODULES = (
    "trio_dchan.raft.errors",
    "trio_dchan.raft.node",
    "trio_dchan.raft.transport",
    "trio_dchan.transport.errors",
)
_SCALARS = (str, int, float, bool, type(None))


def error_to_pb(exc: BaseException) -> pb.RemoteError:
    attrs = {
        name: value
        for name, value in vars(exc).items()
        if not name.startswith("_") and isinstance(value, _SCALARS)
    }
    return pb.RemoteError(kind=type(exc).__name__, message=str(exc), attributes=cbor2.dumps(attrs))


def _find_error_class(kind: str) -> type[DchanError] | None:
    if not kind.isidentifier():
        return None
    for module_name in _ERROR_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover - every module ships with the library
            continue
        cls = getattr(module, kind, None)
        if isinstance(cls, type) and issubclass(cls, DchanError):
            return cls
    return None


def _fields(cls: type[DchanError]) -> dict[str, object] | None:
    """The attributes an instance of ``cls`` has: its constructor's parameters.

    Maps each name to its default (``inspect.Parameter.empty`` if it has
    none). A constructor that names none (``*args, **kwargs``) gives an empty
    mapping: the error carries its message alone. None if ``cls`` has no
    readable signature.
    """
    if cls in _FIELDS:
        return _FIELDS[cls]
    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):  # pragma: no cover - every class has a signature
        fields = None
    else:
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        fields = {p.name: p.default for p in parameters if p.kind in named}
    _FIELDS[cls] = fields
    return fields


_FIELDS: dict[type[DchanError], dict[str, object] | None] = {}


def error_from_pb(peer: str, err: pb.RemoteError) -> DchanError:
    """Rebuild the peer's error; never raises.

    Only the constructor's parameters are taken from the peer, and every one
    without a default must be there, so a rebuilt error has exactly the
    attributes a local one has; otherwise it becomes a
    :class:`RemoteCallError`.
    """
    try:
        attrs = cbor2.loads(err.attributes) if err.attributes else {}
    except Exception:
        attrs = None
    if not isinstance(attrs, dict) or not all(
        isinstance(k, str) and isinstance(v, _SCALARS) for k, v in attrs.items()
    ):
        return RemoteCallError(peer, err.kind, err.message)
    cls = _find_error_class(err.kind)
    if cls is None:
        return RemoteCallError(peer, err.kind, err.message)
    if cls is Unavailable:
        # The peer itself could not reach someone: from here the outcome is
        # unknown, the request did reach a node.
        return Unavailable(peer, err.message, maybe_delivered=True)
    fields = _fields(cls)
    if fields is None:
        return RemoteCallError(peer, err.kind, err.message)
    exc = cls.__new__(cls)
    Exception.__init__(exc, err.message)
    for name, default in fields.items():
        value = attrs.get(name, default)
        if value is inspect.Parameter.empty:
            return RemoteCallError(peer, err.kind, err.message)
        try:
            setattr(exc, name, value)
        except Exception:
            return RemoteCallError(peer, err.kind, err.message)
    return exc


def encode_result(value: object) -> bytes:
    """Encode an apply result for the reply, with the library codec."""
    return codec.encode(value)


def decode_result(peer: str, data: bytes) -> Any:
    try:
        return codec.decode(data)
    except DecodeError as exc:
        raise PeerProtocolError(f"undecodable apply result from {peer}: {exc}") from None
