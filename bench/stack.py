"""A throw-away embedded stack for benchmarks (temp dir, free ports)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from persistence.migrate import upgrade
from service.devstack import EmbeddedStack


@contextlib.contextmanager
def bench_stack() -> Iterator[EmbeddedStack]:
    with tempfile.TemporaryDirectory(prefix="segments-bench-") as tmp:
        stack = EmbeddedStack(Path(tmp), fast=True)
        stack.start()
        try:
            upgrade(stack.postgres.url)
            yield stack
        finally:
            stack.stop()
