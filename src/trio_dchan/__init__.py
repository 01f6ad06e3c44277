"""trio_dchan: distributed channels for Trio."""

__version__ = "0.1.0.dev0"
