"""`segments reconcile` as a process: its metrics port, gauges that keep time, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from devstack import free_port
from service.bootstrap import Container
from service.domain.service import AddRequest
from tests.conftest import scrape


def _gauges(port: int) -> dict[str, float]:
    """The process's metrics without labels."""
    return {
        name: value
        for name, samples in scrape(f"http://127.0.0.1:{port}/metrics").items()
        for labels, value in samples
        if not labels
    }


def test_reconciler_reports_sync_age_that_grows_between_scans(
    clean: Container, tmp_path: Path
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENTS_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env |= {
        "SEGMENTS_DATABASE_URL": clean.settings.database_url,
        "SEGMENTS_REDIS_URL": clean.settings.redis_url,
        "SEGMENTS_METRICS_PORT": str(port),
        "SEGMENTS_SWEEP_INTERVAL_S": "0.2",  # a round (and the gauges) 5 times a second
        "SEGMENTS_SCAN_INTERVAL_S": "3600",  # one scan, at start
        "SEGMENTS_LOG_JSON": "false",
    }
    log = tmp_path / "reconcile.log"
    with log.open("wb") as err:
        # Our own interpreter and module, fixed arguments.
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "reconcile"], env=env, stderr=err
        )
    try:
        deadline = time.monotonic() + 30
        gauges: dict[str, float] = {}
        # The reconciler rebuilds the copy first if it finds it incomplete.
        while not (
            "segments_cache_synchronized_age_seconds" in gauges
            and gauges.get("segments_cache_complete") == 1
        ):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{gauges}\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
            try:
                gauges = _gauges(port)
            except OSError:
                continue
        assert gauges["segments_cache_divergence_found_total"] == 0  # each scan adds what it found
        first = gauges["segments_cache_synchronized_age_seconds"]
        time.sleep(1.5)
        later = _gauges(port)["segments_cache_synchronized_age_seconds"]
        # No scan since: the age grows with the clock (it sat at 0 before).
        assert 1.0 <= later - first <= 3.0, (first, later)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_rebuild_command_reports_progress_with_total_and_eta(clean: Container) -> None:
    for uid in range(1, 6):
        await clean.segments.create_segment(f"R{uid}")
        await clean.segments.update_user(uid, [AddRequest(f"R{uid}")], [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENTS_")}
    env |= {
        "SEGMENTS_DATABASE_URL": clean.settings.database_url,
        "SEGMENTS_REDIS_URL": clean.settings.redis_url,
        "SEGMENTS_LOG_JSON": "false",
    }
    # Our own interpreter and module, fixed arguments.
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service.cli", "rebuild"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rebuild: 5 users to write" in done.stderr
    assert "rebuild: 5 of 5 users (100 %)" in done.stderr and "ETA 0 s" in done.stderr
    assert await clean.segments.cache_complete()
    assert await clean.segments.user_segments(3) == ["R3"]
