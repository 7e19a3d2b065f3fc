"""The ``segments`` command: one entry point for every process of the service.

Exit codes: 0 done, 1 failed at run time, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypedDict

from service.settings import ENV_PREFIX, Settings, load_settings

log = logging.getLogger("segments")


def _setup_logging(settings: Settings) -> None:
    from service.observability import setup_logging

    mode = {"true": True, "false": False}.get(settings.log_json.lower())
    setup_logging(settings.log_level, mode)


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from service.bootstrap import make_app
    from service.http.serving import serve

    host = args.host or settings.http_host
    port = args.port or settings.http_port
    workers = args.workers or settings.http_workers
    if workers > 1:
        return _serve_workers(workers, host, port)
    if settings.http_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:  # optional: the service runs on the stock loop too
            pass
    asyncio.run(
        serve(
            make_app(settings),
            host=host,
            port=port,
            keepalive_timeout=settings.http_keepalive_timeout_s,
            # Several worker processes share the port; the kernel spreads connections.
            reuse_port=args.reuse_port,
        )
    )
    return 0


def _serve_workers(workers: int, host: str, port: int) -> int:
    """A pre-fork supervisor: N `serve` processes on one port (SO_REUSEPORT).

    Each worker is a whole, stateless API process; a worker that dies is replaced.
    """
    command = [
        sys.executable, "-m", "service.cli", "serve",
        "--host", host, "--port", str(port), "--workers", "1", "--reuse-port",
    ]  # fmt: skip
    # Workers add up their metrics through one directory (prometheus-client's
    # multiprocess mode); /metrics on any worker reports all of them.
    env = dict(os.environ)
    if "PROMETHEUS_MULTIPROC_DIR" not in env:
        env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="segments-metrics-")

    def spawn() -> subprocess.Popen[bytes]:
        # Our own interpreter and module with a fixed argv, no shell.
        return subprocess.Popen(command, env=env)  # nosec B603

    children = [spawn() for _ in range(workers)]
    stop = _StopFlag()
    try:
        while not stop.requested:
            for i, child in enumerate(children):
                code = child.poll()
                if code == 2:
                    # Bad usage or configuration: another worker would fail the same way.
                    log.error("worker %d exited with 2 (configuration); stopping", child.pid)
                    return 2
                if code is not None:
                    log.warning("worker %d exited with %s; starting another", child.pid, code)
                    children[i] = spawn()
            time.sleep(0.5)
    finally:
        _stop_children(children)
    return 0


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from persistence.migrate import upgrade

    upgrade(settings.database_url)
    log.info("migrations applied")
    return 0


def cmd_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    from service.bootstrap import build
    from service.pg_metrics import count_users

    async def run() -> bool:
        container = await build(settings)
        try:
            total = await count_users(container.store)
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


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    from service import reconciler
    from service.bootstrap import build, counter_bridge
    from service.observability import RECONCILER

    _serve_metrics(settings, RECONCILER)

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

    _run_until_signalled(main)
    return 0


def _serve_metrics(settings: Settings, process: str) -> None:
    """A Prometheus endpoint for the processes that do not serve HTTP themselves, with
    the families of their kind (``service.observability.FAMILIES``)."""
    if settings.metrics_port:
        from prometheus_client import start_http_server

        from service.observability import registry

        start_http_server(
            settings.metrics_port, addr=settings.http_host, registry=registry(process)
        )


def _stop_children(children: list[subprocess.Popen[bytes]], timeout_s: float = 15) -> None:
    """SIGTERM every child (they finish in-flight work), then SIGKILL the stragglers."""
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


class _StopFlag:
    """Raised by SIGINT or SIGTERM: a supervisor then stops its children in order."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._request)
        signal.signal(signal.SIGTERM, self._request)

    def _request(self, *_: object) -> None:
        self.requested = True


def _run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)``; SIGINT/SIGTERM set ``stop`` so it can finish cleanly."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(run())


def cmd_consume(settings: Settings, args: argparse.Namespace) -> int:
    from service.bootstrap import build, counter_bridge
    from service.http.schemas import MAX_AUDIENCE_IDS
    from service.ingest.consumer import AudienceConsumer
    from service.observability import CONSUMER

    _serve_metrics(settings, CONSUMER)

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

    _run_until_signalled(main)
    return 0


def cmd_produce_sample(settings: Settings, args: argparse.Namespace) -> int:
    from service.ingest.sample import produce_sample

    asyncio.run(
        produce_sample(
            settings.kafka_bootstrap,
            settings.kafka_topic,
            merchant_id=args.merchant_id,
            segment_type=args.segment_type,
            customers=args.customers,
            parts=args.parts,
        )
    )
    return 0


def cmd_cp_emulator(settings: Settings, args: argparse.Namespace) -> int:
    from service.cp.emulator import run_emulator

    async def main(stop: asyncio.Event) -> None:
        task = asyncio.create_task(run_emulator(args.host, args.port))
        await stop.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    _run_until_signalled(main)
    return 0


class DevToken(TypedDict):
    token: str
    scopes: list[str]


def _dev_tokens(data: Path) -> dict[str, DevToken]:
    """Tokens for `segments dev`, made once and kept with the dev data."""
    path = data / "dev-tokens.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    roles = {
        "dev": ["read", "write", "internal", "sync", "reports"],
        "analytics": ["read", "write", "reports"],
        "dataeng": ["internal"],
        "mps": ["sync", "read"],
    }
    tokens: dict[str, DevToken] = {
        name: {"token": secrets.token_urlsafe(24), "scopes": scopes}
        for name, scopes in roles.items()
    }
    path.write_text(json.dumps(tokens, indent=2))
    path.chmod(0o600)
    return tokens


def _forget_broker_offsets(settings: Settings) -> None:
    """Forget the positions PostgreSQL keeps for the topic of the embedded broker.

    That broker keeps messages in memory only, so each start of it begins a new, empty log
    at offset 0. Positions kept from an earlier log would point past its end, and the
    consumer would skip the first messages published to the new one as already applied.
    """
    import asyncpg

    from persistence.urls import asyncpg_url

    async def forget() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(asyncpg_url(settings.database_url), timeout=10)
        try:
            return await conn.fetch(
                "DELETE FROM ingest_offsets WHERE topic = $1 RETURNING partition, next_offset",
                settings.kafka_topic,
            )
        finally:
            await conn.close()

    rows = asyncio.run(forget())
    if rows:
        log.warning(
            "the embedded broker starts empty: forgot the positions kept for topic %s (%s)",
            settings.kafka_topic,
            ", ".join(f"partition {r['partition']} at {r['next_offset']}" for r in rows),
        )


def _write_dev_env(data: Path, settings: Settings, token: str) -> Path:
    """``export`` lines for another shell, so `segments produce-sample`, `segments
    rebuild` and curl reach this stack (readable by its owner only: it holds a token)."""
    lines = [
        f"export {ENV_PREFIX}DATABASE_URL={shlex.quote(settings.database_url)}",
        f"export {ENV_PREFIX}REDIS_URL={shlex.quote(settings.redis_url)}",
        f"export {ENV_PREFIX}KAFKA_BOOTSTRAP={shlex.quote(settings.kafka_bootstrap)}",
        f"export {ENV_PREFIX}CP_URL={shlex.quote(settings.cp_url)}",
        f"export TOKEN={shlex.quote(token)}",
    ]
    path = data / "dev.env"
    path.touch(mode=0o600)
    path.write_text("\n".join(lines) + "\n")
    return path


def cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    """Start the embedded stack (where no URL is configured), migrate, and run the API, the
    reconciler, the consumer and the CP emulator under a supervisor that restarts whichever
    process dies (``service.devstack.Supervisor``; the broker is never restarted for them).
    """
    from service.devstack import (
        CommandChild,
        DevstackError,
        EmbeddedBroker,
        EmbeddedPostgres,
        EmbeddedValkey,
        ServerChild,
        Supervisor,
        free_port,
    )

    data = Path(args.data_dir or settings.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.port is not None:
        env[ENV_PREFIX + "HTTP_PORT"] = str(args.port)
    supervisor = Supervisor()
    stop = _StopFlag()
    try:
        servers: list[ServerChild] = []
        broker: ServerChild | None = None
        if not settings.database_url:
            servers.append(ServerChild(EmbeddedPostgres(data / "postgres", free_port())))
        if not settings.redis_url:
            # No persistence: Redis is a serving copy, rebuilt from PostgreSQL on start.
            vk = EmbeddedValkey(data / "valkey", free_port(), persistent=False)
            servers.append(ServerChild(vk))
        if not settings.kafka_bootstrap:
            # Messages live in its memory: it is never restarted because another process
            # died. When it dies itself, its restart is logged as data loss, and the
            # consumer waits for it (then starts over at the new broker's offset 0).
            broker = ServerChild(
                EmbeddedBroker(data / "broker", free_port()),
                loses_data=True,
                dependents=("consume",),
            )
            servers.append(broker)
        for child in servers:
            supervisor.start(child)
            server = child.server
            log.info("started %s at %s", type(server).__name__, server.url)
            if isinstance(server, EmbeddedPostgres):
                env[ENV_PREFIX + "DATABASE_URL"] = server.url
            elif isinstance(server, EmbeddedValkey):
                env[ENV_PREFIX + "REDIS_URL"] = server.url
            else:
                env[ENV_PREFIX + "KAFKA_BOOTSTRAP"] = server.url
        # Every process signs and checks report links with the same secret.
        env.setdefault(ENV_PREFIX + "REPORT_SECRET", secrets.token_hex(32))
        tokens = _dev_tokens(data)
        env.setdefault(ENV_PREFIX + "AUTH_TOKENS", json.dumps(tokens))
        env.setdefault(ENV_PREFIX + "AUTH_OPEN_READS", "true")
        commands = [["serve"], ["reconcile"], ["consume"]]
        if not settings.cp_url:
            # CP is an external system: in dev, its emulator stands in for it.
            cp_port = free_port()
            env[ENV_PREFIX + "CP_URL"] = f"http://127.0.0.1:{cp_port}"
            commands.append(["cp-emulator", "--port", str(cp_port)])
        final = load_settings(env)
        if cmd_migrate(final, args) != 0:
            return 1
        if broker is not None:
            _forget_broker_offsets(final)
            broker.on_restarted = lambda: _forget_broker_offsets(final)
        envs = {"reconcile": env}
        metrics = ""
        if final.metrics_port:
            # The consumer takes the configured metrics port; two processes cannot share
            # it, so the reconciler takes the next one.
            envs["reconcile"] = {**env, ENV_PREFIX + "METRICS_PORT": str(final.metrics_port + 1)}
            metrics = (
                f"Metrics: http://{final.http_host}:{final.http_port}/metrics (API), "
                f":{final.metrics_port} (consumer), :{final.metrics_port + 1} (reconciler)\n"
            )
        for command in commands:
            argv = [sys.executable, "-m", "service.cli", *command]
            supervisor.start(CommandChild(command[0], argv, env=envs.get(command[0], env)))
        host, port = final.http_host, final.http_port
        dev_env = _write_dev_env(data, final, tokens["dev"]["token"])
        print(
            f"\nuser-segments is up: http://{host}:{port}/docs\n"
            f"  {ENV_PREFIX}DATABASE_URL={final.database_url}\n"
            f"  {ENV_PREFIX}REDIS_URL={final.redis_url}\n"
            f"  {ENV_PREFIX}KAFKA_BOOTSTRAP={final.kafka_bootstrap}\n"
            f"  {ENV_PREFIX}CP_URL={final.cp_url}\n"
            f"Dev tokens (reads are open; writes need one; kept in {data / 'dev-tokens.json'}):\n"
            + "".join(
                f"  {name:<10} {t['token']}  scopes: {', '.join(t['scopes'])}\n"
                for name, t in tokens.items()
            )
            + f"  export TOKEN={tokens['dev']['token']}   # all scopes, for curl\n"
            + metrics
            + f"In another shell: source {dev_env}   (the settings above, and TOKEN)\n"
            + "Try: .venv/bin/segments produce-sample   "
            "(then GET /v1/merchants/42/segments/LOYAL)\n"
            "A process that dies is restarted. Press Ctrl-C to stop everything.\n",
            flush=True,
        )
        return supervisor.run(lambda: stop.requested)
    except DevstackError as exc:
        supervisor.failure = str(exc)
        return 1
    finally:
        supervisor.stop()
        if supervisor.failure is not None:
            print(f"segments dev: stopped: {supervisor.failure}", file=sys.stderr, flush=True)
        log.info("stopped")


COMMANDS = {
    "serve": (cmd_serve, "run the HTTP API (reads from Redis, writes through PostgreSQL)"),
    "migrate": (cmd_migrate, "apply the database migrations (alembic upgrade head)"),
    "reconcile": (
        cmd_reconcile,
        "run the reconciler: expiry sweeper (history at expiry time) and history partitions",
    ),
    "consume": (
        cmd_consume,
        "run the Kafka consumer of merchant audiences (at least once, idempotent apply, DLQ)",
    ),
    "produce-sample": (
        cmd_produce_sample,
        "publish a sample merchant audience to Kafka, split into parts",
    ),
    "cp-emulator": (cmd_cp_emulator, "run the CP emulator (a stand-in for the external CP)"),
    "rebuild": (cmd_rebuild, "rebuild the Redis copy from PostgreSQL, then mark it complete"),
    "dev": (
        cmd_dev,
        "start embedded PostgreSQL, Valkey and a Kafka-protocol broker where no URL is "
        "configured, migrate, and run the API, the reconciler, the consumer and the CP "
        "emulator (what `make run` does)",
    ),
}


# The settings each command cannot run without (checked before anything starts, so a
# missing one is exit code 2 with a message, not a traceback).
_NEEDS: dict[str, tuple[str, ...]] = {
    "serve": ("database_url", "redis_url"),
    "reconcile": ("database_url", "redis_url"),
    "rebuild": ("database_url", "redis_url"),
    "consume": ("database_url", "redis_url", "kafka_bootstrap"),
    "migrate": ("database_url",),
    "produce-sample": ("kafka_bootstrap",),
}


def config_errors(settings: Settings, command: str) -> list[str]:
    """What is wrong with ``settings`` for running ``command``; empty when nothing is."""
    from service.http.middleware import parse_access_log, parse_tokens
    from service.http.schemas import MAX_ITEMS

    errors = []
    if not 1 <= settings.max_list_length <= MAX_ITEMS:
        # The API's schemas refuse longer lists before the setting is ever consulted.
        errors.append(f"{ENV_PREFIX}MAX_LIST_LENGTH must be within 1..{MAX_ITEMS}")
    if settings.sync_threshold < 1:
        errors.append(f"{ENV_PREFIX}SYNC_THRESHOLD must be at least 1")
    positive = (
        "sync_deadline_s",
        "cp_timeout_s",
        "cp_rate_limit_per_s",
        "db_acquire_timeout_s",
        "probe_timeout_s",
    )
    for name in positive:
        if not getattr(settings, name) > 0:
            errors.append(f"{ENV_PREFIX}{name.upper()} must be greater than 0")
    if not 0 <= settings.sync_horizon_days <= 3650:
        # Past ~10 years an end_date is a typo, and far dates overflow expiry arithmetic.
        errors.append(f"{ENV_PREFIX}SYNC_HORIZON_DAYS must be within 0..3650")
    missing = [
        ENV_PREFIX + name.upper() for name in _NEEDS.get(command, ()) if not getattr(settings, name)
    ]
    if missing:
        errors.append(f"{', '.join(missing)} must be set for `segments {command}`")
    try:
        parse_tokens(settings.auth_tokens)
    except ValueError as exc:  # msgspec's decode errors are ValueErrors too
        errors.append(f"{ENV_PREFIX}AUTH_TOKENS: {exc}")
    try:
        parse_access_log(settings.access_log, settings.access_log_slow_ms)
    except ValueError as exc:
        errors.append(str(exc))
    return errors


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where it comes from the settings (None): the
    option's help names that setting and its default instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("user-segments")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segments",
        description="user-segments: which segments is user X in? "
        f"Configuration comes from {ENV_PREFIX}* environment variables. "
        "Exit codes: 0 done, 1 failed at run time, 2 bad usage or configuration.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        # Every option's help shows its default.
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=_DefaultsHelp,
        )
        if name == "dev":
            p.add_argument(
                "--port",
                type=int,
                default=None,
                help="API port (default: SEGMENTS_HTTP_PORT, 8080)",
            )
            p.add_argument(
                "--data-dir",
                default=None,
                help="where the embedded servers keep their data (default: SEGMENTS_DATA_DIR, var)",
            )
        if name == "serve":
            p.add_argument(
                "--host", default=None, help="listen address (default: SEGMENTS_HTTP_HOST)"
            )
            p.add_argument(
                "--port", type=int, default=None, help="listen port (default: SEGMENTS_HTTP_PORT)"
            )
            p.add_argument(
                "--workers",
                type=int,
                default=None,
                help="worker processes (default: SEGMENTS_HTTP_WORKERS)",
            )
            p.add_argument(
                "--reuse-port", action="store_true", help="bind with SO_REUSEPORT (for workers)"
            )
        elif name == "cp-emulator":
            p.add_argument("--host", default="127.0.0.1", help="listen address")
            p.add_argument("--port", type=int, default=8081, help="listen port")
        elif name == "produce-sample":
            p.add_argument("--merchant-id", type=int, default=42, help="the audience's merchant")
            p.add_argument("--segment-type", default="LOYAL", help="the audience's type")
            p.add_argument("--customers", type=int, default=100_000, help="customer ids 1..N")
            p.add_argument("--parts", type=int, default=4, help="messages the snapshot spans")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ValueError as exc:
        print(f"segments: {exc}", file=sys.stderr)
        return 2
    errors = config_errors(settings, args.command)
    if errors:
        for error in errors:
            print(f"segments: {error}", file=sys.stderr)
        return 2
    _setup_logging(settings)
    func, _ = COMMANDS[args.command]
    return func(settings, args)


if __name__ == "__main__":
    sys.exit(main())
