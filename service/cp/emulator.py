"""An in-memory CP (docs/cp-contract.md) with fault injection, for tests and local runs.

Faults apply to the ``/v1`` routes only and are set through ``POST /_admin/faults``;
``GET /_admin/state`` shows what CP holds, so a test can check that a retried call was
applied exactly once.  Rates draw from a seeded ``random.Random``: the same sequence of
calls sees the same faults.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import orjson
from aiohttp import web

log = logging.getLogger(__name__)

MAX_BATCH = 10_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass
class Faults:
    error_rate: float = 0.0
    error_status: int = 503
    latency_ms: float = 0.0
    drop_after_apply_rate: float = 0.0
    # Deterministic counterparts of the rates: the next N /v1 calls fail (or are
    # applied and then dropped), whatever the rates say.
    fail_next: int = 0
    drop_next: int = 0


@dataclasses.dataclass
class _Segment:
    segment_id: str
    external_id: str
    name: str
    expires_at: str
    members: set[int] = dataclasses.field(default_factory=set)
    # Idempotency-Key -> (digest of the call and the ids sent, the first answer).  Add
    # and remove share it, as CP's does.
    applied: dict[str, tuple[bytes, dict[str, Any]]] = dataclasses.field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        return {
            "segment_id": self.segment_id,
            "external_id": self.external_id,
            "expires_at": self.expires_at,
            "members": len(self.members),
        }


class _Cp:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.segments: dict[str, _Segment] = {}
        self.by_external: dict[str, str] = {}
        self.faults = Faults()
        self.rng = random.Random(self.seed)  # nosec B311  # seeded fault injection
        self.calls = {"received": 0, "injected_errors": 0, "dropped": 0}

    def draw(self, rate: float) -> bool:
        # No draw at rate 0, so enabling one fault does not shift another's sequence.
        return rate > 0 and self.rng.random() < rate


CP = web.AppKey("cp", _Cp)


def create_emulator_app(*, seed: int = 0) -> web.Application:
    # Room for a full batch of 20-digit ids, so oversized batches get CP's own 400.
    app = web.Application(client_max_size=4 * 1024 * 1024, middlewares=[_json_errors, _faults])
    app[CP] = _Cp(seed)
    app.router.add_put("/v1/segments/{external_id}", _put_segment)
    app.router.add_post("/v1/segments/{segment_id}/members", _add_members)
    app.router.add_post("/v1/segments/{segment_id}/members/remove", _remove_members)
    app.router.add_get("/v1/segments/{segment_id}", _get_segment)
    app.router.add_delete("/v1/segments/{segment_id}", _delete_segment)
    app.router.add_post("/_admin/faults", _set_faults)
    app.router.add_get("/_admin/state", _state)
    app.router.add_post("/_admin/reset", _reset)
    return app


async def run_emulator(host: str, port: int) -> None:
    """Serve the emulator on ``host:port`` until cancelled."""
    runner = web.AppRunner(create_emulator_app())
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("CP emulator listening on http://%s:%d", host, port)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, dumps=_dumps)


def _ok(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    # The contract promises JSON errors, also for unknown routes and methods.
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)


@web.middleware
async def _faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/v1/"):
        return await handler(request)
    cp = request.app[CP]
    faults = cp.faults
    cp.calls["received"] += 1
    if faults.latency_ms > 0:
        # The handler still runs if the client gave up meanwhile, as a real server's
        # would: a timed-out call may have been applied.
        await asyncio.sleep(faults.latency_ms / 1000)
    if faults.fail_next > 0 or cp.draw(faults.error_rate):
        faults.fail_next = max(0, faults.fail_next - 1)
        cp.calls["injected_errors"] += 1
        return _error(faults.error_status, "injected fault")
    response = await handler(request)
    if response.status < 300 and (faults.drop_next > 0 or cp.draw(faults.drop_after_apply_rate)):
        faults.drop_next = max(0, faults.drop_next - 1)
        cp.calls["dropped"] += 1
        # Applied, but the client only sees the connection go away (ServerDisconnected).
        if request.transport is not None:
            request.transport.close()
    return response


async def _json_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "body must be JSON")
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object")
    return body


async def _put_segment(request: web.Request) -> web.Response:
    cp = request.app[CP]
    external_id = request.match_info["external_id"]
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    name, expires_at = body.get("name"), body.get("expires_at")
    if not isinstance(name, str) or not name:
        return _error(400, "name must be a non-empty string")
    expiry = _parse_utc(expires_at)
    if expiry is None:
        return _error(400, "expires_at must be an ISO-8601 time with a timezone")
    segment_id = cp.by_external.get(external_id)
    if segment_id is not None:
        segment = cp.segments[segment_id]
        segment.expires_at = expiry
        return _ok(segment.view())
    segment = _Segment(f"seg_{uuid.uuid4().hex}", external_id, name, expiry)
    cp.segments[segment.segment_id] = segment
    cp.by_external[external_id] = segment.segment_id
    return _ok(segment.view(), status=201)


async def _add_members(request: web.Request) -> web.Response:
    return await _change_members(request, "added")


async def _remove_members(request: web.Request) -> web.Response:
    return await _change_members(request, "removed")


async def _change_members(
    request: web.Request, change: Literal["added", "removed"]
) -> web.Response:
    """Add (``change == "added"``) or remove ids, idempotent by ``Idempotency-Key``."""
    cp = request.app[CP]
    segment = cp.segments.get(request.match_info["segment_id"])
    if segment is None:
        return _error(404, "unknown segment")
    key = request.headers.get("Idempotency-Key", "")
    if not key:
        return _error(400, "Idempotency-Key header is required")
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    ids = body.get("customer_ids")
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        return _error(400, "customer_ids must be a list of integers")
    if not 1 <= len(ids) <= MAX_BATCH:
        return _error(400, f"customer_ids must hold 1..{MAX_BATCH} ids, got {len(ids)}")
    # The call is part of the digest: a key first used to add must not replay that
    # answer for a remove (nor the other way round); it is a different request.
    digest = hashlib.sha256(change.encode() + orjson.dumps(ids)).digest()
    stored = segment.applied.get(key)
    if stored is not None:
        if stored[0] != digest:
            return _error(422, "Idempotency-Key reused with a different body")
        return _ok(stored[1])
    before = len(segment.members)
    if change == "added":
        segment.members.update(ids)
    else:
        segment.members.difference_update(ids)
    answer = {
        "segment_id": segment.segment_id,
        change: abs(len(segment.members) - before),
        "members": len(segment.members),
    }
    segment.applied[key] = (digest, answer)
    return _ok(answer)


async def _get_segment(request: web.Request) -> web.Response:
    segment = request.app[CP].segments.get(request.match_info["segment_id"])
    if segment is None:
        return _error(404, "unknown segment")
    return _ok(segment.view())


async def _delete_segment(request: web.Request) -> web.Response:
    cp = request.app[CP]
    segment = cp.segments.pop(request.match_info["segment_id"], None)
    if segment is None:
        return _error(404, "unknown segment")
    del cp.by_external[segment.external_id]
    return web.Response(status=204)


async def _set_faults(request: web.Request) -> web.Response:
    """Replace the whole fault set: fields left out go back to "no fault"."""
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        faults = Faults(**body)
    except TypeError as exc:
        return _error(400, str(exc))
    problem = _check_faults(faults)
    if problem:
        return _error(400, problem)
    request.app[CP].faults = faults
    return _ok(dataclasses.asdict(faults))


def _check_faults(f: Faults) -> str | None:
    def number(v: object) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    rates = (f.error_rate, f.drop_after_apply_rate)
    if not all(number(r) and 0 <= r <= 1 for r in rates):
        return "rates must be within 0..1"
    if type(f.error_status) is not int or not 400 <= f.error_status <= 599:
        return "error_status must be a 4xx or 5xx status"
    if not number(f.latency_ms) or f.latency_ms < 0:
        return "latency_ms must be >= 0"
    if not all(type(n) is int and n >= 0 for n in (f.fail_next, f.drop_next)):
        return "fail_next and drop_next must be integers >= 0"
    return None


async def _state(request: web.Request) -> web.Response:
    cp = request.app[CP]
    segments = [
        {
            **s.view(),
            "name": s.name,
            "applied_keys": len(s.applied),
            "member_ids": sorted(s.members),
        }
        for s in cp.segments.values()
    ]
    return _ok({"segments": segments, "calls": cp.calls, "faults": dataclasses.asdict(cp.faults)})


async def _reset(request: web.Request) -> web.Response:
    request.app[CP].reset()
    return web.Response(status=204)


def _parse_utc(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if t.tzinfo is None:
        return None
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
