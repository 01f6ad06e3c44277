"""DataPlaneSettings refuses values the data plane cannot work with, naming the field."""

from __future__ import annotations

import math
from typing import Any

import pytest

from trio_dchan.dataplane import DataPlaneSettings


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"max_frame_bytes": 8191}, "max_frame_bytes"),
        ({"batch_linger": -0.001}, "batch_linger"),
        ({"batch_linger": math.nan}, "batch_linger"),
        ({"batch_linger": math.inf, "batch_linger_max": math.inf}, "batch_linger"),
        ({"batch_linger": 0.01, "batch_linger_max": 0.005}, "batch_linger_max"),
        ({"batch_linger_max": math.inf}, "batch_linger_max"),
        ({"batch_target": 0}, "batch_target"),
        ({"batch_target_bytes": 0}, "batch_target_bytes"),
        ({"max_unacked_frames": 0}, "max_unacked_frames"),
        ({"credit_window": 0}, "credit_window"),
        ({"credit_idle_return": 0}, "credit_idle_return"),
        ({"undeliverable_timeout": -1}, "undeliverable_timeout"),
        ({"handoff_timeout": 0}, "handoff_timeout"),
        ({"unregister_timeout": 0}, "unregister_timeout"),
        ({"retry_backoff_min": 0}, "retry_backoff_min"),
        ({"retry_backoff_max": 0}, "retry_backoff_max"),
    ],
)
def test_invalid_settings_are_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} "):
        DataPlaneSettings(**changes)


def test_the_defaults_and_the_edges_are_accepted() -> None:
    DataPlaneSettings()
    # No lingering at all, and one fixed wait (the batch leaves after it
    # whether or not messages keep coming).
    DataPlaneSettings(batch_linger=0, batch_linger_max=0)
    DataPlaneSettings(batch_linger=0.002, batch_linger_max=0.002)
    DataPlaneSettings(max_frame_bytes=8192, batch_target=1, batch_target_bytes=1)
