"""Logs as JSON lines (or text on a terminal), for every process."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields given with ``extra={...}`` are kept."""

    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str, json_lines: bool | None = None) -> None:
    """JSON lines, or human-readable text when writing to a terminal (as under make run)."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiokafka logs every rebalance step at INFO.
    with contextlib.suppress(Exception):
        logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
