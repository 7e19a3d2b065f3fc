"""Request metrics recorded in plain numbers reach prometheus-client exactly as if each
request had called Counter.inc and Histogram.observe itself."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from service.observability import (
    LATENCY,
    LATENCY_BUCKETS,
    REQUESTS,
    RequestMetrics,
    flush_request_metrics,
    status_class,
)

# On, just under and just over bucket bounds, and past the last one.
SECONDS = [0.0, 0.0005, 0.00051, 0.001, 0.0042, 0.01, 0.3, 1.0, 5.0, 7.5, 0.0001, 0.002]


def samples(route: str) -> dict[tuple[str, str, str], float]:
    """Every sample of the two request metrics for ``GET route``, by (name, status or
    status class, le)."""
    out = {}
    for metric in REGISTRY.collect():
        for s in metric.samples:
            if s.labels.get("route") == route and s.name.startswith("segments_http_request"):
                status = s.labels.get("status") or s.labels["status_class"]
                out[(s.name, status, s.labels.get("le", ""))] = s.value
    return out


def test_flushed_metrics_equal_per_request_prometheus_calls() -> None:
    recorded = RequestMetrics("GET", "/t/recorded")
    for i, seconds in enumerate(SECONDS):
        status = 404 if i % 5 == 0 else 200
        recorded.record(status, seconds)
        REQUESTS.labels("GET", "/t/direct", str(status)).inc()
        LATENCY.labels("GET", "/t/direct", status_class(status)).observe(seconds)
    # Nothing before a flush.
    assert samples("/t/recorded") == {}
    flush_request_metrics()
    flush_request_metrics()  # a second flush adds nothing
    got, want = samples("/t/recorded"), samples("/t/direct")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key
    # The counter by exact status, the histogram by status class; no _created series.
    assert got[("segments_http_requests_total", "200", "")] == 9
    assert got[("segments_http_requests_total", "404", "")] == 3
    assert got[("segments_http_request_seconds_bucket", "2xx", "+Inf")] == 9
    assert got[("segments_http_request_seconds_bucket", "4xx", "+Inf")] == 3
    assert len([k for k in got if k[0].endswith("_bucket")]) == 2 * (len(LATENCY_BUCKETS) + 1)
    assert not [k for k in got if k[0].endswith("_created")]


def test_statuses_of_one_class_share_a_latency_child() -> None:
    recorded = RequestMetrics("POST", "/t/classes")
    for status in (200, 201, 204, 503, 500):
        recorded.record(status, 0.003)
    flush_request_metrics()
    got = samples("/t/classes")
    assert got[("segments_http_request_seconds_count", "2xx", "")] == 3
    assert got[("segments_http_request_seconds_count", "5xx", "")] == 2
    assert {k[1] for k in got if k[0] == "segments_http_requests_total"} == {
        "200",
        "201",
        "204",
        "500",
        "503",
    }
