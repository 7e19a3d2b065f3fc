"""`segments migrate` and `segments rebuild`: one-off jobs on the stores."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

from service.settings import Settings

log = logging.getLogger("segments")


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from persistence.migrate import upgrade

    upgrade(settings.database_url)
    log.info("migrations applied")
    return 0


def cmd_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    from service.bootstrap import build

    async def run() -> bool:
        container = await build(settings)
        try:
            total = await container.figures.count_users()
            container.segments.rebuild_progress = _RebuildProgress(total)
            await container.cache.invalidate()
            return await container.segments.rebuild_cache()
        finally:
            await container.close()

    return 0 if asyncio.run(run()) else 1


class _RebuildProgress:
    """`segments rebuild`'s progress: users written of the total, share and ETA, a log
    line a second at most (a bar would break JSON log lines)."""

    def __init__(self, total: int, every_s: float = 1.0) -> None:
        self.total = total
        self.every_s = every_s
        self.started = time.monotonic()
        self.next_at = self.started

    async def __call__(self, users: int) -> None:
        now = time.monotonic()
        if users and now < self.next_at and users < self.total:
            return
        self.next_at = now + self.every_s
        log.info("%s", self.line(users, now - self.started))

    def line(self, users: int, elapsed: float) -> str:
        if not users:
            return f"rebuild: {self.total:,} users to write"
        rate = users / elapsed if elapsed > 0 else 0.0
        share = min(100.0, 100.0 * users / self.total) if self.total else 100.0
        left = max(0, self.total - users)
        eta = f"{left / rate:.0f} s" if rate else "?"
        return (
            f"rebuild: {users:,} of {self.total:,} users ({share:.0f} %), {rate:,.0f}/s, ETA {eta}"
        )
