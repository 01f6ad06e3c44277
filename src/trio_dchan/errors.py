"""The root of the library's error family.

Every error trio_dchan raises on purpose derives from :class:`DchanError`, so
``except trio_dchan.DchanError`` catches all of them and nothing else. Each
subsystem defines its own subclasses next to the code that raises them.
"""


class DchanError(Exception):
    """Base class of every error raised by trio_dchan."""
