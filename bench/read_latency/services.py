"""The API and the consumer under measurement, restarted with other settings when a state
asks for them (``STATE:before``)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

from bench.stack import server

# ``STATE:before`` runs the state as the service was before its pacing: these settings
# (the rebuild: started by the API at once, in its own process).
BEFORE = {
    "scan": {"SEGMENTS_SCAN_MAX_USERS_PER_S": "0"},
    "rebuild": {"SEGMENTS_REBUILD_DELAY_S": "0", "SEGMENTS_REBUILD_MAX_USERS_PER_S": "0"},
    "ingest": {"SEGMENTS_INGEST_MAX_MEMBERS_PER_S": "0"},
    # The report's queries with the server's parallel workers, as before the setting.
    "report": {"SEGMENTS_REPORT_PARALLEL_WORKERS": "-1"},
}


class Services:
    """The API (``segments serve``) and the consumer (``segments consume``), restarted
    with other settings when a state asks for them."""

    def __init__(self, env: dict[str, str], port: int, log_dir: Path) -> None:
        self.env, self.port, self.log_dir = env, port, log_dir
        self.extra: dict[str, str] | None = None
        self._api: contextlib.ExitStack | None = None
        self.api_pid = self.consumer_pid = 0
        self._consumer: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, extra: dict[str, str]) -> None:
        self.stop()
        self.starts += 1
        env = {**self.env, **extra}
        self._api = contextlib.ExitStack()
        args = ["-m", "service.cli", "serve", "--port", str(self.port), "--workers", "1"]
        log = str(self.log_dir / f"api-{self.starts}.log")
        self.api_pid = self._api.enter_context(server(args, env, self.port, log)).pid
        consumer_log = self._api.enter_context(
            open(self.log_dir / f"consumer-{self.starts}.log", "wb")  # noqa: SIM115
        )
        # Our own interpreter and module, fixed arguments, no shell.
        self._consumer = subprocess.Popen(  # nosec B603
            [sys.executable, "-m", "service.cli", "consume"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=consumer_log,
        )
        self.consumer_pid = self._consumer.pid
        self.extra = extra

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.terminate()
            self._consumer.wait(15)
            self._consumer = None
        if self._api is not None:
            self._api.close()
            self._api = None

    def tail(self) -> None:
        for name in (f"api-{self.starts}.log", f"consumer-{self.starts}.log"):
            path = self.log_dir / name
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            print(f"--- last lines of {name}:", *lines[-30:], sep="\n", file=sys.stderr)
