"""Requests to the API by urllib, and percentage segments defined for a block."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import orjson

AUTO_SEGMENTS = 20


def call(port: int, method: str, path: str, token: str, body: object = None) -> int:
    """The status of one request to the API on ``port`` (``token`` as a bearer, if any)."""
    data = None if body is None else orjson.dumps(body)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as response:  # nosec B310: loopback
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@contextmanager
def auto_segments(port: int, token: str) -> Iterator[None]:
    """AUTO_SEGMENTS percentage segments (10% each), defined for the block."""
    for i in range(AUTO_SEGMENTS):
        body = {"slug": f"AUTO_{i}", "auto_percent": 10}
        assert call(port, "POST", "/v1/segments", token, body) == 201
    try:
        yield
    finally:
        for i in range(AUTO_SEGMENTS):
            assert call(port, "DELETE", f"/v1/segments/AUTO_{i}", token) == 204
