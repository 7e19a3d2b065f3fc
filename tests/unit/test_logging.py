"""Log lines: JSON for machines, text in a terminal (as under `make run`)."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from service.observability import setup_logging


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _log_to(stream: io.StringIO, monkeypatch: pytest.MonkeyPatch, mode: bool | None) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging("INFO", mode)
    logging.getLogger("segments.test").info("hello %s", "there", extra={"request_id": "r-1"})
    return stream.getvalue()


@pytest.mark.usefixtures("root_logger")
def test_json_lines_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    line = json.loads(_log_to(io.StringIO(), monkeypatch, None))
    assert line["msg"] == "hello there"
    assert line["level"] == "info"
    assert line["logger"] == "segments.test"
    assert line["request_id"] == "r-1"
    assert line["ts"].endswith("Z")


@pytest.mark.usefixtures("root_logger")
def test_text_in_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _log_to(_Terminal(), monkeypatch, None)
    assert "INFO segments.test: hello there" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.usefixtures("root_logger")
def test_setting_overrides_the_terminal_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    assert json.loads(_log_to(_Terminal(), monkeypatch, True))["msg"] == "hello there"
