"""docker-compose.yml stays in step with the code: subcommands, settings, dependencies.

Docker is not available on the dev machines, so the file is only parsed here; nothing
is started.  PyYAML comes with swagger-ui-py, a runtime dependency.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import COMMANDS, build_parser, config_errors
from service.settings import ENV_PREFIX, Settings, load_settings

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert "version" not in doc, "the Compose spec has no `version:` key"
    assert doc["services"], "no services"
    return doc["services"]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", ...] form
        return dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # short form: condition service_started
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def _is_project_image(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if isinstance(build, dict):
        build = build.get("context")
    return build in (".", "./")


def test_project_services_run_known_subcommands(services: dict[str, dict[str, Any]]) -> None:
    built = {name: svc for name, svc in services.items() if _is_project_image(svc)}
    assert {"migrate", "api"} <= set(built)
    for name, svc in built.items():
        command = svc.get("command")
        assert command, f"{name}: no command"
        first = command[0] if isinstance(command, list) else command.split()[0]
        assert first in COMMANDS, f"{name}: `segments {first}` is not a subcommand"


def test_segments_variables_are_settings(services: dict[str, dict[str, Any]]) -> None:
    fields = set(Settings.__struct_fields__)
    seen = 0
    for name, svc in services.items():
        for var in _environment(svc):
            if var.startswith(ENV_PREFIX):
                seen += 1
                field = var.removeprefix(ENV_PREFIX).lower()
                assert field in fields, f"{name}: {var} is not a setting"
    assert seen, f"no {ENV_PREFIX}* variable found"


def test_dependencies_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for dep in _depends_on(svc):
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert dep != name, f"{name} depends on itself"


def test_api_waits_for_migrations(services: dict[str, dict[str, Any]]) -> None:
    deps = _depends_on(services["api"])
    assert deps.get("migrate", {}).get("condition") == "service_completed_successfully"
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"].get("restart") == "no"


# --- The whole command, the settings and the health checks -------------------------------

DOCKERFILE = COMPOSE_FILE.with_name("Dockerfile")
# Stands in for `${VAR}` without a default (and for `- NAME` taken from the shell): the
# deployer supplies it, so only its presence is checked.  A setting that must parse (a
# number, SEGMENTS_AUTH_TOKENS) needs a default in the file, `${VAR:-...}`, to be checked.
PLACEHOLDER = "set-by-the-deployer"
_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<bare>\w+))"
)
_PROBE_PORT = re.compile(r"(?:127\.0\.0\.1|localhost):(\d+)")


def _interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` and friends, with every VAR unset."""

    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        op = match["op"] or ""
        if op.endswith("-"):
            return match["arg"]
        if op.endswith("+"):  # the alternative applies only when VAR is set
            return ""
        return PLACEHOLDER  # ${VAR}, $VAR, ${VAR:?message}

    return _INTERPOLATION.sub(replace, value)


def _project_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if _is_project_image(svc)}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    # The string form is split like a shell would, without running one.
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    return [_interpolate(word) for word in words]


def _settings_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["NAME=value", ...]; a bare "NAME" comes from the shell
        pairs: list[tuple[str, Any]] = []
        for item in env:
            name, sep, value = str(item).partition("=")
            pairs.append((name, value if sep else None))
    else:
        pairs = [(str(k), v) for k, v in env.items()]
    result = {}
    for name, value in pairs:
        if not name.startswith(ENV_PREFIX):
            continue
        if value is None:
            result[name] = PLACEHOLDER
        elif isinstance(value, bool):  # YAML's true/false; Compose passes them as text
            result[name] = str(value).lower()
        else:
            result[name] = _interpolate(str(value))
    return result


def _check_command(name: str, service: dict[str, Any]) -> argparse.Namespace:
    command = _command(service)
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage), contextlib.redirect_stdout(io.StringIO()):
            return build_parser().parse_args(command)
    except SystemExit:
        reason = usage.getvalue().strip().splitlines()[-1:] or ["exits"]
        pytest.fail(f"{name}: `segments {shlex.join(command)}`: {reason[0]}")


def _check_settings(name: str, service: dict[str, Any]) -> Settings:
    try:
        settings = load_settings(_settings_env(service))
    except ValueError as exc:
        pytest.fail(f"{name}: {exc}")
    # The same check `segments <command>` runs before starting (exit 2 otherwise).
    errors = config_errors(settings, _command(service)[0])
    if errors:
        pytest.fail(f"{name}: {'; '.join(errors)}")
    return settings


def _image_healthcheck() -> dict[str, Any] | None:
    """The Dockerfile's HEALTHCHECK, as Compose would show it; project services inherit it."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("HEALTHCHECK"):
            _, cmd, shell = line.partition(" CMD ")
            return {"test": ["CMD-SHELL", shell.strip()]} if cmd else None
    return None


def _one_shot(services: dict[str, dict[str, Any]]) -> set[str]:
    """Jobs that others wait to *finish*: they are not expected to stay healthy."""
    return {
        dep
        for svc in services.values()
        for dep, spec in _depends_on(svc).items()
        if spec.get("condition") == "service_completed_successfully"
    }


def _check_healthcheck(name: str, service: dict[str, Any]) -> None:
    healthcheck = service.get("healthcheck")
    inherited = healthcheck is None and _is_project_image(service)
    if inherited:
        healthcheck = _image_healthcheck()
    test = (healthcheck or {}).get("test")
    if not test or (healthcheck or {}).get("disable") or test in (["NONE"], "NONE"):
        pytest.fail(f"{name}: a long-running service without a health check")
    if not _is_project_image(service):
        return
    subcommand = _command(service)[0]
    probe = test if isinstance(test, str) else " ".join(test)
    if inherited and subcommand != "serve":
        # The image's probe asks the API port; another process would never be healthy.
        pytest.fail(f"{name}: `segments {subcommand}` inherits the image's API health check")
    if subcommand == "serve" and "/healthz" not in probe and "/readyz" not in probe:
        pytest.fail(f"{name}: the API's health check probes neither /healthz nor /readyz")
    # A probe naming a port must name the one the process listens on.
    args, settings = _check_command(name, service), _check_settings(name, service)
    listens = {
        "serve": getattr(args, "port", None) or settings.http_port,
        "consume": settings.metrics_port,
        "reconcile": settings.metrics_port,
        "cp-emulator": getattr(args, "port", None),
    }.get(subcommand)
    for port in _PROBE_PORT.findall(probe):
        if int(port) != listens:
            pytest.fail(f"{name}: the health check probes port {port}, the process {listens}")


def _check_all(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in _project_services(services).items():
        _check_command(name, svc)
        _check_settings(name, svc)
    one_shot = _one_shot(services)
    for name, svc in services.items():
        if name not in one_shot:
            _check_healthcheck(name, svc)


def test_project_commands_parse(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in _project_services(services).items():
        _check_command(name, svc)


def test_project_services_have_valid_settings(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in _project_services(services).items():
        _check_settings(name, svc)


def test_long_running_services_have_health_checks(services: dict[str, dict[str, Any]]) -> None:
    one_shot = _one_shot(services)
    assert one_shot == {"migrate"}
    assert _image_healthcheck() is not None, "the API relies on the Dockerfile's HEALTHCHECK"
    for name, svc in services.items():
        if name not in one_shot:
            _check_healthcheck(name, svc)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("${A:-x}/${B-y}", "x/y"),
        ("${A}", PLACEHOLDER),
        ("$A:${A:?required}", f"{PLACEHOLDER}:{PLACEHOLDER}"),
        ("${A:+set}$$", "$"),
        ("plain", "plain"),
    ],
)
def test_interpolation(value: str, expected: str) -> None:
    assert _interpolate(value) == expected


def _set(service: dict[str, Any], key: str, value: Any) -> None:
    service[key] = value


def _set_env(service: dict[str, Any], **changes: str | None) -> None:
    # A new mapping: the services share one `environment` through the YAML anchor.
    env = {**service["environment"], **changes}
    service["environment"] = {k: v for k, v in env.items() if v is not None}


# Each check fails on the drift it exists for (run on a changed copy, not the file).
@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda s: _set(s["api"], "command", ["serve", "--wrokers", "2"]), "unrecognized"),
        (lambda s: _set(s["api"], "command", "serve --workers two"), "invalid int"),
        (lambda s: _set_env(s["consumer"], SEGMENTS_AUTH_TOKENS="{no"), "AUTH_TOKENS"),
        (lambda s: _set_env(s["consumer"], SEGMENTS_KAFKA_BOOTSTRAP=None), "KAFKA_BOOTSTRAP"),
        (lambda s: _set(s["migrate"], "environment", ["SEGMENTS_REDIS_URL=r"]), "DATABASE_URL"),
        (lambda s: _set_env(s["api"], SEGMENTS_HTTP_PORT="${PORT:-x}"), "invalid setting"),
        (lambda s: _set_env(s["api"], SEGMENTS_NO_SUCH="1"), "unknown setting"),
        (lambda s: s["consumer"].pop("healthcheck"), "inherits"),
        (lambda s: _set(s["redis"], "healthcheck", {"disable": True}), "without a health"),
        (lambda s: _set(s["api"], "healthcheck", {"test": "curl -f :8080/"}), "/healthz"),
        (lambda s: _set_env(s["reconciler"], SEGMENTS_METRICS_PORT="9200"), "port 9100"),
    ],
)
def test_checks_catch_drift(
    services: dict[str, dict[str, Any]], change: Callable[[dict[str, Any]], Any], error: str
) -> None:
    changed = copy.deepcopy(services)
    _check_all(changed)  # the file itself passes
    change(changed)
    with pytest.raises(pytest.fail.Exception, match=re.escape(error)):
        _check_all(changed)
