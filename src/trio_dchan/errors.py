"""The root of the library's error family.

Every error trio_dchan raises on purpose derives from :class:`DchanError`, so
``except trio_dchan.DchanError`` catches all of them and nothing else. Each
subsystem defines its own subclasses next to the code that raises them; the
codec's errors live here because every layer sees them.
"""


class DchanError(Exception):
    """Base class of every error raised by trio_dchan."""


class CodecError(DchanError):
    """A value could not be turned into bytes, or bytes into a value."""


class EncodeError(CodecError):
    """The value cannot be sent.

    Raised in the task that called ``encode()`` (and therefore at ``send()``),
    never later in a background task: the caller is the one who can fix it,
    usually by calling :func:`trio_dchan.register` for the type named in the
    message, or by removing a cycle from the value.
    """


class DecodeError(CodecError):
    """Bytes received from a peer are not a valid message.

    Malformed, truncated, oversized or hostile input all end here; decoding
    never lets any other exception escape. The peer that sent the bytes is at
    fault (or the two programs registered different types), not the caller.
    """


class RegistrationError(CodecError, ValueError):
    """``register()`` was called with a class or a name it cannot accept."""
