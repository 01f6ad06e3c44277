"""trio_dchan: distributed channels for Trio."""

from .codec import register
from .errors import CodecError, DchanError, DecodeError, EncodeError, RegistrationError

__version__ = "0.1.0.dev0"

__all__ = [
    "CodecError",
    "DchanError",
    "DecodeError",
    "EncodeError",
    "RegistrationError",
    "__version__",
    "register",
]
