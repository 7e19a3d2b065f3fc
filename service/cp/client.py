"""HTTP client for CP, the downstream targeting service (contract: docs/cp-contract.md).

Every CP call is idempotent (by external id, or by an ``Idempotency-Key``), so the client
can retry anything that may not have reached CP, or whose answer was lost, without
applying it twice.  4xx answers are final; 5xx, 429, timeouts and dropped connections
are retried with full-jitter exponential backoff.  Every attempt first takes a token from
one rate limiter per client, and an optional deadline bounds a whole call.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from aiolimiter import AsyncLimiter
from yarl import URL

from service.domain.errors import CpRejected, CpUnavailable

log = logging.getLogger(__name__)

# CP refuses larger batches with a 400, so a bigger max_batch could never succeed.
CP_MAX_BATCH = 10_000

_RETRYABLE_EXC = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)
_JSON = {"Content-Type": "application/json"}


class CpClient:
    """``CpGateway`` over HTTP.  One instance per process; it owns a connection pool."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 2.0,
        max_attempts: int = 4,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 1.0,
        max_batch: int = 5000,
        max_concurrency: int = 4,
        rate_limit_per_s: float = 50.0,
        session: aiohttp.ClientSession | None = None,
        on_request: Callable[[str, str, float], None] | None = None,
    ) -> None:
        """``on_request(op, outcome, seconds)`` hears of every HTTP attempt (for the
        latency metric); the outcome is ``ok``, ``retryable`` or ``rejected``.

        ``rate_limit_per_s`` caps the HTTP attempts (retries included) of all calls on
        this client together, with a burst of up to one second's worth (at least 1)."""
        if timeout_s <= 0 or max_attempts < 1 or max_concurrency < 1:
            raise ValueError("timeout_s must be > 0, max_attempts and max_concurrency >= 1")
        if not rate_limit_per_s > 0:  # also refuses NaN
            raise ValueError("rate_limit_per_s must be > 0")
        if not 1 <= max_batch <= CP_MAX_BATCH:
            raise ValueError(f"max_batch must be within 1..{CP_MAX_BATCH}")
        if backoff_base_s < 0 or backoff_max_s < 0:
            raise ValueError("backoff must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.max_attempts = max_attempts
        self.max_batch = max_batch
        self.max_concurrency = max_concurrency
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.rate_limit_per_s = rate_limit_per_s
        self.timeout_s = timeout_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        # Made on first use, in the running loop: see _rate_limiter.
        self._limiter: AsyncLimiter | None = None
        self._limiter_loop: asyncio.AbstractEventLoop | None = None
        self._session = session
        # A session passed in belongs to the caller, who closes it.
        self._owns_session = session is None
        self._rng = random.Random()  # nosec B311  # backoff jitter, not security
        self.calls: dict[str, int] = {"ok": 0, "retry": 0, "failed": 0, "rejected": 0}
        self._on_request = on_request or (lambda op, outcome, seconds: None)

    async def create_segment(
        self,
        external_id: str,
        name: str,
        expires_at: dt.datetime,
        *,
        deadline: float | None = None,
    ) -> str:
        """``deadline`` (here and in the other calls): a ``time.monotonic()`` value after
        which no attempt starts; reaching it raises ``CpUnavailable``."""
        if expires_at.tzinfo is None:
            # A naive time would be read as UTC by CP and silently shift expiries.
            raise ValueError("expires_at must be timezone-aware")
        body = {"name": name, "expires_at": _iso_utc(expires_at)}
        answer = await self._call(
            "create_segment",
            "PUT",
            f"/v1/segments/{quote(external_id, safe='')}",
            body=body,
            need="segment_id",
            deadline=deadline,
        )
        assert answer is not None
        return str(answer["segment_id"])

    async def add_members(
        self,
        segment_id: str,
        customer_ids: Sequence[int],
        idempotency_key: str,
        *,
        deadline: float | None = None,
    ) -> None:
        """Add ``customer_ids`` in batches of ``max_batch``, ``max_concurrency`` at a time.

        Batch ``i`` is sent with the key ``f"{idempotency_key}:{i}"``, so calling again
        with the same ids (same order) and key after a failure re-sends only what CP
        has not stored yet: the rest is answered from CP's idempotency store.
        """
        path = f"/v1/segments/{quote(segment_id, safe='')}/members"
        await self._send_batches("add_members", path, customer_ids, idempotency_key, deadline)

    async def remove_members(
        self,
        segment_id: str,
        customer_ids: Sequence[int],
        idempotency_key: str,
        *,
        deadline: float | None = None,
    ) -> None:
        """Remove ``customer_ids``, batched and keyed exactly as ``add_members``.

        Ids that are not members are fine.  Add and remove share CP's key store, so
        the two need different keys for the same segment.
        """
        path = f"/v1/segments/{quote(segment_id, safe='')}/members/remove"
        await self._send_batches("remove_members", path, customer_ids, idempotency_key, deadline)

    async def _send_batches(
        self,
        op: str,
        path: str,
        customer_ids: Sequence[int],
        idempotency_key: str,
        deadline: float | None,
    ) -> None:
        if not idempotency_key:
            raise ValueError("idempotency_key must not be empty")
        size = self.max_batch
        batches = [list(customer_ids[i : i + size]) for i in range(0, len(customer_ids), size)]

        async def send(index: int, batch: list[int]) -> None:
            await self._call(
                op,
                "POST",
                path,
                body={"customer_ids": batch},
                headers={"Idempotency-Key": f"{idempotency_key}:{index}"},
                deadline=deadline,
            )

        if len(batches) <= 1:
            for index, batch in enumerate(batches):
                await send(index, batch)
            return
        # A few workers pulling from one iterator: bounded concurrency without a task
        # per batch, and the first failure stops the rest instead of letting them run on.
        pending = iter(enumerate(batches))

        async def worker() -> None:
            for index, batch in pending:
                await send(index, batch)

        workers = [
            asyncio.create_task(worker()) for _ in range(min(self.max_concurrency, len(batches)))
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def delete_segment(self, segment_id: str, *, deadline: float | None = None) -> None:
        # 404 counts as done: a retry after a lost 204 must not turn an undo into an error.
        await self._call(
            "delete_segment",
            "DELETE",
            f"/v1/segments/{quote(segment_id, safe='')}",
            also_ok=frozenset({404}),
            deadline=deadline,
        )

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    def _rate_limiter(self) -> AsyncLimiter:
        # The client may be built outside any loop, and an AsyncLimiter binds to the loop
        # it first waits in (older aiolimiter versions misbehave if reused in another):
        # one limiter per running loop, which in a service process means exactly one.
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._limiter_loop is not loop:
            # Bucket size max(1, rate): an idle client may send up to one second's worth
            # at once (but at least one attempt), then attempts drip at the rate.
            burst = max(1.0, self.rate_limit_per_s)
            self._limiter = AsyncLimiter(burst, burst / self.rate_limit_per_s)
            self._limiter_loop = loop
        return self._limiter

    async def _take_token(self, deadline: float | None) -> bool:
        """Wait for a rate token; False (and no token taken) if the deadline comes first."""
        if deadline is None:
            await self._rate_limiter().acquire()
            return True
        left = _left(deadline)
        if left <= 0:
            return False
        try:
            async with asyncio.timeout(left):
                await self._rate_limiter().acquire()
        except TimeoutError:
            return False
        return True

    def _backoff(self, retry: int) -> float:
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** (retry - 1))
        return self._rng.uniform(0, cap)

    async def _call(
        self,
        op: str,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        need: str | None = None,
        also_ok: frozenset[int] = frozenset(),
        deadline: float | None = None,
    ) -> dict[str, Any] | None:
        """One logical CP call with retries.  ``need``: a field the 2xx answer must have.

        ``deadline`` (``time.monotonic()``): no attempt starts after it, and none runs
        past it; a backoff or a wait for a rate token that would end after it gives up.
        """
        url = URL(self.base_url + path, encoded=True)
        data = orjson.dumps(body) if body is not None else None
        sent_headers = {**_JSON, **(headers or {})} if data is not None else headers
        last_error = ""
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                self.calls["retry"] += 1
                log.info("CP %s attempt %d failed (%s); retrying", op, attempt - 1, last_error)
                pause = self._backoff(attempt - 1)
                if deadline is not None and pause >= _left(deadline) - MIN_ATTEMPT_S:
                    # Sleeping to the deadline would leave no time for the retry.
                    raise self._deadline_passed(op, attempt - 1, last_error)
                await asyncio.sleep(pause)
            if not await self._take_token(deadline):
                raise self._deadline_passed(op, attempt - 1, last_error)
            timeout = self._timeout
            if deadline is not None:
                left = _left(deadline)
                if left < MIN_ATTEMPT_S:
                    # An attempt this short could only time out, and its timeout would
                    # hide the error that matters (the previous attempt's).
                    raise self._deadline_passed(op, attempt - 1, last_error)
                if left < self.timeout_s:
                    timeout = aiohttp.ClientTimeout(total=left)
            started = time.perf_counter()
            try:
                async with self._http().request(
                    method,
                    url,
                    data=data,
                    headers=sent_headers,
                    timeout=timeout,
                    allow_redirects=False,
                ) as resp:
                    status = resp.status
                    raw = await resp.read()
            except _RETRYABLE_EXC as exc:
                self._on_request(op, "retryable", time.perf_counter() - started)
                last_error = _describe(exc, timeout.total)
                continue
            elapsed = time.perf_counter() - started
            if 200 <= status < 300 or status in also_ok:
                answer = None if need is None else _json_object(raw)
                if need is None or (answer is not None and answer.get(need)):
                    self._on_request(op, "ok", elapsed)
                    self.calls["ok"] += 1
                    return answer
                # CP applied the call but the answer was mangled; the retry is idempotent.
                self._on_request(op, "retryable", elapsed)
                last_error = f"HTTP {status} answer without {need!r}"
                continue
            message = _error_message(raw, status)
            if status == 429 or status >= 500:
                self._on_request(op, "retryable", elapsed)
                last_error = f"HTTP {status}: {message}"
                continue
            self._on_request(op, "rejected", elapsed)
            self.calls["rejected"] += 1
            raise CpRejected(
                f"CP rejected {op}: {message}", {"op": op, "status": status, "error": message}
            )
        if deadline is not None and _left(deadline) <= 0:
            # The last attempt ran into the deadline (its timeout was cut to it).
            raise self._deadline_passed(op, self.max_attempts, last_error)
        self.calls["failed"] += 1
        log.warning("CP %s failed after %d attempts: %s", op, self.max_attempts, last_error)
        raise CpUnavailable(
            f"CP did not answer {op} after {self.max_attempts} attempts",
            {"op": op, "attempts": self.max_attempts, "last_error": last_error},
        )

    def _deadline_passed(self, op: str, attempts: int, last_error: str) -> CpUnavailable:
        self.calls["failed"] += 1
        last_error = last_error or "no attempt could start before the deadline"
        log.warning(
            "CP %s missed the sync deadline after %d attempts: %s", op, attempts, last_error
        )
        return CpUnavailable(
            f"CP did not answer {op} before the sync deadline",
            {"op": op, "deadline": True, "attempts": attempts, "last_error": last_error},
        )


# Less time than this left before the deadline: no new attempt starts.
MIN_ATTEMPT_S = 0.02


def _left(deadline: float) -> float:
    return deadline - time.monotonic()


def _iso_utc(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _describe(exc: BaseException, timeout_s: float | None) -> str:
    if str(exc):
        return f"{type(exc).__name__}: {exc}"
    # aiohttp's total timeout raises a bare TimeoutError.
    if isinstance(exc, TimeoutError):
        return f"{type(exc).__name__}: no answer within {timeout_s} s"
    return type(exc).__name__


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _error_message(raw: bytes, status: int) -> str:
    answer = _json_object(raw)
    error = answer.get("error") if answer is not None else None
    if isinstance(error, str):
        return error
    # Proxies in front of CP answer 502/504 in HTML; keep a short excerpt for the logs.
    text = raw[:200].decode("utf-8", "replace").strip()
    return text or f"HTTP {status}"
