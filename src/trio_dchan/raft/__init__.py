"""Raft consensus: a sans-IO core, its storage and a Trio driver."""
