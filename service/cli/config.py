"""The configuration check every command runs before it starts (exit code 2 on a
finding)."""

from __future__ import annotations

from service.settings import ENV_PREFIX, Settings

# The settings each command cannot run without (checked before anything starts, so a
# missing one is exit code 2 with a message, not a traceback).
_NEEDS: dict[str, tuple[str, ...]] = {
    "serve": ("database_url", "redis_url"),
    "reconcile": ("database_url", "redis_url"),
    "rebuild": ("database_url", "redis_url"),
    "consume": ("database_url", "redis_url", "kafka_bootstrap"),
    "migrate": ("database_url",),
    "produce-sample": ("kafka_bootstrap",),
}


def config_errors(settings: Settings, command: str) -> list[str]:
    """What is wrong with ``settings`` for running ``command``; empty when nothing is."""
    from service.domain.rules import MAX_LIST_ITEMS
    from service.http.middleware import parse_access_log, parse_tokens

    errors = []
    if not 1 <= settings.max_list_length <= MAX_LIST_ITEMS:
        # The API's schemas refuse longer lists before the setting is ever consulted.
        errors.append(f"{ENV_PREFIX}MAX_LIST_LENGTH must be within 1..{MAX_LIST_ITEMS}")
    if settings.sync_threshold < 1:
        errors.append(f"{ENV_PREFIX}SYNC_THRESHOLD must be at least 1")
    positive = (
        "sync_deadline_s",
        "cp_timeout_s",
        "cp_rate_limit_per_s",
        "db_acquire_timeout_s",
        "probe_timeout_s",
    )
    for name in positive:
        if not getattr(settings, name) > 0:
            errors.append(f"{ENV_PREFIX}{name.upper()} must be greater than 0")
    if not 0 <= settings.sync_horizon_days <= 3650:
        # Past ~10 years an end_date is a typo, and far dates overflow expiry arithmetic.
        errors.append(f"{ENV_PREFIX}SYNC_HORIZON_DAYS must be within 0..3650")
    missing = [
        ENV_PREFIX + name.upper() for name in _NEEDS.get(command, ()) if not getattr(settings, name)
    ]
    if missing:
        errors.append(f"{', '.join(missing)} must be set for `segments {command}`")
    try:
        parse_tokens(settings.auth_tokens)
    except ValueError as exc:  # msgspec's decode errors are ValueErrors too
        errors.append(f"{ENV_PREFIX}AUTH_TOKENS: {exc}")
    try:
        parse_access_log(settings.access_log, settings.access_log_slow_ms)
    except ValueError as exc:
        errors.append(str(exc))
    return errors
