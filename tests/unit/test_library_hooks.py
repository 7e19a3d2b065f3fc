"""The private parts of libraries that the service relies on, one test per hook.

pyproject.toml pins aiohttp and prometheus-client to the minor versions tested here.  When
an upgrade changes one of these internals, the test of that hook fails with a message
naming the hook, the library version and the code that uses it, rather than the service
failing somewhere far away (a front door silently bypassed, metrics silently wrong).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from importlib import metadata

import aiohttp
import prometheus_client
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.http.serving import FRONT_DOOR, HOT_ROUTE, ApiRunner, FrontDoor

AIOHTTP = f"aiohttp {metadata.version('aiohttp')}"
PROMETHEUS = f"prometheus-client {metadata.version('prometheus-client')}"


def broken(library: str, hook: str, user: str, what: str) -> str:
    return (
        f"{library}: the hook {hook} broke ({what}); {user} relies on it. Keep the tested "
        "version pinned in pyproject.toml, or adapt that code and this test."
    )


# --- aiohttp: AppRunner._make_server and Server.request_handler --------------------------

SERVING = "service/http/serving.py (ApiRunner, the front door of the hot read)"


def test_aiohttp_runner_builds_its_server_in_make_server() -> None:
    hook = "web.AppRunner._make_server"
    made = getattr(web.AppRunner, "_make_server", None)
    if made is None or not inspect.iscoroutinefunction(made):
        pytest.fail(broken(AIOHTTP, hook, SERVING, "no such coroutine method"))
    setup = inspect.getsource(web.BaseRunner.setup)
    if "self._make_server()" not in setup:
        pytest.fail(broken(AIOHTTP, hook, SERVING, "BaseRunner.setup no longer calls it"))


async def test_aiohttp_server_takes_its_request_handler_from_the_attribute() -> None:
    hook = "web.Server.request_handler"

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()

    server = web.Server(handler)
    if getattr(server, "request_handler", None) is not handler:
        pytest.fail(broken(AIOHTTP, hook, SERVING, "the handler is not kept in that attribute"))


async def test_aiohttp_requests_go_through_the_replaced_request_handler() -> None:
    """End to end: ApiRunner puts the front door in front of the app."""
    served_by: list[str] = []

    async def door_read(user_id: str) -> web.StreamResponse:
        served_by.append("door")
        return web.Response(text=f"door {user_id}")

    async def app_read(request: web.Request) -> web.StreamResponse:
        served_by.append("app")
        return web.Response(text="app")

    app = web.Application()
    app.router.add_get(HOT_ROUTE, app_read)
    app.router.add_get("/other", app_read)
    app[FRONT_DOOR] = FrontDoor([], door_read)
    runner = ApiRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async with http.get("/v1/users/7/segments") as r:
                hot = (r.status, await r.text())
            async with http.get("/other") as r:
                other = (r.status, await r.text())
    finally:
        await runner.cleanup()
    if hot != (200, "door 7") or served_by[:1] != ["door"]:
        pytest.fail(
            broken(
                AIOHTTP,
                "web.AppRunner._make_server / web.Server.request_handler",
                SERVING,
                f"the hot read was answered {hot} by {served_by[:1]}, not by the front door",
            )
        )
    assert other == (200, "app") and served_by == ["door", "app"], (other, served_by)


# --- prometheus-client: a histogram child's _sum and _buckets, a metric's _name ----------

OBSERVABILITY = "service/observability/bridge.py (RequestMetrics.flush)"
BUCKETS = (0.01, 0.1, 1.0)


def _check_histogram_child_values(registry: CollectorRegistry | None = None) -> str | None:
    """Add to ``_sum`` and ``_buckets`` as RequestMetrics.flush does; the exposition must
    equal that of the same observations made with ``observe``.  Returns what broke."""
    hooked = Histogram("hook_hooked_seconds", "h", ["k"], buckets=BUCKETS, registry=registry)
    observed = Histogram("hook_observed_seconds", "h", ["k"], buckets=BUCKETS, registry=registry)
    seconds = [0.005, 0.01, 0.05, 0.5, 2.0, 2.0]
    child = hooked.labels("x")
    sum_value, buckets = getattr(child, "_sum", None), getattr(child, "_buckets", None)
    if not hasattr(sum_value, "inc"):
        return "Histogram child._sum has no inc()"
    if not isinstance(buckets, list) or len(buckets) != len(BUCKETS) + 1:
        return f"Histogram child._buckets is not a list of {len(BUCKETS) + 1} values (+Inf last)"
    if not all(hasattr(b, "inc") for b in buckets):
        return "Histogram child._buckets holds values without inc()"
    sum_value.inc(sum(seconds))
    per_bucket = [0] * (len(BUCKETS) + 1)
    for s in seconds:
        per_bucket[next(i for i, b in enumerate((*BUCKETS, float("inf"))) if s <= b)] += 1
    for i, n in enumerate(per_bucket):
        if n:
            buckets[i].inc(n)
    for s in seconds:
        observed.labels("x").observe(s)

    def samples(metric: Histogram) -> dict[tuple[str, str], float]:
        (family,) = metric.collect()
        return {
            (s.name.rsplit("_", 1)[-1], s.labels.get("le", "")): s.value
            for s in family.samples
            if not s.name.endswith("_created")
        }

    got, want = samples(hooked), samples(observed)
    if got != want:
        return f"adding to them gives {got}, observe() gives {want}"
    return None


def test_prometheus_histogram_child_sum_and_buckets() -> None:
    problem = _check_histogram_child_values(CollectorRegistry())
    if problem:
        pytest.fail(broken(PROMETHEUS, "Histogram child _sum/_buckets", OBSERVABILITY, problem))


def test_prometheus_histogram_child_sum_and_buckets_in_multiprocess_mode(
    tmp_path: os.PathLike[str],
) -> None:
    """With several API workers (PROMETHEUS_MULTIPROC_DIR) the values are mmap files;
    ``/metrics`` adds up every worker's files.  prometheus-client picks its value class
    at import, hence a fresh interpreter."""
    script = textwrap.dedent(
        """
        import sys
        from prometheus_client import CollectorRegistry, multiprocess
        from tests.unit.test_library_hooks import _check_histogram_child_values
        problem = _check_histogram_child_values()  # the default registry: as in the service
        if problem is None:
            # What /metrics reads: the workers' files, added up.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            got = {s.name: s.value for m in registry.collect() for s in m.samples
                   if s.name.startswith("hook_hooked_seconds") and s.name.endswith("_sum")}
            if abs(got.get("hook_hooked_seconds_sum", 0) - 4.565) > 1e-9:
                problem = f"the workers' files hold {got}, not the sum 4.565"
        sys.exit(problem)
        """
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    # Our own interpreter running a fixed script.
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    if done.returncode:
        pytest.fail(
            broken(
                PROMETHEUS,
                "Histogram child _sum/_buckets (multiprocess values)",
                OBSERVABILITY,
                (done.stderr or done.stdout).strip()[-800:],
            )
        )


def test_prometheus_metric_name_attribute() -> None:
    """``metric._name`` is the family name that collect() reports (``_total`` dropped),
    which the per-process exposition filters the workers' families by."""
    registry = CollectorRegistry()
    metrics = [
        Counter("hook_things_total", "c", registry=registry),
        Gauge("hook_level", "g", registry=registry),
        Histogram("hook_wait_seconds", "h", registry=registry),
    ]
    for metric in metrics:
        name = getattr(metric, "_name", None)
        (family,) = metric.collect()
        if name != family.name:
            pytest.fail(
                broken(
                    PROMETHEUS,
                    f"{type(metric).__name__}._name",
                    "service/observability/exposition.py (metrics_text)",
                    f"{name!r}, while collect() reports the family {family.name!r}",
                )
            )


def test_the_pins_cover_the_tested_versions() -> None:
    """The versions running these tests are the minor versions pyproject.toml allows."""
    from tests.unit.test_build import pyproject_requirement

    for dist, module in (("aiohttp", aiohttp), ("prometheus-client", prometheus_client)):
        requirement = pyproject_requirement(dist)
        assert requirement.specifier.contains(metadata.version(dist)), (dist, requirement)
        # An upper bound below the next minor: an upgrade is a deliberate change.
        assert any(s.operator == "<" for s in requirement.specifier), requirement
        assert module is not None
