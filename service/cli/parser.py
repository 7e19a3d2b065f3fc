"""The commands and the argument parser."""

from __future__ import annotations

import argparse

from service.cli.background import cmd_consume, cmd_cp_emulator, cmd_reconcile
from service.cli.dev import cmd_dev, cmd_produce_sample
from service.cli.maintenance import cmd_migrate, cmd_rebuild
from service.cli.serve import cmd_serve
from service.settings import ENV_PREFIX

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
