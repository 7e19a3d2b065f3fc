"""SEGMENTS_ACCESS_LOG and SEGMENTS_ACCESS_LOG_SLOW_MS: parsed, and refused at start-up
(exit 2) when malformed.  What each mode logs: tests/e2e/test_operability.py."""

from __future__ import annotations

import pytest

from service import cli
from service.http.middleware import AccessLog, parse_access_log
from service.settings import Settings, load_settings


def test_the_default_logs_errors_and_slow_requests_only() -> None:
    defaults = Settings()
    assert (defaults.access_log, defaults.access_log_slow_ms) == ("errors", 500.0)
    assert parse_access_log(defaults.access_log, defaults.access_log_slow_ms) == AccessLog(0, 0.5)


@pytest.mark.parametrize(
    ("mode", "slow_ms", "parsed"),
    [
        ("all", 500, AccessLog(1.0, 0.5)),
        ("errors", 250, AccessLog(0.0, 0.25)),
        ("sample:0.01", 500, AccessLog(0.01, 0.5)),
        ("sample:1", 1000, AccessLog(1.0, 1.0)),
    ],
)
def test_modes(mode: str, slow_ms: float, parsed: AccessLog) -> None:
    assert parse_access_log(mode, slow_ms) == parsed


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SEGMENTS_ACCESS_LOG": "some"}, "SEGMENTS_ACCESS_LOG must be all, errors or sample:R"),
        ({"SEGMENTS_ACCESS_LOG": "sample:0"}, "SEGMENTS_ACCESS_LOG must be"),
        ({"SEGMENTS_ACCESS_LOG": "sample:1.5"}, "SEGMENTS_ACCESS_LOG must be"),
        ({"SEGMENTS_ACCESS_LOG": "sample:nan"}, "SEGMENTS_ACCESS_LOG must be"),
        ({"SEGMENTS_ACCESS_LOG": "sample:"}, "SEGMENTS_ACCESS_LOG must be"),
        ({"SEGMENTS_ACCESS_LOG": "ALL"}, "SEGMENTS_ACCESS_LOG must be"),
        ({"SEGMENTS_ACCESS_LOG_SLOW_MS": "0"}, "SEGMENTS_ACCESS_LOG_SLOW_MS must be greater"),
        ({"SEGMENTS_ACCESS_LOG_SLOW_MS": "-5"}, "SEGMENTS_ACCESS_LOG_SLOW_MS must be greater"),
    ],
)
def test_malformed_settings_are_configuration_errors(env: dict[str, str], message: str) -> None:
    errors = cli.config_errors(load_settings(env), "serve")
    assert any(message in error for error in errors), errors


def test_valid_settings_pass_the_check() -> None:
    env = {"SEGMENTS_ACCESS_LOG": "sample:0.05", "SEGMENTS_ACCESS_LOG_SLOW_MS": "250"}
    errors = cli.config_errors(load_settings(env), "serve")
    assert not [e for e in errors if "ACCESS_LOG" in e], errors
