"""What every part of the serving copy shares: the clients, the error mapping and the
script calls (pipelined on a standalone server, concurrent per shard on a cluster)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import redis.asyncio as redis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from cache import keys, scripts
from cache.pipelined import PipelinedPool
from service.domain.errors import CacheUnavailable

_ERRORS = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    # Redis Cluster: a shard down or its slots moving while the client catches up.
    redis_errors.ClusterError,
    redis_errors.RedisClusterException,
    redis_errors.TryAgainError,
    OSError,
    TimeoutError,
)


# redis-py's asyncio cluster client can fail with AttributeError while a shard
# restarts (a connection's writer torn down under a concurrent call: seen in
# tests/cluster; redis/redis-py#3835 and #3815 are the same family).  On a cluster only,
# those count as "Redis unavailable" so the read falls back to PostgreSQL.
_CLUSTER_CLIENT_FAULTS = (AttributeError,)


def _text(value: str | bytes) -> str:
    """A reply as text: bytes unless the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


@contextlib.asynccontextmanager
async def _guard(errors: tuple[type[BaseException], ...] = _ERRORS) -> AsyncIterator[None]:
    try:
        yield
    except errors as exc:
        raise CacheUnavailable(str(exc) or type(exc).__name__) from exc


Client = redis.Redis | RedisCluster

# Extra connections (per shard on a cluster) beyond the script calls in flight, for the
# few plain commands (markers, lease, reconciler figures) that take no permit.
_SPARE_CONNECTIONS = 16


class CacheBase:
    """The clients and the script calls; the parts of ``RedisCache`` build on it."""

    def __init__(
        self, client: Client, fast: PipelinedPool | None = None, pool_size: int = 64
    ) -> None:
        self._r = client
        self._cluster = isinstance(client, RedisCluster)
        # redis-py's pools fail a call at once when all their connections are busy
        # (MaxConnectionsError: CI saw it on the cluster when a rebuild's concurrent
        # bucket calls met a test's reads), and the reader would go to PostgreSQL.
        # Script calls therefore wait for one of ``pool_size`` permits, the pools hold
        # a few connections more, and a bulk operation takes at most half the permits,
        # so reads keep moving during a rebuild.  (redis-py's BlockingConnectionPool
        # would wait too, on a standalone server only, and cost batch-read throughput.)
        self._in_flight = asyncio.Semaphore(pool_size)
        self._bulk_width = max(1, pool_size // 2)
        self._errors = _ERRORS + _CLUSTER_CLIENT_FAULTS if self._cluster else _ERRORS
        self._fast = fast
        self._read = client.register_script(scripts.READ)
        self._write_users = client.register_script(scripts.WRITE_USERS)
        self._write_registry = client.register_script(scripts.WRITE_REGISTRY)
        self._read_registry = client.register_script(scripts.READ_REGISTRY)
        self._bump_registry = client.register_script(scripts.BUMP_REGISTRY)
        self._take_bucket = client.register_script(scripts.TAKE_BUCKET)
        self._mark_bucket = client.register_script(scripts.MARK_BUCKET)
        self._mark_progress = client.register_script(scripts.MARK_PROGRESS)
        self._finish = client.register_script(scripts.FINISH_REBUILD)
        self._renew = client.register_script(scripts.RENEW_LEASE)
        self._release = client.register_script(scripts.RELEASE_LEASE)
        self._count_synced = client.register_script(scripts.COUNT_SYNCED)
        self._write_counts = client.register_script(scripts.WRITE_COUNTS)
        self._read_many = client.register_script(scripts.READ_MANY)
        self._versions = client.register_script(scripts.VERSIONS)

    async def start(self) -> None:
        """Open the pipelined read connection.  A Redis that is down now is not an
        error: reads fall back to PostgreSQL and the pool reconnects by itself."""
        if self._fast is not None:
            with contextlib.suppress(redis_errors.ConnectionError, redis_errors.TimeoutError):
                await self._fast.connect()

    async def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        await self._r.aclose()

    async def ping(self) -> bool:
        try:
            async with _guard(self._errors):
                return bool(await self._r.ping())
        except CacheUnavailable:
            return False

    async def _call(
        self, script: AsyncScript, call_keys: Sequence[str], call_args: Sequence[Any] = ()
    ) -> Any:
        """Run a script by its hash; a server that forgot it (restarted) gets the text
        through EVAL, which also caches it there.  (redis-py's own reload sends SCRIPT
        LOAD to every master of a cluster, which failed while one was restarting.)"""
        async with self._in_flight:
            try:
                return await self._r.evalsha(script.sha, len(call_keys), *call_keys, *call_args)
            except redis_errors.NoScriptError:
                text = cast(str, script.script)  # registered from our own str constants
                return await self._r.eval(text, len(call_keys), *call_keys, *call_args)

    async def _script_calls(
        self, script: AsyncScript, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
    ) -> list[Any]:
        """One script over many key sets, pipelined.  A server that forgot its scripts
        (restarted) gets them loaded, then the calls are sent once more: they are
        idempotent.  redis-py refuses scripts in cluster pipelines, so on a cluster the
        calls go concurrently instead, each routed to its slot's shard."""
        if self._cluster:
            limit = asyncio.Semaphore(self._bulk_width)

            async def call(call_keys: Sequence[str], call_args: Sequence[Any]) -> Any:
                async with limit:
                    return await self._call(script, call_keys, call_args)

            return list(await asyncio.gather(*(call(k, a) for k, a in calls)))
        for attempt in (1, 2):
            try:
                async with self._in_flight, self._r.pipeline(transaction=False) as pipe:
                    for call_keys, call_args in calls:
                        pipe.evalsha(script.sha, len(call_keys), *call_keys, *call_args)
                    return list(await pipe.execute())
            except redis_errors.NoScriptError:
                if attempt == 2:
                    raise
                await self._r.script_load(script.script)
        raise AssertionError("unreachable")

    async def _each_bucket(self, script: AsyncScript, args: Sequence[Any]) -> list[Any]:
        return await self._script_calls(script, [((meta,), args) for meta in keys.BUCKET_METAS])

    async def _on_every_meta(self, command: str, *args: Any) -> None:
        """One single-key hash command on the global meta and every bucket meta, in one
        pipeline (per shard on a cluster)."""
        async with self._r.pipeline(transaction=False) as pipe:
            for meta in keys.ALL_METAS:
                pipe.execute_command(command, meta, *args)
            await pipe.execute()

    async def _run_ids(self) -> str:
        """The run id of every server (every master on a cluster): any restart changes it."""
        if isinstance(self._r, RedisCluster):
            infos = await self._r.info("server", target_nodes=RedisCluster.PRIMARIES)
            return ",".join(sorted(str(info["run_id"]) for info in infos.values()))
        info = await self._r.info("server")
        return str(info["run_id"])
