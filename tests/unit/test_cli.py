"""The ``segments`` command's contract: help for every subcommand, and exit code 2 with
a message (no traceback) for bad usage or configuration."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service import cli
from service.settings import ENV_PREFIX


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_explains_itself(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"segments {command}" in out
    assert " ".join(cli.COMMANDS[command][1].split()) in out


def test_unknown_subcommand_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["frobnicate"])
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        ("serve", "SEGMENTS_DATABASE_URL, SEGMENTS_REDIS_URL"),
        ("reconcile", "SEGMENTS_DATABASE_URL, SEGMENTS_REDIS_URL"),
        ("rebuild", "SEGMENTS_DATABASE_URL, SEGMENTS_REDIS_URL"),
        ("consume", "SEGMENTS_DATABASE_URL, SEGMENTS_REDIS_URL, SEGMENTS_KAFKA_BOOTSTRAP"),
        ("migrate", "SEGMENTS_DATABASE_URL"),
        ("produce-sample", "SEGMENTS_KAFKA_BOOTSTRAP"),
    ],
)
def test_missing_store_urls_exit_2_with_the_names(
    command: str, missing: str, no_settings: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([command]) == 2
    assert f"{missing} must be set for `segments {command}`" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("AUTH_TOKENS", "{not json", "SEGMENTS_AUTH_TOKENS"),
        ("AUTH_TOKENS", '{"a": {"token": "short", "scopes": ["read"]}}', "16 characters"),
        ("HTTP_PORT", "eighty", "http_port"),
        ("MAX_LIST_LENGTH", "5000", "SEGMENTS_MAX_LIST_LENGTH must be within 1..1000"),
        ("NO_SUCH_THING", "1", "unknown setting"),
    ],
)
def test_bad_settings_exit_2_before_anything_starts(
    variable: str,
    value: str,
    says: str,
    no_settings: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    no_settings.setenv(ENV_PREFIX + variable, value)
    assert cli.main(["cp-emulator", "--port", "1"]) == 2
    assert says in capsys.readouterr().err


def test_supervisor_gives_up_when_workers_exit_with_2() -> None:
    # Workers without store URLs exit 2 at once: restarting them would loop forever.
    # A process of its own: the supervisor takes over SIGINT and SIGTERM.
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    code = "from service import cli; raise SystemExit(cli._serve_workers(2, '127.0.0.1', 1))"
    done = subprocess.run(  # nosec B603: this interpreter, fixed code
        [sys.executable, "-c", code], env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr.decode()[-2000:]
    assert b"exited with 2 (configuration); stopping" in done.stderr


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out.split()
    assert out[0] == "segments" and out[1][0].isdigit()


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_option_says_its_default(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = [a for a in sub.choices[command]._actions if a.option_strings and a.dest != "help"]
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in options:
        assert action.help, f"{command} {action.option_strings}: no help"
        if action.default not in (None, False):
            assert f"(default: {action.default})" in text, (command, action.option_strings)
        elif action.default is None:
            assert "default: SEGMENTS_" in " ".join(action.help.split()), action.option_strings


def test_rebuild_progress_says_total_share_and_eta() -> None:
    progress = cli._RebuildProgress(400_000)
    assert progress.line(0, 0.0) == "rebuild: 400,000 users to write"
    assert progress.line(100_000, 2.0) == (
        "rebuild: 100,000 of 400,000 users (25 %), 50,000/s, ETA 6 s"
    )


def test_dev_without_the_dev_stack_says_what_is_missing(
    no_settings: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The production image has no devstack package: a message and exit 2, no traceback.
    no_settings.setitem(sys.modules, "devstack", None)
    assert cli.main(["dev", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "devstack is missing" in err and "make run" in err
