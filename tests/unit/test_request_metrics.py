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
)

# On, just under and just over bucket bounds, and past the last one.
SECONDS = [0.0, 0.0005, 0.00051, 0.001, 0.0042, 0.01, 0.3, 1.0, 5.0, 7.5, 0.0001, 0.002]


def samples(route: str) -> dict[tuple[str, str], float]:
    """Every sample of the two request metrics for ``GET route``, by (name, le/status)."""
    out = {}
    for metric in REGISTRY.collect():
        for s in metric.samples:
            if s.labels.get("route") == route and s.name.startswith("segments_http_request"):
                out[(s.name, s.labels.get("le") or s.labels.get("status", ""))] = s.value
    return out


def test_flushed_metrics_equal_per_request_prometheus_calls() -> None:
    recorded = RequestMetrics("GET", "/t/recorded")
    for i, seconds in enumerate(SECONDS):
        recorded.record(404 if i % 5 == 0 else 200, seconds)
        REQUESTS.labels("GET", "/t/direct", "404" if i % 5 == 0 else "200").inc()
        LATENCY.labels("GET", "/t/direct").observe(seconds)
    # Not before a flush (the children exist, empty, from the first request on).
    assert samples("/t/recorded")[("segments_http_request_seconds_count", "")] == 0
    flush_request_metrics()
    flush_request_metrics()  # a second flush adds nothing
    got, want = samples("/t/recorded"), samples("/t/direct")
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key[0].endswith("_created"):
            continue
        assert got[key] == pytest.approx(value), key
    assert got[("segments_http_request_seconds_bucket", "+Inf")] == len(SECONDS)
    assert len([k for k in got if k[0].endswith("_bucket")]) == len(LATENCY_BUCKETS) + 1
