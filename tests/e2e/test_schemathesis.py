"""Schemathesis against the service's own /openapi.json (exploration draft)."""

from __future__ import annotations

import asyncio

import hypothesis
import pytest
import requests
import schemathesis
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck
from schemathesis import GenerationMode

from service.bootstrap import Container
from service.http.openapi import build_openapi

OPERATIONS = [
    (method, path) for path, item in build_openapi()["paths"].items() for method in item
]


@pytest.fixture(scope="module")
async def api_schema(server: TestServer) -> schemathesis.BaseSchema:
    url = str(server.make_url("/openapi.json"))
    return await asyncio.to_thread(schemathesis.openapi.from_url, url)


@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m.upper()} {p}" for m, p in OPERATIONS])
async def test_operation(
    api_schema: schemathesis.BaseSchema,
    server: TestServer,
    clean: Container,
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    operation = api_schema[path][method]
    base_url = str(server.make_url("")).rstrip("/")
    errors: list[str] = []

    def run() -> None:
        with requests.Session() as session:

            @hypothesis.settings(
                max_examples=int(__import__("os").environ.get("N", "25")),
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                try:
                    case.call_and_validate(base_url=base_url, session=session, timeout=10, checks=[schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance, schemathesis.checks.content_type_conformance])
                except Exception as exc:  # noqa: BLE001
                    errors.append(str(exc)[:3000])

            check()

    await asyncio.to_thread(run)
    assert not errors, "\n\n".join(errors[:5])
