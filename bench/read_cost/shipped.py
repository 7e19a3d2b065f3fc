"""The API as it ships: its callers' tokens, the settings in force, and its command."""

from __future__ import annotations

import os
import secrets

import orjson

from service.settings import load_settings

# The callers of deploy/kubernetes/secret.yaml and docker-compose.yml, with fresh tokens
# of the length `segments dev` makes.
CALLERS = {
    "analytics": ["read", "write", "reports"],
    "dataeng": ["internal"],
    "mps": ["sync", "read"],
}


def shipped_env(stack_env: dict[str, str], *, open_reads: bool) -> tuple[dict[str, str], str]:
    """The environment of the shipped configuration, and the token the bench reads with
    (the read-only caller's of the deployment files, "mps")."""
    made = {n: secrets.token_urlsafe(24) for n in CALLERS}
    tokens = {n: {"token": made[n], "scopes": s} for n, s in CALLERS.items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGMENTS_")}
    env.update(stack_env)
    env["SEGMENTS_AUTH_TOKENS"] = orjson.dumps(tokens).decode()
    if open_reads:
        env["SEGMENTS_AUTH_OPEN_READS"] = "true"
    return env, made["mps"]


def describe(env: dict[str, str]) -> str:
    settings = load_settings(env)
    callers = len(orjson.loads(settings.auth_tokens))
    reads = "open (no token needed)" if settings.auth_open_reads else "need a bearer token"
    return (
        f"{callers} callers' tokens configured, reads {reads} (each request sends one), "
        f"access log {settings.access_log!r}, log level {settings.log_level}, "
        f"log lines {'JSON' if settings.log_json != 'false' else 'text'} to a file, "
        f"rate limit {'off' if not settings.rate_limit_per_s else settings.rate_limit_per_s}"
    )


def api(port: int, workers: int = 1) -> list[str]:
    return ["-m", "service.cli", "serve", "--port", str(port), "--workers", str(workers)]
