"""Percentage segments: share, stability across processes, monotonic raising."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.domain.rules import bucket

USERS = range(1, 100_001)
SEGMENT = 42


def chosen(bp: int, segment: int = SEGMENT) -> set[int]:
    return {u for u in USERS if bucket(segment, u) < bp}


@pytest.mark.parametrize("percent", [1, 10, 50, 99.99])
def test_share_within_one_point(percent: float) -> None:
    share = len(chosen(round(percent * 100))) / len(USERS) * 100
    assert abs(share - percent) <= 1.0


def test_zero_includes_nobody_and_hundred_everybody() -> None:
    assert chosen(0) == set()
    assert chosen(10_000) == set(USERS)


def test_raising_the_share_keeps_everyone_already_in() -> None:
    assert chosen(1000) <= chosen(2500)


def test_segments_pick_independent_users() -> None:
    a, b = chosen(5000, 1), chosen(5000, 2)
    overlap = len(a & b) / len(USERS)
    assert 0.24 < overlap < 0.26


def test_same_users_in_another_process() -> None:
    code = (
        "from service.domain.rules import bucket;"
        f"print(sum(u for u in range(1, 100001) if bucket({SEGMENT}, u) < 1000))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]),
    )
    assert int(out.stdout) == sum(chosen(1000))
