"""Warnings that would repeat once per request, logged as state changes and rates.

While Redis is down every write fails its write-through: one line per write buried the
logs (6,133 lines in 14 s in a probe).  The first occurrence is logged at once, then at
most one line per interval, saying how many were left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class ThrottledWarning:
    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        *,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._message = message
        self._interval = interval_s
        self._clock = clock
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, detail: object = "") -> None:
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            self._log.warning(
                "%s%s (and %d more in the last %.0f s)",
                self._message,
                f": {detail}" if detail else "",
                self._suppressed,
                self._interval,
            )
        else:
            self._log.warning("%s%s", self._message, f": {detail}" if detail else "")
        self._suppressed = 0
        self._next = now + self._interval

    def recovered(self, message: str) -> None:
        """The condition ended: say so once (only if it was ever reported)."""
        if self._next:
            self._log.info(message)
            self._next = 0.0
            self._suppressed = 0
