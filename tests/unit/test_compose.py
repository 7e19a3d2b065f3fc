"""docker-compose.yml stays in step with the code: subcommands, settings, dependencies.

Docker is not available on the dev machines, so the file is only parsed here; nothing
is started.  PyYAML comes with swagger-ui-py, a runtime dependency.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.cli import COMMANDS
from service.settings import ENV_PREFIX, Settings

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
