"""The ``segments`` command: one entry point for every process of the service.

Exit codes: 0 done, 1 failed at run time, 2 bad usage or configuration.

Its parts: ``parser`` (the commands and their options), ``config`` (the check before
anything starts), ``serve`` (the API), ``background`` (reconciler, consumer, CP
emulator), ``maintenance`` (migrate, rebuild), ``dev`` (the embedded stack) and
``processes`` (signals and child processes).
"""

from __future__ import annotations

import sys

from service.cli.config import config_errors
from service.cli.maintenance import _RebuildProgress
from service.cli.parser import COMMANDS, build_parser
from service.cli.serve import _serve_workers
from service.settings import Settings, load_settings


def _setup_logging(settings: Settings) -> None:
    from service.observability import setup_logging

    mode = {"true": True, "false": False}.get(settings.log_json.lower())
    setup_logging(settings.log_level, mode)


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


__all__ = [
    "COMMANDS",
    "_RebuildProgress",
    "_serve_workers",
    "build_parser",
    "config_errors",
    "main",
]
