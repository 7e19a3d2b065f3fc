"""The metrics of a running stack, as an SRE sees them: `segments serve`, `segments
consume` and `segments reconcile` as processes on the session's stores, each exposing
its own families; the Grafana dashboard's metrics exist on them; and a real Prometheus
(Debian's `prometheus` binary, on loopback) scrapes the three and loads the alert rules.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from devstack import free_port
from service.observability import API, CONSUMER, FAMILIES, RECONCILER
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "segments.json"
JOBS = {API: "segments-api", CONSUMER: "segments-consumer", RECONCILER: "segments-reconciler"}
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


@dataclass
class Stack:
    ports: dict[str, int]  # process kind -> port of its /metrics
    logs: Path

    def url(self, process: str) -> str:
        return f"http://127.0.0.1:{self.ports[process]}/metrics"

    def tail(self) -> str:
        return "\n".join(
            f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            for log in sorted(self.logs.glob("*.log"))
        )


def _get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body: bytes = r.read()
        return body


@pytest.fixture(scope="module")
def observed(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The three processes, each on its own port, until every /metrics answers."""
    logs = tmp_path_factory.mktemp("observed")
    ports = {kind: free_port() for kind in (API, CONSUMER, RECONCILER)}
    topic = f"observed-{uuid.uuid4().hex[:8]}"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SEGMENTS_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env |= {
        "SEGMENTS_DATABASE_URL": settings.database_url,
        "SEGMENTS_REDIS_URL": settings.redis_url,
        "SEGMENTS_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SEGMENTS_KAFKA_TOPIC": topic,
        "SEGMENTS_KAFKA_DLQ_TOPIC": f"{topic}.dlq",
        "SEGMENTS_KAFKA_GROUP": topic,
        "SEGMENTS_CP_URL": settings.cp_url,
        "SEGMENTS_LOG_JSON": "false",
        "SEGMENTS_LOG_LEVEL": "WARNING",
    }
    commands = {
        API: (["serve", "--port", str(ports[API])], {}),
        CONSUMER: (["consume"], {"SEGMENTS_METRICS_PORT": str(ports[CONSUMER])}),
        RECONCILER: (["reconcile"], {"SEGMENTS_METRICS_PORT": str(ports[RECONCILER])}),
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for kind, (args, extra) in commands.items():
            with (logs / f"{kind}.log").open("wb") as err:
                # Our own interpreter and module, fixed arguments.
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "service.cli", *args],
                        env={**env, **extra},
                        stdin=subprocess.DEVNULL,
                        stdout=err,
                        stderr=err,
                    )
                )
        found = Stack(ports, logs)
        deadline = time.monotonic() + 30
        for kind in ports:
            while True:
                try:
                    _get(found.url(kind), timeout=2)
                    break
                except OSError:
                    assert all(p.poll() is None for p in procs), found.tail()
                    assert time.monotonic() < deadline, f"{kind}: no /metrics\n{found.tail()}"
                    time.sleep(0.2)
        # Some traffic for the API's request metrics: a read, a 404 and a 422.
        base = f"http://127.0.0.1:{ports[API]}"
        for path in ("/v1/users/1/segments", "/no/such/route", "/v1/segments/bad%20slug"):
            with contextlib.suppress(urllib.error.HTTPError):
                _get(base + path)
        yield found
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _sample_names(family: Any) -> set[str]:
    """The names a family's samples have (or would have: a labelled family without
    children yet declares only its name and type)."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_count", "_sum"),
        "summary": ("_count", "_sum"),
    }.get(family.type, ("",))
    return {s.name for s in family.samples} | {family.name + s for s in suffixes}


def test_each_process_exposes_its_own_families(observed: Stack) -> None:
    version = metadata.version("user-segments")
    for kind in (API, CONSUMER, RECONCILER):
        text = _get(observed.url(kind)).decode()
        families = _families(text)
        ours = {name for name in families if name.startswith("segments_")}
        assert ours == {m._name for m in FAMILIES[kind]}, kind
        samples = [s for f in families.values() for s in f.samples]
        assert not [s.name for s in samples if s.name.endswith("_created")], kind
        (info,) = families["segments_build_info"].samples
        assert info.value == 1 and info.labels["version"] == version, info
        assert {"python", "aiohttp", "asyncpg", "redis"} <= set(info.labels)
        # The process's own collectors too (CPU, memory), outside multiprocess mode.
        assert "process_cpu_seconds" in families, kind
    api = _families(_get(observed.url(API)).decode())
    latency = [s for s in api["segments_http_request_seconds"].samples]
    assert latency and all("status" not in s.labels for s in latency)
    assert {s.labels["status_class"] for s in latency} >= {"2xx", "4xx"}
    statuses = {s.labels["status"] for s in api["segments_http_requests"].samples}
    assert {"200", "404"} <= statuses
    reconciler = _families(_get(observed.url(RECONCILER)).decode())
    assert reconciler["segments_cache_divergence_found"].type == "counter"
    outboxes = {s.labels["outbox"] for s in reconciler["segments_outbox_rows"].samples}
    assert outboxes == {"cache", "counter"}


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_expositions_pass_promtool_check_metrics(observed: Stack) -> None:
    for kind in (API, CONSUMER, RECONCILER):
        assert PROMTOOL is not None
        # A fixed tool; the input is our own exposition.
        done = subprocess.run(
            [PROMTOOL, "check", "metrics"],
            input=_get(observed.url(kind)),
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 0, (kind, done.stdout.decode() + done.stderr.decode())


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel of the Grafana dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                found.append((inner["title"], target["expr"]))
    return found


# Names a PromQL expression may hold besides metric names.
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset"}
_PROMQL_WORDS |= {"and", "or", "unless", "bool", "inf", "nan"}
# Series Prometheus makes itself, not found on any /metrics.
_SYNTHETIC = {"up"}


def metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression (of the forms the dashboard uses)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\$\w+", "", expr)  # Grafana variables
    names = set()
    for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", expr):
        name, call = match.group(1), match.group(2)
        if not call and name not in _PROMQL_WORDS:
            names.add(name)
    return names


def test_metric_names_are_read_from_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (op, le) (rate(x_bucket{a="b(c)"}[5m])))'
    ) == {"x_bucket"}
    assert metric_names("sum(a) / sum(b offset 10m) > 0 and on() up") == {"a", "b", "up"}


def test_dashboard_metrics_exist_on_the_live_processes(observed: Stack) -> None:
    live: set[str] = set()
    for kind in (API, CONSUMER, RECONCILER):
        for family in _families(_get(observed.url(kind)).decode()).values():
            live |= _sample_names(family)
    expressions = dashboard_expressions()
    assert len(expressions) >= 20
    used: set[str] = set()
    for title, expr in expressions:
        names = metric_names(expr)
        assert names, (title, expr)
        assert names - _SYNTHETIC <= live, (title, names - live)
        used |= names
    # The dashboard covers what the issue asks for.
    for wanted in (
        "segments_http_requests_total",
        "segments_http_request_seconds_bucket",
        "segments_user_reads_total",
        "segments_cache_complete",
        "segments_cache_synchronized_age_seconds",
        "segments_outbox_rows",
        "segments_kafka_consumer_lag",
        "segments_promo_syncs_total",
        "segments_cp_request_seconds_bucket",
        "segments_db_pool_in_use",
        "segments_db_pool_waiting",
        "segments_cache_rebuild_users_written",
    ):
        assert wanted in used, wanted


# -- a real Prometheus ---------------------------------------------------------------------


def _api(base: str, path: str, **params: str) -> Any:
    url = f"{base}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    body = json.loads(_get(url))
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture(scope="module")
def prometheus(observed: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed (make test installs Debian's package as root)")
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": JOBS[kind],
                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            }
            for kind, port in observed.ports.items()
        ],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = work / "prometheus.log"
    with log.open("wb") as out:
        # The system's prometheus binary, fixed arguments, loopback only.
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _get(f"{base}/-/ready", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"not ready:\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _until(what: str, check: Any, within_s: float = 20) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        last = check()
        if last:
            return last
        assert time.monotonic() < deadline, f"{what}: not within {within_s} s"
        time.sleep(0.5)


def _jobs(base: str, query: str) -> set[str]:
    return {r["metric"].get("job", "") for r in _api(base, "query", query=query)["result"]}


def test_prometheus_scrapes_every_process(prometheus: str, observed: Stack) -> None:
    def all_up() -> bool:
        targets = _api(prometheus, "targets")["activeTargets"]
        return len(targets) == 3 and all(t["health"] == "up" for t in targets)

    _until("every target up", all_up)
    everyone = set(JOBS.values())
    _until("build info of all three", lambda: _jobs(prometheus, "segments_build_info") == everyone)
    expected = {
        "segments_http_requests_total": {JOBS[API]},
        'segments_http_request_seconds_bucket{status_class="2xx"}': {JOBS[API]},
        "segments_user_reads_total": {JOBS[API]},
        "segments_kafka_messages_applied_total": {JOBS[CONSUMER]},
        "segments_cache_divergence_found_total": {JOBS[RECONCILER]},
        "segments_outbox_oldest_age_seconds": {JOBS[RECONCILER]},
        "segments_cache_complete": {JOBS[API], JOBS[RECONCILER]},
        "segments_cache_rebuild_users_written": {JOBS[API], JOBS[RECONCILER]},
        "segments_db_pool_waiting": everyone,
        "segments_db_pool_in_use": everyone,
        '{__name__=~"segments_kafka_.+"}': {JOBS[CONSUMER]},
        '{__name__=~"segments_http_.+"}': {JOBS[API]},
    }
    for query, jobs in expected.items():
        _until(query, lambda q=query, j=jobs: _jobs(prometheus, q) == j, within_s=10)  # type: ignore[misc]
    assert _jobs(prometheus, '{__name__=~".+_created"}') == set()


def test_prometheus_loads_the_alert_rules(prometheus: str) -> None:
    names = {
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
    }

    def evaluated() -> list[dict[str, Any]]:
        rules = [r for g in _api(prometheus, "rules")["groups"] for r in g["rules"]]
        done = all(r["lastEvaluation"] > "2000" for r in rules)
        return rules if rules and done else []

    rules = _until("every rule evaluated once", evaluated)
    assert {r["name"] for r in rules} == names
    assert all(r["type"] == "alerting" for r in rules)
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []


def test_dashboard_expressions_evaluate_in_prometheus(prometheus: str) -> None:
    for title, expr in dashboard_expressions():
        query = expr.replace("$namespace", ".*").replace("$__rate_interval", "1m")
        _api(prometheus, "query", query=query)  # asserts status success
        assert title
