"""The long-running processes besides the API: `segments reconcile`, `segments consume`
and `segments cp-emulator`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from service.cli.processes import run_until_signalled, serve_metrics
from service.settings import Settings


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    from service import reconciler
    from service.bootstrap import build, counter_bridge
    from service.observability import RECONCILER

    serve_metrics(settings, RECONCILER)

    async def main(stop: asyncio.Event) -> None:
        container = await build(settings)
        # The reconciler retries promo syncs: its CP calls and syncs count too.
        bridge = asyncio.create_task(counter_bridge(container).run())
        try:
            await reconciler.run(container, stop)
        finally:
            bridge.cancel()  # it syncs once more on the way out
            with contextlib.suppress(asyncio.CancelledError):
                await bridge
            await container.close()

    run_until_signalled(main)
    return 0


def cmd_consume(settings: Settings, args: argparse.Namespace) -> int:
    from service.bootstrap import build, counter_bridge
    from service.domain.rules import MAX_AUDIENCE_IDS
    from service.ingest.consumer import AudienceConsumer
    from service.observability import CONSUMER

    serve_metrics(settings, CONSUMER)

    async def main(stop: asyncio.Event) -> None:
        container = await build(settings)
        bridge = asyncio.create_task(counter_bridge(container).run())  # the pool's gauges
        try:
            await AudienceConsumer(settings, container.audiences, MAX_AUDIENCE_IDS).run(stop)
        finally:
            bridge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bridge
            await container.close()

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
