"""Repeated warnings are logged once per interval with a count, and recovery once."""

from __future__ import annotations

import logging

import pytest

from service.domain.log_throttle import ThrottledWarning


def test_a_burst_gives_one_line_per_interval_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    warn = ThrottledWarning(
        logging.getLogger("t"), "cache write failed", interval_s=10, clock=lambda: now[0]
    )
    with caplog.at_level(logging.INFO, "t"):
        for _ in range(1000):
            warn()
        now[0] = 10.5
        warn("timeout")
        warn.recovered("cache writes go through again")
        warn.recovered("said once only")
    assert [r.getMessage() for r in caplog.records] == [
        "cache write failed",
        "cache write failed: timeout (and 999 more in the last 10 s)",
        "cache writes go through again",
    ]
