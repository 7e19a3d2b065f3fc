"""The membership rules, in one place.

Every entry point (HTTP handlers, the Kafka consumer, the reconciler) goes through
these functions, so a rule changes here or nowhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import mmh3

from service.domain.errors import InvalidRequest
from service.domain.model import AddItem, Registry, UserChange

SLUG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
# The pattern as error messages quote it (without the anchors).
SLUG_SHAPE = SLUG_PATTERN.removeprefix("^").removesuffix("$")
# fullmatch, because `$` also matches before a trailing newline.
_SLUG_RE = re.compile(SLUG_SHAPE)

# User, customer and merchant ids: positive 64-bit integers (PostgreSQL's bigint).
USER_ID_MIN = 1
USER_ID_MAX = 2**63 - 1
# How error messages write that range: in full where the API checks a user id, as
# 2^63-1 where the audience, promo and report rules check theirs (both kept as clients
# have always read them).
ID_RANGE = f"{USER_ID_MIN}..{USER_ID_MAX}"
ID_RANGE_SHORT = "1..2^63-1"

# Items per add / remove list and ids per batch read: the API's schemas refuse more,
# and SEGMENTS_MAX_LIST_LENGTH may only lower it.
MAX_LIST_ITEMS = 1000
# Customer ids in one audience change (an HTTP body or a Kafka message).
MAX_AUDIENCE_IDS = 1_000_000

# Bounds of a membership's time to live.
TTL_MIN_S = 1
TTL_MAX_S = 10 * 366 * 24 * 3600

# Percentages have two decimals: 10,000 buckets.
BUCKETS = 10_000


def is_valid_slug(slug: str) -> bool:
    return _SLUG_RE.fullmatch(slug) is not None


def is_valid_user_id(user_id: int) -> bool:
    return USER_ID_MIN <= user_id <= USER_ID_MAX


def bad_id(field: str, value: object, id_range: str = ID_RANGE) -> InvalidRequest:
    """The refusal of an id out of range (``value`` as the client gave it)."""
    return InvalidRequest(f"{field} must be an integer in {id_range}", {field: value})


def check_id(value: int, field: str, id_range: str = ID_RANGE) -> int:
    """``value`` if it is a valid user, customer or merchant id, else ``bad_id``."""
    if not USER_ID_MIN <= value <= USER_ID_MAX:
        raise bad_id(field, value, id_range)
    return value


def check_slug(value: str, field: str) -> str:
    """``value`` if it is a valid slug (segment, segment type, promo id)."""
    if not is_valid_slug(value):
        raise InvalidRequest(f"{field} must match {SLUG_SHAPE}", {field: value})
    return value


def check_text(value: str, field: str, max_length: int = 1000) -> None:
    """Free text we store: bounded, and without U+0000 (PostgreSQL cannot hold it)."""
    if len(value) > max_length or "\x00" in value:
        raise InvalidRequest(
            f"{field} must be at most {max_length} characters, without NUL", {"field": field}
        )


def percent_to_bp(percent: float) -> int:
    """0..100 with at most two decimals -> basis points 0..10000."""
    bp = round(percent * 100)
    if not 0 <= bp <= BUCKETS or abs(bp - percent * 100) > 1e-6:
        raise InvalidRequest(
            "auto_percent must be between 0 and 100 with at most two decimals",
            {"auto_percent": percent},
        )
    return bp


def bucket(segment_id: int, user_id: int) -> int:
    """The user's bucket (0..9999) for a percentage segment.

    MurmurHash3 x86 32-bit, seed 0, of the UTF-8 string ``"{segment_id}:{user_id}"``
    (decimal, no padding), read as unsigned, modulo 10,000.  It is stable across
    processes, hosts and Python versions (unlike ``hash()``), and any service can
    reproduce it.  A user is in a segment of ``auto_bp`` basis points when
    ``bucket < auto_bp``, so raising the share only ever adds users.
    """
    return mmh3.hash(f"{segment_id}:{user_id}", 0, signed=False) % BUCKETS


def validate_change(
    user_id: int,
    add: Sequence[AddItem],
    remove: Sequence[str],
    *,
    max_items: int,
) -> UserChange:
    """Check a user's change as a whole; any broken rule rejects all of it."""
    check_id(user_id, "user_id")
    if len(add) > max_items or len(remove) > max_items:
        raise InvalidRequest(f"add and remove hold at most {max_items} items each")
    add_slugs = [item.slug for item in add]
    bad = sorted({s for s in [*add_slugs, *remove] if not is_valid_slug(s)})
    if bad:
        raise InvalidRequest(f"invalid slug(s); a slug matches {SLUG_PATTERN}", {"slugs": bad})
    dup = sorted(_duplicates(add_slugs) | _duplicates(remove))
    if dup:
        raise InvalidRequest("a slug appears twice in the same list", {"slugs": dup})
    both = sorted(set(add_slugs) & set(remove))
    if both:
        raise InvalidRequest("a slug cannot be both added and removed", {"slugs": both})
    return UserChange(user_id=user_id, add=tuple(add), remove=tuple(remove))


def resolve_expiry(
    now: float, ttl_seconds: int | None, expires_at: float | None, slug: str
) -> float | None:
    """Turn an item's ``ttl_seconds`` or ``expires_at`` into an absolute expiry."""
    if ttl_seconds is not None and expires_at is not None:
        raise InvalidRequest("give ttl_seconds or expires_at, not both", {"slug": slug})
    if ttl_seconds is not None:
        if not TTL_MIN_S <= ttl_seconds <= TTL_MAX_S:
            raise InvalidRequest(
                f"ttl_seconds must be in {TTL_MIN_S}..{TTL_MAX_S}",
                {"slug": slug, "ttl_seconds": ttl_seconds},
            )
        return now + ttl_seconds
    if expires_at is not None:
        if expires_at <= now:
            raise InvalidRequest("expires_at must be in the future", {"slug": slug})
        if expires_at - now > TTL_MAX_S:
            raise InvalidRequest("expires_at is more than 10 years away", {"slug": slug})
        return expires_at
    return None


# Users whose percentage rules a registry remembers (a few MB at most).
AUTO_MEMO_USERS = 65_536


def visible_slugs(
    registry: Registry,
    user_id: int,
    member_ids: Iterable[int],
    excluded_ids: Iterable[int] = (),
) -> list[str]:
    """The sorted slugs a user is in: live explicit memberships plus percentage rules.

    ``member_ids`` must already exclude expired memberships.  Ids of deleted segments
    are dropped here, which is what makes a deletion visible to every reader at once.
    """
    segments = registry.segments
    slugs = {segments[sid].slug for sid in member_ids if sid in segments}
    if registry.auto:
        memo = registry.auto_memo
        matched = memo.get(user_id)
        if matched is None:
            matched = _auto_matches(registry, user_id)
            if len(memo) >= AUTO_MEMO_USERS:
                memo.clear()  # a bound, not an LRU: hot users come straight back
            memo[user_id] = matched
        if matched:
            excluded = set(excluded_ids)
            slugs.update(slug for sid, slug in matched if sid not in excluded)
    return sorted(slugs)


def _auto_matches(registry: Registry, user_id: int) -> tuple[tuple[int, str], ...]:
    """The percentage segments (id, slug) ``user_id`` falls in, exclusions aside."""
    # bucket() inlined, with the "{segment_id}:" prefix precomputed (one hash per
    # percentage segment is the cost this memo saves).
    uid = str(user_id)
    hash32 = mmh3.hash
    return tuple(
        (sid, slug)
        for sid, prefix, slug, auto_bp in registry.auto
        if hash32(prefix + uid, 0, False) % BUCKETS < auto_bp
    )


def _duplicates(items: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    dup: set[str] = set()
    for item in items:
        (dup if item in seen else seen).add(item)
    return dup
