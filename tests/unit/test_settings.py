import pytest

from service.settings import load_settings


def test_settings_from_environment() -> None:
    s = load_settings(
        {"SEGMENTS_HTTP_PORT": "9000", "SEGMENTS_REDIS_TIMEOUT_S": "0.5", "PATH": "x"}
    )
    assert s.http_port == 9000
    assert s.redis_timeout_s == 0.5


def test_unknown_or_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="SEGMENTS_HTTP_PROT"):
        load_settings({"SEGMENTS_HTTP_PROT": "1"})
    with pytest.raises(ValueError):
        load_settings({"SEGMENTS_HTTP_PORT": "eighty"})
