"""`segments dev` (the whole service on embedded servers, under a supervisor) and
`segments produce-sample` (a sample audience to try it with)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shlex
import sys
from pathlib import Path
from typing import TypedDict

from service.cli.maintenance import cmd_migrate
from service.cli.processes import StopFlag
from service.settings import ENV_PREFIX, Settings, load_settings

log = logging.getLogger("segments")


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
    process dies (``devstack.Supervisor``; the broker is never restarted for them).
    """
    try:
        from devstack import (
            CommandChild,
            DevstackError,
            EmbeddedBroker,
            EmbeddedPostgres,
            EmbeddedValkey,
            ServerChild,
            Supervisor,
            free_port,
        )
    except ImportError as e:  # the production image leaves the dev stack out
        print(
            f"segments dev needs the development checkout with the embedded extra ({e.name}"
            " is missing): run `make run` from a clone of the repository",
            file=sys.stderr,
        )
        return 2

    data = Path(args.data_dir or settings.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.port is not None:
        env[ENV_PREFIX + "HTTP_PORT"] = str(args.port)
    supervisor = Supervisor()
    stop = StopFlag()
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
