"""The API's own read latency (segments_http_request_seconds, from the handler's start
to its answer): the service without the generator and the kernel's queues."""

from __future__ import annotations

import math
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from service.http.serving import HOT_ROUTE


@dataclass(frozen=True)
class ServedLatency:
    """A window of the API's read-latency histogram: cumulative counts per bucket bound."""

    counts: dict[float, float]

    def minus(self, earlier: ServedLatency) -> ServedLatency:
        return ServedLatency({b: c - earlier.counts.get(b, 0.0) for b, c in self.counts.items()})

    def share_within(self, seconds: float) -> float:
        total = self.counts.get(math.inf, 0.0)
        return self.counts.get(seconds, 0.0) / total if total else 0.0

    def quantile_bound_ms(self, q: float) -> float:
        """The smallest bucket bound holding at least ``q`` of the reads (an upper bound
        of that quantile: the histogram has no finer resolution)."""
        total = self.counts.get(math.inf, 0.0)
        for bound in sorted(self.counts):
            if total and self.counts[bound] >= q * total:
                return bound * 1000
        return math.inf


async def served_latency(port: int) -> ServedLatency:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as r,
    ):
        text = await r.text()
    counts: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "segments_http_request_seconds":
            continue
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name.endswith("_bucket")
                and labels.get("method") == "GET"
                and labels.get("route") == HOT_ROUTE
                and labels.get("status_class") == "2xx"
            ):
                counts[float(labels["le"])] = sample.value
    return ServedLatency(counts)
