"""Contract test of the client package (clients/python, ``user_segments_client``) against
the real API, plus a scripted server for the answers the real one gives only under load
or races (retries, proxies' answers).

The package is imported from the source tree, so the test runs without installing it.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import datetime as dt
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from service.bootstrap import Container, api_app
from tests.conftest import ApiTestServer

# The package from the source tree (``pip install -e ./clients/python`` gives the same).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))

import user_segments_client
from user_segments_client import (
    AddSegment,
    Audience,
    AudienceEmpty,
    AudienceNotFound,
    Conflict,
    CpError,
    CpRejected,
    CpUnavailable,
    Forbidden,
    InvalidLink,
    InvalidRequest,
    LinkExpired,
    NotFound,
    OutcomeUnknown,
    PromoCancelled,
    PromoConflict,
    PromoNotFound,
    RateLimited,
    ReportLink,
    Segment,
    SegmentExists,
    SegmentNotFound,
    SegmentsClient,
    SegmentsError,
    ServiceUnavailable,
    StorageUnavailable,
    SyncInProgress,
    SyncResult,
    Unauthorized,
    UnsupportedMediaType,
    ValidationError,
)

CLIENT_DIR = Path(__file__).resolve().parents[2] / "clients" / "python"
TODAY = dt.datetime.now(dt.UTC).date()
TOMORROW = TODAY + dt.timedelta(days=1)


def explain_route_exists(app: web.Application) -> bool:
    return any(
        r.canonical == "/v1/users/{user_id}/segments:explain" for r in app.router.resources()
    )


@pytest.fixture
async def client(server: TestServer, http: aiohttp.ClientSession) -> AsyncIterator[SegmentsClient]:
    # ``http`` first empties the databases.
    async with SegmentsClient(str(server.make_url("")), timeout_s=10) as c:
        yield c


async def cp_segments(cp: aiohttp.ClientSession) -> list[dict[str, Any]]:
    async with cp.get("/_admin/state") as r:
        assert r.status == 200
        segments: list[dict[str, Any]] = (await r.json())["segments"]
        return segments


# --- The package itself -------------------------------------------------------------------


def test_the_package_imports_nothing_but_aiohttp_and_msgspec() -> None:
    package = CLIENT_DIR / "user_segments_client"
    allowed = {"aiohttp", "msgspec", "user_segments_client", "__future__"}
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, f"{path.name}: {name}"
    project = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    deps = project["project"]["dependencies"]
    assert sorted(re.split(r"[<>=!~ ;\[]", d)[0] for d in deps) == ["aiohttp", "msgspec"]
    assert project["project"]["version"] == user_segments_client.__version__
    # Importing it loads none of the service's modules.
    code = (
        f"import sys; sys.path.insert(0, {str(CLIENT_DIR)!r}); import user_segments_client; "
        "bad = sorted(m for m in sys.modules "
        "if m.split('.')[0] in {'service', 'cache', 'persistence', 'tests'}); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")  # nosec B603


def test_the_package_builds_a_wheel(tmp_path: Path) -> None:
    # Built from a copy: setuptools leaves build/ and *.egg-info next to the sources.
    source = tmp_path / "src"
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("__pycache__", "build"))
    subprocess.run(  # nosec B603: our interpreter, fixed arguments
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
    )
    [wheel] = (tmp_path / "dist").glob("user_segments_client-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__.py", "client.py", "errors.py", "models.py", "py.typed"):
        assert f"user_segments_client/{module}" in names


async def test_the_readme_example_runs(
    client: SegmentsClient, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (CLIENT_DIR / "README.md").read_text(encoding="utf-8")
    [example] = re.findall(r"```python\n(.*?)```", readme, re.S)[:1]
    assert example.count("\n") <= 14, "the README's example is meant to stay short"
    code = example.replace("http://127.0.0.1:8080", client.base_url).replace(
        "asyncio.run(main())", ""
    )
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)  # nosec B102: our own README
    await namespace["main"]()
    assert capsys.readouterr().out == "['VOICE_MESSAGES']\n"


async def test_every_api_operation_has_a_client_method(client: SegmentsClient) -> None:
    """When the API gains an operation, so must the client (or this list says why not)."""
    methods = {
        "post /v1/segments": "create_segment",
        "get /v1/segments": "list_segments",
        "get /v1/segments/{slug}": "get_segment",
        "patch /v1/segments/{slug}": "update_segment",
        "delete /v1/segments/{slug}": "delete_segment",
        "post /v1/users/segments:batch": "batch_user_segments",
        "post /v1/users/{user_id}/segments": "update_user_segments",
        "get /v1/users/{user_id}/segments": "get_user_segments",
        "get /v1/users/{user_id}/segments:explain": "explain_user_segments",
        "put /internal/v1/merchants/{merchant_id}/segments/{segment_type}/customers": (
            "replace_audience"
        ),
        "patch /internal/v1/merchants/{merchant_id}/segments/{segment_type}/customers": (
            "patch_audience"
        ),
        "get /v1/merchants/{merchant_id}/segments/{segment_type}": "get_audience",
        "post /v1/merchants/{merchant_id}/segments/{segment_type}/sync": "sync_segments",
        "get /v1/promos/{promo_id}": "promo_status",
        "delete /v1/promos/{promo_id}": "cancel_promo",
        "get /v1/customers/{customer_id}/sync-count": "sync_count",
        "post /v1/reports/history": "create_report",
        "get /v1/reports/history/{token}": "download_report",
    }
    operations = {"/healthz", "/readyz", "/metrics"}  # for probes and scrapers, not callers
    async with aiohttp.ClientSession() as s, s.get(client.base_url + "/openapi.json") as r:
        document = await r.json()
    served = {
        f"{method} {path}"
        for path, item in document["paths"].items()
        if path not in operations
        for method in item
    }
    expected = set(methods)
    if "/v1/users/{user_id}/segments:explain" not in document["paths"]:
        expected.discard("get /v1/users/{user_id}/segments:explain")  # not served yet
    assert served == expected, "an API operation without a client method, or the reverse"
    assert all(hasattr(client, name) for name in methods.values())


# --- Segments and memberships against the real API ----------------------------------------


async def test_segment_lifecycle(client: SegmentsClient) -> None:
    made = await client.create_segment("exp:Voice.v2-a", description="voice, second try")
    assert isinstance(made, Segment)
    assert (made.slug, made.description, made.auto_percent) == (
        "exp:Voice.v2-a",
        "voice, second try",
        None,
    )
    assert made.created_at.tzinfo is not None
    with pytest.raises(SegmentExists) as exists:
        await client.create_segment("exp:Voice.v2-a")
    assert (exists.value.status, exists.value.code) == (409, "segment_exists")
    assert isinstance(exists.value, Conflict)

    share = await client.create_segment("SHARE", auto_percent=12.5)
    assert share.auto_percent == 12.5 and share.description == ""
    assert sorted(s.slug for s in await client.list_segments()) == ["SHARE", "exp:Voice.v2-a"]
    assert await client.get_segment("exp:Voice.v2-a") == made

    changed = await client.update_segment("SHARE", auto_percent=40)
    assert (changed.auto_percent, changed.description) == (40, "")
    changed = await client.update_segment("SHARE", description="forty")
    assert (changed.auto_percent, changed.description) == (40, "forty")  # the rule stays
    changed = await client.update_segment("SHARE", auto_percent=None)
    assert (changed.auto_percent, changed.description) == (None, "forty")  # dropped

    with pytest.raises(ValidationError) as invalid:
        await client.create_segment("BAD", auto_percent=101)
    assert (invalid.value.status, invalid.value.code) == (422, "validation_error")
    assert isinstance(invalid.value, InvalidRequest)

    await client.delete_segment("exp:Voice.v2-a")
    for call in (
        client.get_segment("exp:Voice.v2-a"),
        client.delete_segment("exp:Voice.v2-a"),
        client.update_segment("exp:Voice.v2-a", description="x"),
    ):
        with pytest.raises(SegmentNotFound) as gone:
            await call
        assert (gone.value.status, gone.value.code) == (404, "segment_not_found")
        assert isinstance(gone.value, NotFound)
    assert [s.slug for s in await client.list_segments()] == ["SHARE"]
    with pytest.raises(ValueError):
        await client.get_segment("..")  # would name another path


async def test_user_updates_with_expiry_and_reads(client: SegmentsClient) -> None:
    for slug in ("A", "B", "C", "D"):
        await client.create_segment(slug)
    in_a_day = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    after = await client.update_user_segments(
        1000,
        add=["D", AddSegment("B", ttl_seconds=3600), AddSegment("A", expires_at=in_a_day)],
    )
    assert after == ["A", "B", "D"]
    assert await client.get_user_segments(1000) == ["A", "B", "D"]
    assert await client.update_user_segments(1000, add=["C"], remove=["D", "B"]) == ["A", "C"]
    assert await client.get_user_segments(2000) == []  # never seen

    with pytest.raises(SegmentNotFound) as unknown:
        await client.update_user_segments(1000, add=["NOPE1"], remove=["NOPE2", "A"])
    assert sorted(unknown.value.details["slugs"]) == ["NOPE1", "NOPE2"]
    assert await client.get_user_segments(1000) == ["A", "C"]  # nothing changed

    with pytest.raises(ValidationError):
        await client.update_user_segments(1000, add=[AddSegment("A", ttl_seconds=0)])
    with pytest.raises(ValidationError):
        await client.get_user_segments(0)
    with pytest.raises(ValueError):
        AddSegment("A", ttl_seconds=5, expires_at=in_a_day)
    with pytest.raises(ValueError):
        AddSegment("A", expires_at=dt.datetime(2030, 1, 1))  # naive


async def test_a_ttl_ends_the_membership(client: SegmentsClient) -> None:
    await client.create_segment("BRIEF")
    assert await client.update_user_segments(7, add=[AddSegment("BRIEF", ttl_seconds=1)]) == [
        "BRIEF"
    ]
    await asyncio.sleep(1.1)
    assert await client.get_user_segments(7) == []


async def test_batch_reads_split_long_lists(client: SegmentsClient) -> None:
    await client.create_segment("A")
    await client.create_segment("B")
    await client.update_user_segments(1, add=["A"])
    await client.update_user_segments(2, add=["A", "B"])
    assert await client.batch_user_segments([1, 2, 3, 2]) == {1: ["A"], 2: ["A", "B"], 3: []}
    assert await client.batch_user_segments([]) == {}
    # Over the API's 1,000 ids a call: the client makes more calls.
    many = await client.batch_user_segments(range(1, 2502))
    assert len(many) == 2501
    assert (many[1], many[2], many[2501]) == (["A"], ["A", "B"], [])
    with pytest.raises(ValidationError):
        await client.batch_user_segments([0])


async def test_explain(client: SegmentsClient, server: TestServer) -> None:
    if not explain_route_exists(server.app):
        pytest.skip("GET /v1/users/{user_id}/segments:explain is not served yet")
    await client.create_segment("EXPLICIT")
    await client.create_segment("ALL", auto_percent=100)
    await client.create_segment("ALSO_ALL", auto_percent=100)
    await client.create_segment("UNRELATED")
    in_an_hour = await client.update_user_segments(
        5, add=[AddSegment("EXPLICIT", ttl_seconds=3600), "ALSO_ALL"], remove=["ALL"]
    )
    assert in_an_hour == ["ALSO_ALL", "EXPLICIT"]
    explained = {e.slug: e for e in await client.explain_user_segments(5)}
    assert set(explained) == {"EXPLICIT", "ALL", "ALSO_ALL"}  # UNRELATED: nothing to say

    explicit = explained["EXPLICIT"]
    assert (explicit.included, explicit.source, explicit.rule) == (True, "explicit", None)
    assert explicit.expires_at is not None
    remaining = explicit.expires_at - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=59) < remaining <= dt.timedelta(hours=1)

    excluded = explained["ALL"]
    assert (excluded.included, excluded.source, excluded.expires_at) == (False, "excluded", None)
    assert excluded.rule is not None and excluded.rule.auto_percent == 100
    assert 0 <= excluded.rule.bucket <= 9999

    both = explained["ALSO_ALL"]
    assert (both.included, both.source, both.expires_at) == (True, "explicit+rule", None)
    for e in explained.values():
        assert e.since is None or e.since.tzinfo is not None
    # A user with nothing explicit: only the rules, each with the user's bucket.
    ruled = await client.explain_user_segments(6)
    assert sorted((e.slug, e.included, e.source) for e in ruled) == [
        ("ALL", True, "rule"),
        ("ALSO_ALL", True, "rule"),
    ]
    assert all(e.rule is not None and e.expires_at is None for e in ruled)
    with pytest.raises(ValidationError):
        await client.explain_user_segments(0)


# --- Audiences, promo sync and reports against the real API --------------------------------


async def test_audiences(client: SegmentsClient) -> None:
    with pytest.raises(AudienceNotFound) as missing:
        await client.get_audience(42, "LOYAL")
    assert (missing.value.status, missing.value.code) == (404, "audience_not_found")
    replaced = await client.replace_audience(42, "LOYAL", [3, 1, 2])
    assert isinstance(replaced, Audience)
    assert (replaced.merchant_id, replaced.segment_type, replaced.customers) == (42, "LOYAL", 3)
    patched = await client.patch_audience(42, "LOYAL", add=[4, 5], remove=[1])
    assert patched.customers == 4 and patched.version > replaced.version
    got = await client.get_audience(42, "LOYAL")
    assert (got.customers, got.version) == (4, patched.version)
    assert got.updated_at is not None and got.updated_at.tzinfo is not None
    with pytest.raises(ValidationError):
        await client.replace_audience(42, "LOYAL", [0])
    assert (await client.get_audience(42, "LOYAL")).customers == 4


async def test_promo_sync_status_count_and_cancel(
    client: SegmentsClient, cp: aiohttp.ClientSession
) -> None:
    await client.replace_audience(3, "LOYAL", [1, 2, 3])
    result = await client.sync_segments(3, "LOYAL", TOMORROW, "PKG-1")
    assert isinstance(result, SyncResult)
    assert (result.promo_id, result.synced, result.skipped_over_threshold) == ("PKG-1", 3, 0)
    assert [s["segment_id"] for s in await cp_segments(cp)] == [result.cp_segment_id]
    assert await client.sync_segments(3, "LOYAL", TOMORROW, "PKG-1") == result  # idempotent
    status = await client.promo_status("PKG-1")
    assert (status.state, status.end_date, status.merchant_id) == ("synced", TOMORROW, 3)
    assert [await client.sync_count(c) for c in (1, 2, 3, 4)] == [1, 1, 1, 0]

    await client.replace_audience(4, "LOYAL", [1])
    with pytest.raises(PromoConflict) as conflict:
        await client.sync_segments(4, "LOYAL", TOMORROW, "PKG-1")
    assert (conflict.value.status, conflict.value.code) == (409, "promo_conflict")

    await client.cancel_promo("PKG-1")
    await client.cancel_promo("PKG-1")  # again: fine
    assert (await client.promo_status("PKG-1")).state == "cancelled"
    assert await cp_segments(cp) == []
    assert [await client.sync_count(c) for c in (1, 2, 3)] == [0, 0, 0]
    with pytest.raises(PromoCancelled):
        await client.sync_segments(3, "LOYAL", TOMORROW, "PKG-1")

    with pytest.raises(PromoNotFound):
        await client.promo_status("PKG-unknown")
    with pytest.raises(PromoNotFound):
        await client.cancel_promo("PKG-unknown")
    with pytest.raises(AudienceNotFound):
        await client.sync_segments(3, "NOPE", TOMORROW, "PKG-2")
    with pytest.raises(ValidationError) as past:
        await client.sync_segments(3, "LOYAL", dt.date(2001, 1, 1), "PKG-2")
    assert past.value.details["end_date"] == "2001-01-01"
    await client.replace_audience(5, "EMPTY", [])
    with pytest.raises(AudienceEmpty) as empty:
        await client.sync_segments(5, "EMPTY", TOMORROW, "PKG-3")
    assert (empty.value.status, empty.value.code) == (422, "audience_empty")
    with pytest.raises(TypeError):
        await client.sync_segments(3, "LOYAL", dt.datetime.now(dt.UTC), "PKG-2")


async def test_cp_failure_is_not_retried(client: SegmentsClient, cp: aiohttp.ClientSession) -> None:
    await client.replace_audience(3, "LOYAL", [1, 2])
    async with cp.post("/_admin/faults", json={"error_rate": 1, "error_status": 503}) as r:
        assert r.status == 200
    with pytest.raises(CpUnavailable) as exc:
        await client.sync_segments(3, "LOYAL", TOMORROW, "PKG-4")
    assert (exc.value.status, exc.value.code) == (502, "cp_unavailable")
    assert isinstance(exc.value, CpError)
    assert (await client.promo_status("PKG-4")).state == "failed"
    async with cp.post("/_admin/reset") as r:
        assert r.status == 204
    assert (await client.sync_segments(3, "LOYAL", TOMORROW, "PKG-4")).synced == 2


async def test_reports(client: SegmentsClient) -> None:
    await client.create_segment("VOICE_MESSAGES")
    await client.update_user_segments(1000, add=["VOICE_MESSAGES"])
    await client.update_user_segments(1002, add=["VOICE_MESSAGES"])
    await client.update_user_segments(1002, remove=["VOICE_MESSAGES"])
    link = await client.create_report(TODAY)
    assert isinstance(link, ReportLink)
    assert link.expires_at > dt.datetime.now(dt.UTC)
    rows = [line.split(";") for line in (await client.download_report(link)).splitlines()]
    assert rows[0] == ["user_id", "segment", "operation", "timestamp"]
    assert sorted((r[0], r[2]) for r in rows[1:]) == [
        ("1000", "add"),
        ("1002", "add"),
        ("1002", "remove"),
    ]
    mine = await client.create_report(TODAY.strftime("%Y-%m"), user_id=1002)
    text = await client.download_report(mine.url)
    assert [r.split(";")[2] for r in text.splitlines()[1:]] == ["add", "remove"]
    chunks = [chunk async for chunk in client.stream_report(mine, chunk_size=16)]
    assert len(chunks) > 1 and b"".join(chunks).decode() == text

    token = mine.url.rsplit("/", 1)[1]
    # Altered in the middle (base64's last characters may carry only padding bits).
    mid = len(token) // 2
    bad = token[:mid] + ("B" if token[mid] == "A" else "A") + token[mid + 1 :]
    with pytest.raises(InvalidLink) as altered:
        await client.download_report(mine.url.replace(token, bad))
    assert (altered.value.status, altered.value.code) == (403, "invalid_link")
    with pytest.raises(ValidationError):
        await client.create_report("2999-01")


# --- Auth and rate limits against the real API ---------------------------------------------

WRITER, READER, REPORTER = "w" * 32, "r" * 32, "p" * 32
TOKENS = {
    "writer": {"token": WRITER, "scopes": ["read", "write", "internal"]},
    "reader": {"token": READER, "scopes": ["read"]},
    "reporter": {"token": REPORTER, "scopes": ["reports"]},
}


@contextlib.asynccontextmanager
async def api(clean: Container, **settings: Any) -> AsyncIterator[str]:
    """The API with other settings, as tests/e2e/test_operability.py starts it."""
    changed = msgspec.structs.replace(clean.settings, **settings)
    srv = ApiTestServer(api_app(clean, changed), host="127.0.0.1")
    await srv.start_server()
    try:
        yield str(srv.make_url(""))
    finally:
        await srv.close()


async def test_tokens_and_scopes(clean: Container) -> None:
    async with api(clean, auth_tokens=orjson.dumps(TOKENS).decode()) as url:
        for token in (None, "nope-" * 8):
            async with SegmentsClient(url, token=token, timeout_s=10) as anonymous:
                with pytest.raises(Unauthorized) as unauthorized:
                    await anonymous.list_segments()
                assert (unauthorized.value.status, unauthorized.value.code) == (
                    401,
                    "unauthorized",
                )
        async with SegmentsClient(url, token=WRITER, timeout_s=10) as writer:
            await writer.create_segment("A")
            await writer.update_user_segments(1, add=["A"])
            await writer.replace_audience(1, "LOYAL", [1])
            with pytest.raises(Forbidden) as forbidden:
                await writer.sync_segments(1, "LOYAL", TOMORROW, "PKG-5")
            assert forbidden.value.details == {"required_scope": "sync"}
        async with SegmentsClient(url, token=READER, timeout_s=10) as reader:
            assert await reader.get_user_segments(1) == ["A"]
            assert await reader.batch_user_segments([1]) == {1: ["A"]}
            with pytest.raises(Forbidden) as forbidden:
                await reader.create_segment("B")
            assert (forbidden.value.status, forbidden.value.details) == (
                403,
                {"required_scope": "write"},
            )
            with pytest.raises(Forbidden):
                await reader.create_report(TODAY)
        async with SegmentsClient(url, token=REPORTER, timeout_s=10) as reporter:
            link = await reporter.create_report(TODAY)
        # The link opens without a token.
        async with SegmentsClient(url, timeout_s=10) as anonymous:
            assert (await anonymous.download_report(link)).startswith("user_id;segment;")


async def test_rate_limits_are_retried_after_retry_after(clean: Container) -> None:
    async with api(clean, rate_limit_per_s=2.0, rate_limit_burst=1.0) as url:
        async with SegmentsClient(url, timeout_s=10, max_attempts=1) as once:
            await once.list_segments()
            with pytest.raises(RateLimited) as limited:
                await once.list_segments()
            assert (limited.value.status, limited.value.code) == (429, "rate_limited")
            assert limited.value.retry_after_s == 1.0
        async with SegmentsClient(url, timeout_s=10) as patient:
            started = time.monotonic()
            assert await patient.list_segments() == []  # waited as Retry-After said
            assert 0.9 <= time.monotonic() - started < 5


async def test_a_session_passed_in_stays_open(
    server: TestServer, http: aiohttp.ClientSession
) -> None:
    async with SegmentsClient(str(server.make_url("")), session=http) as client:
        assert await client.list_segments() == []
    assert not http.closed
    with pytest.raises(RuntimeError):
        await client.list_segments()


async def test_closed_port_raises_service_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        async with SegmentsClient(f"http://127.0.0.1:{port}", timeout_s=5) as client:
            with pytest.raises(ServiceUnavailable) as exc:
                await client.get_user_segments(1)
            assert exc.value.status is None and exc.value.code == "connection_error"
            with pytest.raises(ServiceUnavailable):
                await client.download_report(f"http://127.0.0.1:{port}/v1/reports/history/x")


# --- Retries and error mapping, against a scripted server ---------------------------------

Answer = tuple[int, dict[str, Any] | bytes | None, dict[str, str]]
"""(status, JSON body, raw bytes or None for an empty one, headers)."""

SEGMENT = {
    "slug": "A",
    "description": "",
    "auto_percent": None,
    "created_at": "2030-01-01T00:00:00Z",
}


def error(status: int, code: str, retry_after: str | None = None) -> Answer:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return status, {"error": {"code": code, "message": code, "details": {}}}, headers


@contextlib.asynccontextmanager
async def scripted(answers: Sequence[Answer]) -> AsyncIterator[tuple[str, list[web.Request]]]:
    """A server giving ``answers`` in turn (the last one again once they run out); yields
    its URL and the requests it got."""
    calls: list[web.Request] = []

    async def handle(request: web.Request) -> web.Response:
        calls.append(request)
        status, body, headers = answers[min(len(calls), len(answers)) - 1]
        if isinstance(body, dict):
            return web.Response(
                status=status,
                body=orjson.dumps(body),
                headers=headers,
                content_type="application/json",
            )
        return web.Response(status=status, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    srv = TestServer(app, host="127.0.0.1")
    await srv.start_server()
    try:
        yield str(srv.make_url("")), calls
    finally:
        await srv.close()


@pytest.mark.parametrize(
    "first",
    [
        error(503, "storage_unavailable", retry_after="0"),
        error(503, "outcome_unknown", retry_after="0"),
        error(429, "rate_limited", retry_after="0"),
        error(409, "sync_in_progress", retry_after="0"),
        (503, b"upstream busy", {"Retry-After": "0"}),  # a proxy's
        error(503, "storage_unavailable"),  # no Retry-After: a short backoff
    ],
)
async def test_not_now_answers_are_retried(first: Answer) -> None:
    async with (
        scripted([first, (201, SEGMENT, {})]) as (url, calls),
        SegmentsClient(url, timeout_s=10, token="t0ken") as c,
    ):
        made = await c.create_segment("A")
    assert made.slug == "A" and len(calls) == 2
    assert [(r.method, r.path, r.headers["Authorization"]) for r in calls] == [
        ("POST", "/v1/segments", "Bearer t0ken")
    ] * 2


async def test_retries_are_bounded() -> None:
    answers = [error(503, "outcome_unknown", retry_after="0")]
    async with scripted(answers) as (url, calls), SegmentsClient(url, max_attempts=3) as c:
        with pytest.raises(OutcomeUnknown) as exc:
            await c.update_user_segments(1, add=["A"])
    assert (exc.value.status, exc.value.retry_after_s, len(calls)) == (503, 0.0, 3)
    assert isinstance(exc.value, ServiceUnavailable)

    # A long Retry-After is capped at max_retry_wait_s.
    answers = [error(503, "storage_unavailable", retry_after="3600"), (200, SEGMENT, {})]
    started = time.monotonic()
    async with scripted(answers) as (url, calls), SegmentsClient(url, max_retry_wait_s=0.05) as c:
        await c.get_segment("A")
    assert len(calls) == 2 and time.monotonic() - started < 5

    # A wait that would pass timeout_s is not made: the caller gets the real reason.
    answers = [error(429, "rate_limited", retry_after="30")]
    started = time.monotonic()
    async with (
        scripted(answers) as (url, calls),
        SegmentsClient(url, timeout_s=2, max_retry_wait_s=30) as c,
    ):
        with pytest.raises(RateLimited) as limited:
            await c.get_segment("A")
    assert (len(calls), limited.value.retry_after_s) == (1, 30.0)
    assert time.monotonic() - started < 1.5

    # An HTTP date works as well as seconds.
    when = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    date = when.strftime("%a, %d %b %Y %H:%M:%S GMT")
    answers = [error(409, "sync_in_progress", retry_after=date)]
    async with scripted(answers) as (url, calls), SegmentsClient(url, max_attempts=2) as c:
        with pytest.raises(SyncInProgress) as busy:
            await c.promo_status("P-1")
    assert (busy.value.retry_after_s, len(calls)) == (0.0, 2)


@pytest.mark.parametrize(
    ("answer", "cls", "code"),
    [
        (error(502, "cp_unavailable"), CpUnavailable, "cp_unavailable"),
        (error(502, "cp_rejected"), CpRejected, "cp_rejected"),
        (error(409, "segment_exists"), SegmentExists, "segment_exists"),
        (error(404, "not_found"), NotFound, "not_found"),  # a route the service lacks
        (error(404, "promo_not_found"), PromoNotFound, "promo_not_found"),
        (error(401, "unauthorized"), Unauthorized, "unauthorized"),
        (error(403, "forbidden"), Forbidden, "forbidden"),
        (error(403, "invalid_link"), InvalidLink, "invalid_link"),
        (error(410, "link_expired"), LinkExpired, "link_expired"),
        (error(415, "unsupported_media_type"), UnsupportedMediaType, "unsupported_media_type"),
        (error(500, "internal_error"), SegmentsError, "internal_error"),
        # Codes this client does not know yet: the base class of the status.
        (error(409, "some_new_conflict"), Conflict, "some_new_conflict"),
        (error(422, "some_new_rule"), InvalidRequest, "some_new_rule"),
        # Not the service's body: a proxy answered.
        ((404, b"<html>nope</html>", {}), SegmentsError, "http_404"),
        ((502, b"bad gateway", {}), ServiceUnavailable, "http_502"),
        ((401, None, {}), Unauthorized, "http_401"),
    ],
)
async def test_error_answers_map_to_classes_and_are_not_retried(
    answer: Answer, cls: type[SegmentsError], code: str
) -> None:
    async with scripted([answer]) as (url, calls), SegmentsClient(url) as c:
        with pytest.raises(SegmentsError) as exc:
            await c.get_segment("A")
    assert type(exc.value) is cls
    assert (exc.value.status, exc.value.code, len(calls)) == (answer[0], code, 1)


async def test_storage_unavailable_class() -> None:
    answers = [error(503, "storage_unavailable", retry_after="0")]
    async with scripted(answers) as (url, calls), SegmentsClient(url, max_attempts=1) as c:
        with pytest.raises(StorageUnavailable):
            await c.list_segments()
    assert len(calls) == 1


async def test_unexpected_answers_are_errors() -> None:
    for body in ({"slug": "A"}, b"not json"):
        async with scripted([(200, body, {})]) as (url, _), SegmentsClient(url) as c:
            with pytest.raises(SegmentsError) as exc:
                await c.get_segment("A")
        assert exc.value.code == "invalid_response"
    answer = {"user_id": 2, "segments": []}
    async with scripted([(200, answer, {})]) as (url, _), SegmentsClient(url) as c:
        with pytest.raises(SegmentsError, match="asked for user 1"):
            await c.get_user_segments(1)


async def test_a_report_link_is_opened_without_the_token() -> None:
    csv = b"user_id;segment;operation;timestamp\n1;A;add;2030-01-01T00:00:00Z\n"
    answers: list[Answer] = [
        (503, b"", {"Retry-After": "0"}),
        (200, csv, {"Content-Type": "text/csv"}),
    ]
    async with scripted(answers) as (url, calls), SegmentsClient(url, token="secret") as c:
        text = await c.download_report(url + "/v1/reports/history/tok", lang="ru")
    assert text == csv.decode()
    assert len(calls) == 2  # the 503 was retried
    for request in calls:
        assert "Authorization" not in request.headers
        assert (request.path, request.query.get("lang")) == ("/v1/reports/history/tok", "ru")
