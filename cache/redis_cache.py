"""The Redis (Valkey) serving copy.  The key schema is documented in docs/cache-format.md.

Every read is one round trip: a Lua script checks the completeness marker (or, while a
rebuild runs, its progress mark) and returns the user's unexpired memberships with the
registry version, so a flushed or restarted Redis is noticed on the very next read.

The parts live beside this module: cache/base.py (clients, script calls),
cache/memberships.py (reads, write-through), cache/rebuild.py (lease, progress mark),
cache/counters.py (sync-counter mirror), cache/scan.py (reconciler), cache/lua/ (scripts).
"""

from __future__ import annotations

import logging

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster

from cache.base import _SPARE_CONNECTIONS, Client
from cache.counters import Counters
from cache.memberships import MIN_KEY_TTL_S, Memberships
from cache.pipelined import PipelinedPool, unsupported_url
from cache.rebuild import Rebuild
from cache.scan import Scan
from cache.scripts import READ as _READ

__all__ = ["MIN_KEY_TTL_S", "_READ", "Client", "RedisCache"]

log = logging.getLogger(__name__)


class RedisCache(Memberships, Rebuild, Counters, Scan):
    """The serving copy, on a standalone (or Sentinel) Redis or on a Redis Cluster.

    ``fast``, when given, carries the hot per-user read and user writes (see
    cache/pipelined.py for why); everything else goes through redis-py, whose cluster
    client routes each key to its shard."""

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = 0.25,
        pool_size: int = 64,
        pipelined_reads: bool = True,
        cluster: bool = False,
    ) -> RedisCache:
        if cluster:
            # The pipelined client speaks to one server; on a cluster every call goes
            # through redis-py, which follows the slot map (and MOVED/ASK redirects).
            return cls(
                RedisCluster.from_url(
                    url,
                    socket_timeout=timeout_s,
                    socket_connect_timeout=timeout_s,
                    max_connections=pool_size + _SPARE_CONNECTIONS,
                ),
                pool_size=pool_size,
            )
        client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=pool_size + _SPARE_CONNECTIONS,
            # Fail fast: the caller falls back to PostgreSQL instead of retrying here.
            retry_on_timeout=False,
        )
        fast = None
        if pipelined_reads:
            # Only plain redis:// over TCP: for TLS, unix sockets or URL options every
            # call goes through redis-py, which understands them (cache/pipelined.py).
            reason = unsupported_url(url)
            if reason is None:
                fast = PipelinedPool(url, timeout_s=timeout_s)
            else:
                log.warning("hot reads go through redis-py instead: %s", reason)
        return cls(client, fast, pool_size)
