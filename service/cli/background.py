"""The long-running processes besides the API: `segments reconcile`, `segments consume`
and `segments cp-emulator`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from service.cli.processes import run_until_signalled, serve_metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.bootstrap import Container


@contextlib.asynccontextmanager
async def _counted_container(settings: Settings) -> AsyncIterator[Container]:
    """The process's container, its counters and pool gauges synced to /metrics while
    it runs (and once more on the way out), closed at the end."""
    from service.bootstrap import build, counter_bridge

    container = await build(settings)
    bridge = asyncio.create_task(counter_bridge(container).run())
    try:
        yield container
    finally:
        bridge.cancel()  # it syncs once more on the way out
        with contextlib.suppress(asyncio.CancelledError):
            await bridge
        await container.close()


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    from service import reconciler
    from service.observability import RECONCILER

    serve_metrics(settings, RECONCILER)

    async def main(stop: asyncio.Event) -> None:
        # The reconciler retries promo syncs: its CP calls and syncs count too.
        async with _counted_container(settings) as container:
            await reconciler.run(container, stop)

    run_until_signalled(main)
    return 0


def cmd_consume(settings: Settings, args: argparse.Namespace) -> int:
    from service.domain.rules import MAX_AUDIENCE_IDS
    from service.ingest.consumer import AudienceConsumer
    from service.observability import CONSUMER

    serve_metrics(settings, CONSUMER)

    async def main(stop: asyncio.Event) -> None:
        async with _counted_container(settings) as container:  # the pool's gauges
            await AudienceConsumer(settings, container.audiences, MAX_AUDIENCE_IDS).run(stop)

    run_until_signalled(main)
    return 0


def cmd_cp_emulator(settings: Settings, args: argparse.Namespace) -> int:
    from service.cp.emulator import run_emulator

    async def main(stop: asyncio.Event) -> None:
        task = asyncio.create_task(run_emulator(args.host, args.port))
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    run_until_signalled(main)
    return 0
