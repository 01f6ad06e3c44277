"""``python -m trio_dchan demo``: the README's first command."""

from __future__ import annotations

import logging

import pytest
import trio

from trio_dchan.__main__ import _run_demo, main


async def test_demo_delivers_everything_once_and_shuts_down_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_dchan")
    with trio.fail_after(60):
        summary = await _run_demo(0.5, 2, 3)
    assert summary["ok"] is True
    assert summary["duplicates"] == 0
    assert summary["sent"] == summary["received"]
    assert isinstance(summary["sent"], int)
    assert summary["sent"] > 0
    # Every node stays up until every receiver's unregistration committed:
    # nothing timed out and nothing was dropped on the way out.
    assert [r.getMessage() for r in caplog.records] == []


def test_demo_refuses_impossible_arguments() -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--nodes", "2", "--producers", "3"])
