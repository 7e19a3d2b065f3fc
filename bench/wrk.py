"""Run wrk against a URL and parse requests/s and latency percentiles."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

USER_SCRIPT = """
math.randomseed(%(seed)d)
local headers = %(headers)s
request = function()
  return wrk.format("GET", "/v1/users/" .. math.random(1, %(users)d) .. "/segments", headers)
end
"""


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int = 0  # completed in the run (wrk's "N requests in")


def ensure_wrk() -> str:
    """wrk comes from Debian's packages; install it when missing (the bench only)."""
    path = shutil.which("wrk")
    if path is None:
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
        path = shutil.which("wrk")
    assert path is not None
    return path


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise RuntimeError(f"unexpected wrk latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def run_script(
    script: str, url: str, *, seconds: int, connections: int = 64, threads: int = 1
) -> WrkResult:
    """Run wrk with a Lua ``script`` against ``url`` and parse what it prints."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(  # nosec B603: our own wrk, fixed arguments
            [
                ensure_wrk(),
                f"-t{threads}",
                f"-c{connections}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                f.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(f.name)
    return parse(out)


def parse(out: str) -> WrkResult:
    if "Latency Distribution" not in out:
        raise RuntimeError(f"wrk gave no latency figures:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"Socket errors:.*?timeout (\d+)", out))
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return WrkResult(rps, p50, p99, errors, requests)


def lua_headers(headers: dict[str, str]) -> str:
    """``headers`` as a Lua table constructor, for a wrk script."""
    quoted = (f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items())
    return "{" + ", ".join(quoted) + "}"


def _lua_string(text: str) -> str:
    if not (text.isascii() and text.isprintable()):
        raise ValueError(f"not a plain ASCII header text: {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(
    url: str,
    *,
    users: int,
    seconds: int = 10,
    connections: int = 64,
    threads: int = 1,
    headers: dict[str, str] | None = None,
) -> WrkResult:
    """Random single-user reads over ``users`` ids, each with ``headers``."""
    script = USER_SCRIPT % {"seed": 7, "users": users, "headers": lua_headers(headers or {})}
    return run_script(script, url, seconds=seconds, connections=connections, threads=threads)
