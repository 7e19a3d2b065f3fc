"""History that explains every change a user saw (issue 14), end to end.

The report's rows for a (user, segment) pair alternate add/remove and replay into what
GET /v1/users/{id}/segments returned, rule-driven changes included; links open without
a token; explanations say why a user is in a segment.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import NamedTuple
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import msgspec
import orjson
import pytest

from service.bootstrap import Container, api_app
from service.domain.reports import sign_link
from service.domain.rules import bucket
from tests.conftest import ApiTestServer
from tests.e2e.test_experiments_api import create, segments_of, update

PERIOD_NOW = "%Y-%m"


class Row(NamedTuple):
    user_id: int
    slug: str
    op: str
    at: dt.datetime


def this_month() -> str:
    return dt.datetime.now(dt.UTC).strftime(PERIOD_NOW)


async def report_rows(
    http: aiohttp.ClientSession, user_id: int | None = None, period: str | None = None
) -> list[Row]:
    body: dict[str, object] = {"period": period or this_month()}
    if user_id is not None:
        body["user_id"] = user_id
    async with http.post("/v1/reports/history", json=body) as r:
        assert r.status == 201, await r.text()
        url = (await r.json())["url"]
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        lines = (await r.text()).splitlines()
    assert lines[0] == "user_id;segment;operation;timestamp"
    out = []
    for line in lines[1:]:
        uid, slug, op, at = line.split(";")
        out.append(Row(int(uid), slug, op, dt.datetime.fromisoformat(at)))
    return out


def alternate(rows: list[Row]) -> None:
    """Per pair, rows alternate add/remove, starting with either."""
    last: dict[tuple[int, str], str] = {}
    for row in rows:
        key = (row.user_id, row.slug)
        assert last.get(key) != row.op, f"{key}: two {row.op} in a row: {rows}"
        last[key] = row.op


def final(rows: list[Row], user_id: int) -> list[str]:
    """The segments the rows leave the user in (sorted)."""
    state: dict[str, bool] = {}
    for row in rows:
        if row.user_id == user_id:
            state[row.slug] = row.op == "add"
    return sorted(slug for slug, inside in state.items() if inside)


async def segment_id(db: asyncpg.Connection, slug: str) -> int:
    sid = await db.fetchval("SELECT id FROM segments WHERE slug = $1 AND deleted_at IS NULL", slug)
    assert sid is not None
    return int(sid)


def users_in(sid: int, low: int, high: int, count: int = 1, first: int = 1) -> list[int]:
    """``count`` user ids from ``first`` on whose bucket in ``sid`` is in [low, high)."""
    found: list[int] = []
    uid = first
    while len(found) < count:
        if low <= bucket(sid, uid) < high:
            found.append(uid)
        uid += 1
    return found


async def rule_times(db: asyncpg.Connection, sid: int) -> list[dt.datetime]:
    rows = await db.fetch(
        "SELECT occurred_at FROM segment_history WHERE segment_id = $1 ORDER BY id", sid
    )
    return [r[0] for r in rows]


async def patch(http: aiohttp.ClientSession, slug: str, auto_percent: float | None) -> None:
    async with http.patch(f"/v1/segments/{slug}", json={"auto_percent": auto_percent}) as r:
        assert r.status == 200, await r.text()


# -- the two defects -------------------------------------------------------------------------


async def test_expiry_of_an_explicit_membership_the_rule_still_covers_is_not_a_remove(
    http: aiohttp.ClientSession, clean: Container, db: asyncpg.Connection
) -> None:
    """Defect 1: included by a percentage segment, explicitly added with a TTL: its
    expiry changes nothing a reader sees, so the report writes no `remove`."""
    await create(http, "ALL", auto_percent=100)
    sid = await segment_id(db, "ALL")
    status, body = await update(http, 7, [{"slug": "ALL", "ttl_seconds": 1}])
    assert (status, body["segments"]) == (200, ["ALL"])
    await asyncio.sleep(1.2)
    await clean.segments.sweep_expired()
    assert await segments_of(http, 7) == ["ALL"]
    # The facts are stored (a membership began and ended at its expiry) ...
    facts = await db.fetch(
        "SELECT kind, operation, cause FROM membership_history WHERE user_id = 7 ORDER BY id"
    )
    assert [tuple(f) for f in facts] == [("member", "add", "api"), ("member", "remove", "expiry")]
    # ... and the report shows what the user saw: the rule, since the segment's creation.
    (created,) = await rule_times(db, sid)
    mine = await report_rows(http, user_id=7)
    assert mine == [Row(7, "ALL", "add", created)]
    assert final(mine, 7) == await segments_of(http, 7)
    assert [r for r in await report_rows(http) if r.user_id == 7] == mine


async def test_rule_changes_are_reported_for_every_user_they_change(
    http: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    """Defect 2: creating, lowering, raising and dropping a rule are changes a reader
    sees; an explicit add while the rule includes the user is not, and neither is
    dropping the rule for a user who is still an explicit member."""
    await create(http, "OTHER")
    await create(http, "R", auto_percent=50)
    sid = await segment_id(db, "R")
    stays = users_in(sid, 0, 2000)[0]  # in at 50, 20 and 80
    dips = users_in(sid, 2000, 5000)[0]  # in at 50, out at 20, in at 80
    joins = users_in(sid, 5000, 8000)[0]  # in at 80 only
    never = users_in(sid, 8000, 10_000)[0]
    kept = users_in(sid, 0, 2000, first=stays + 1)[0]  # explicit too, keeps it
    unseen = users_in(sid, 0, 2000, first=10**12)[0]  # never written
    for uid in (stays, dips, joins, never):
        await update(http, uid, ["OTHER"])
    await patch(http, "R", 20)
    await patch(http, "R", 80)
    _, body = await update(http, kept, ["R"])
    assert "R" in body["segments"]
    await patch(http, "R", None)
    created, lowered, raised, dropped = await rule_times(db, sid)
    expected = {
        stays: [("add", created), ("remove", dropped)],
        dips: [("add", created), ("remove", lowered), ("add", raised), ("remove", dropped)],
        joins: [("add", raised), ("remove", dropped)],
        never: [],
        kept: [("add", created)],
        unseen: [("add", created), ("remove", dropped)],
    }
    month = await report_rows(http)
    alternate(month)
    for uid, rows in expected.items():
        mine = await report_rows(http, user_id=uid)
        alternate(mine)
        assert [(r.op, r.at) for r in mine if r.slug == "R"] == rows, uid
        assert final(mine, uid) == await segments_of(http, uid), uid
        # The month-wide report has the same rows for every user the service knows,
        # and none for users it never stored anything for.
        assert [r for r in month if r.user_id == uid] == ([] if uid == unseen else mine)
    # Past values of the rule are kept.
    rule = await db.fetch(
        "SELECT operation, old_bp, new_bp FROM segment_history WHERE segment_id = $1 ORDER BY id",
        sid,
    )
    assert [tuple(r) for r in rule] == [
        ("created", None, 5000),
        ("rule_changed", 5000, 2000),
        ("rule_changed", 2000, 8000),
        ("rule_changed", 8000, None),
    ]


async def test_deleting_a_rule_segment_removes_it_for_everyone_it_included(
    http: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    await create(http, "ALL", auto_percent=100)
    sid = await segment_id(db, "ALL")
    await update(http, 1, ["ALL"])  # explicit and by rule
    await update(http, 2, remove=["ALL"])  # excluded
    await update(http, 3, [{"slug": "ALL", "ttl_seconds": 3600}])
    async with http.delete("/v1/segments/ALL") as r:
        assert r.status == 204
    created, deleted = await rule_times(db, sid)
    month = await report_rows(http)
    alternate(month)
    by_user = {uid: [(r.op, r.at) for r in month if r.user_id == uid] for uid in (1, 2, 3)}
    added_2 = await db.fetchval("SELECT min(occurred_at) FROM membership_history WHERE user_id = 2")
    assert by_user == {
        1: [("add", created), ("remove", deleted)],
        2: [("add", created), ("remove", added_2)],
        3: [("add", created), ("remove", deleted)],
    }
    for uid in (1, 2, 3, 4):
        assert final(await report_rows(http, user_id=uid), uid) == await segments_of(http, uid)


# -- links ----------------------------------------------------------------------------------

TOKENS = {"analytics": {"token": "a" * 32, "scopes": ["read", "write", "reports"]}}
AUTH = {"Authorization": f"Bearer {'a' * 32}"}


@pytest.fixture
async def secured(clean: Container) -> AsyncIterator[aiohttp.ClientSession]:
    settings = msgspec.structs.replace(clean.settings, auth_tokens=orjson.dumps(TOKENS).decode())
    server = ApiTestServer(api_app(clean, settings), host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession(base_url=str(server.make_url(""))) as session:
        yield session
    await server.close()


async def test_a_link_opens_without_a_token(secured: aiohttp.ClientSession) -> None:
    async with secured.post("/v1/segments", json={"slug": "A"}, headers=AUTH) as r:
        assert r.status == 201
    async with secured.post("/v1/users/5/segments", json={"add": ["A"]}, headers=AUTH) as r:
        assert r.status == 200
    body = {"period": this_month(), "user_id": 5}
    async with secured.post("/v1/reports/history", json=body) as r:
        assert r.status == 401  # asking for a link needs the reports scope
    async with secured.post("/v1/reports/history", json=body, headers=AUTH) as r:
        assert r.status == 201
        url = (await r.json())["url"]
    # Nothing of the query is in the URL but the opaque token (tests/unit/test_reports.py).
    parts = urlsplit(url)
    assert parts.path.startswith("/v1/reports/history/") and not parts.query
    assert len(parts.path.rsplit("/", 1)[1]) == 70
    # A browser: no Authorization header, no cookie.
    async with aiohttp.ClientSession() as browser, browser.get(url) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/csv")
        lines = (await r.text()).splitlines()
    assert [line.split(";")[:3] for line in lines[1:]] == [["5", "A", "add"]]
    async with aiohttp.ClientSession() as browser, browser.get(url + "?lang=ru") as r:
        assert r.status == 200
        assert (await r.text()).splitlines()[1].split(";")[2] == "добавление"
    async with aiohttp.ClientSession() as browser, browser.get(url + "?lang=xx") as r:
        assert r.status == 422


async def test_expired_and_altered_links_are_refused_without_a_token(
    secured: aiohttp.ClientSession, clean: Container
) -> None:
    secret: bytes = clean.reports._secret  # type: ignore[attr-defined]
    expired = sign_link(secret, this_month(), None, time.time() - 1)
    async with secured.get(f"/v1/reports/history/{expired}") as r:
        assert r.status == 410
        assert (await r.json())["error"]["code"] == "link_expired"
    valid = sign_link(secret, this_month(), 5, time.time() + 60)
    middle = len(valid) // 2
    altered = valid[:middle] + ("A" if valid[middle] != "A" else "B") + valid[middle + 1 :]
    async with secured.get(f"/v1/reports/history/{altered}") as r:
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "invalid_link"
    async with secured.get(f"/v1/reports/history/{valid}") as r:
        assert r.status == 200


# -- explain --------------------------------------------------------------------------------


async def explain(http: aiohttp.ClientSession, uid: int | str) -> tuple[int, dict[str, object]]:
    async with http.get(f"/v1/users/{uid}/segments:explain") as r:
        return r.status, await r.json()


async def test_explain_says_why_and_since_when(
    http: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    await create(http, "PLAIN")
    await create(http, "ALL", auto_percent=100)
    await create(http, "NONE", auto_percent=0)
    await create(http, "UNUSED")
    all_id, none_id = await segment_id(db, "ALL"), await segment_id(db, "NONE")
    await update(http, 9, [{"slug": "PLAIN", "ttl_seconds": 3600}, "ALL"], ["NONE"])
    status, body = await explain(http, 9)
    assert status == 200
    by_slug = {s["slug"]: s for s in body["segments"]}  # type: ignore[attr-defined]
    assert list(by_slug) == ["ALL", "NONE", "PLAIN"]  # sorted; UNUSED is not listed
    plain, rule, excluded = by_slug["PLAIN"], by_slug["ALL"], by_slug["NONE"]
    (added,) = {r.at for r in await report_rows(http, user_id=9) if r.slug == "PLAIN"}
    (all_created,) = await rule_times(db, all_id)
    assert plain == {
        "slug": "PLAIN",
        "included": True,
        "source": "explicit",
        "expires_at": plain["expires_at"],
        "since": added.isoformat().replace("+00:00", "Z"),
    }
    expires = dt.datetime.fromisoformat(str(plain["expires_at"]))
    assert abs((expires - added).total_seconds() - 3600) < 1
    assert rule == {
        "slug": "ALL",
        "included": True,
        "source": "explicit+rule",
        "rule": {"auto_percent": 100.0, "bucket": bucket(all_id, 9)},
        "since": all_created.isoformat().replace("+00:00", "Z"),
    }
    # Excluded from a rule that never included them: nothing was ever seen, no `since`.
    assert excluded == {
        "slug": "NONE",
        "included": False,
        "source": "excluded",
        "rule": {"auto_percent": 0.0, "bucket": bucket(none_id, 9)},
    }
    # A user never seen: the rule alone.
    status, body = await explain(http, 10**15)
    assert status == 200
    assert body["segments"] == [
        {
            "slug": "ALL",
            "included": True,
            "source": "rule",
            "rule": {"auto_percent": 100.0, "bucket": bucket(all_id, 10**15)},
            "since": all_created.isoformat().replace("+00:00", "Z"),
        }
    ]
    assert (await explain(http, "0"))[0] == 422
    assert (await explain(http, "x"))[0] == 422


async def test_head_on_a_link_checks_it_without_running_the_report(
    secured: aiohttp.ClientSession, clean: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret: bytes = clean.reports._secret  # type: ignore[attr-defined]
    runs = 0
    write_csv = clean.reports.write_csv

    async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal runs
        runs += 1
        return await write_csv(*args, **kwargs)

    monkeypatch.setattr(clean.reports, "write_csv", counted)
    valid = sign_link(secret, this_month(), None, time.time() + 60)
    async with secured.head(f"/v1/reports/history/{valid}") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/csv")
        assert await r.read() == b""
    assert runs == 0  # a month of history is not read for a HEAD
    expired = sign_link(secret, this_month(), None, time.time() - 1)
    async with secured.head(f"/v1/reports/history/{expired}") as r:
        assert r.status == 410
    async with secured.get(f"/v1/reports/history/{valid}") as r:
        assert r.status == 200
        assert (await r.text()).startswith("user_id;")
    assert runs == 1
