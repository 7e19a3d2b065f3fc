"""The pipelined client takes plain redis:// over TCP only; every other URL goes to
redis-py (which speaks TLS, unix sockets and URL options), with a log line saying why.

Nothing connects here: redis-py and the pipelined pool connect on first use.
"""

from __future__ import annotations

import logging

import pytest

from cache.pipelined import PipelinedConnection, PipelinedPool, unsupported_url
from cache.redis_cache import RedisCache

PLAIN = [
    "redis://localhost:6379/0",
    "redis://:secret@cache.internal:6380/2",
    "redis://user:secret@10.0.0.1",
    "REDIS://localhost",
]
REFUSED = [
    ("rediss://cache.internal:6380/0", "TLS"),
    ("rediss://:secret@cache.internal:6380/0", "TLS"),
    ("unix:///run/redis/redis.sock?db=1", "unix sockets"),
    ("unix:///run/redis/redis.sock", "unix sockets"),
    ("redis://localhost:6379?db=3", "URL options"),
    ("redis://localhost:6379/0?ssl_cert_reqs=none", "URL options"),
    ("valkey://localhost:6379", "valkey:// scheme"),
]


@pytest.mark.parametrize("url", PLAIN)
def test_plain_tcp_urls_are_served(url: str) -> None:
    assert unsupported_url(url) is None
    PipelinedPool(url)  # no error


@pytest.mark.parametrize(("url", "why"), REFUSED)
def test_other_urls_are_refused_by_the_pipelined_client(url: str, why: str) -> None:
    reason = unsupported_url(url)
    assert reason is not None and why in reason
    assert "secret" not in reason  # the reason is logged: never the URL's password
    with pytest.raises(ValueError, match=why):
        PipelinedPool(url)


@pytest.mark.parametrize(("url", "why"), REFUSED[:3])
async def test_a_connection_is_refused_before_any_traffic(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        await PipelinedConnection.connect(url, timeout_s=0.1)


# (redis-py itself refuses the last one, an unknown scheme.)
@pytest.mark.parametrize(("url", "why"), REFUSED[:-1])
async def test_from_url_falls_back_to_redis_py_and_says_why(
    url: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cache.redis_cache"):
        cache = RedisCache.from_url(url, pipelined_reads=True)
    try:
        assert cache._fast is None, "the pipelined client must not serve " + url
        messages = [r.getMessage() for r in caplog.records if r.name == "cache.redis_cache"]
        assert len(messages) == 1 and "redis-py" in messages[0] and why in messages[0], messages
        assert "secret" not in messages[0]
    finally:
        await cache.close()


@pytest.mark.parametrize("url", PLAIN[:2])
async def test_from_url_keeps_the_pipelined_client_for_plain_tcp(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cache.redis_cache"):
        cache = RedisCache.from_url(url, pipelined_reads=True)
    try:
        assert isinstance(cache._fast, PipelinedPool)
        assert not [r for r in caplog.records if r.name == "cache.redis_cache"]
    finally:
        await cache.close()


async def test_no_pipelined_client_when_switched_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cache.redis_cache"):
        cache = RedisCache.from_url("rediss://localhost:6380", pipelined_reads=False)
    try:
        assert cache._fast is None
        assert not caplog.records  # nothing to explain: it was not asked for
    finally:
        await cache.close()
