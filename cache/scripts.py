"""The Lua scripts of the serving copy, one file each in cache/lua/, read once at import.

The text is sent as is: its SHA1 is what EVALSHA names, so the files are never reformatted.
"""

from __future__ import annotations

from importlib import resources


def _load(name: str) -> str:
    return resources.files("cache").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


# KEYS: the user's bucket meta, the user.  ARGV: the lowest live score, the user id.
# While a rebuild is under way, a user at or below its `rebuilt_to` mark is answered
# too: the rebuild has written that user since the bucket was last emptied.
READ = _load("read")

# KEYS: ARGV[2] bucket metas, then user keys.  ARGV: the lowest live score, the number
# of metas, the highest user id asked.  Answers the newest registry version among the
# buckets, then one list per user.  Standalone: one call for a whole batch; Redis
# Cluster: one call per bucket.
READ_MANY = _load("read_many")

# KEYS[1]: a customer's count key.  ARGV: version, pexpireat-ms, then promo/end pairs.
WRITE_COUNTS = _load("write_counts")

# KEYS: the customer's bucket meta, the customer's key.  ARGV: the lowest live end.
COUNT_SYNCED = _load("count_synced")

# KEYS: users (one slot on a cluster).  ARGV, per user: pexpireat-ms (0: persist), the
# number n of ZADD arguments, then those n: first -version/"v", then the memberships'
# score/member pairs.  A user's set is replaced only by a newer version.  Many users a
# call: one call per user cost a cache rebuild more in call overhead (a future, a timer,
# a reply each) than the writes themselves.  The version goes in the same ZADD as the
# memberships and DEL only runs for an existing key, which cut Valkey's own time a user.
WRITE_USERS = _load("write_users")

# KEYS: user keys.  The version each holds (its 'v' score, negated), false for no key.
VERSIONS = _load("versions")

# KEYS: meta, registry.  ARGV: version, then id/entry pairs.
WRITE_REGISTRY = _load("write_registry")

# KEYS: meta, registry.  The version and the entries, read atomically.
READ_REGISTRY = _load("read_registry")

# KEYS: a bucket meta.  ARGV: registry version.  Only ever moves forward.
BUMP_REGISTRY = _load("bump_registry")

# KEYS: a bucket meta.  ARGV: the previous rebuild's generation ('' if none), this
# rebuild's.  The bucket passes to this rebuild; it keeps the previous rebuild's
# `rebuilt_to` mark only if it still holds that rebuild's `building` (no flush or
# restart since), so an interrupted rebuild's work is not done twice.
TAKE_BUCKET = _load("take_bucket")

# KEYS: a bucket meta.  ARGV: generation.  A bucket whose shard was flushed or
# restarted since begin_rebuild has lost `building` and stays incomplete.
MARK_BUCKET = _load("mark_bucket")

# KEYS: a bucket meta.  ARGV: generation, the highest user id written so far.  Only
# while the bucket still holds this rebuild's `building`: after a flush the users
# written before it are gone, so the mark must not come back.
MARK_PROGRESS = _load("mark_progress")

# KEYS: meta, lease.  ARGV: generation, the servers' run ids, '1' to mark complete
# (else only end the rebuild: some bucket was lost on the way).
FINISH_REBUILD = _load("finish_rebuild")

# KEYS: lease.  ARGV: generation.
RELEASE_LEASE = _load("release_lease")

# KEYS: lease.  ARGV: generation, lease-ms.
RENEW_LEASE = _load("renew_lease")

# Every script by file name, for the check that each file ships and is non-empty.
ALL = {
    "read": READ,
    "read_many": READ_MANY,
    "write_counts": WRITE_COUNTS,
    "count_synced": COUNT_SYNCED,
    "write_users": WRITE_USERS,
    "versions": VERSIONS,
    "write_registry": WRITE_REGISTRY,
    "read_registry": READ_REGISTRY,
    "bump_registry": BUMP_REGISTRY,
    "take_bucket": TAKE_BUCKET,
    "mark_bucket": MARK_BUCKET,
    "mark_progress": MARK_PROGRESS,
    "finish_rebuild": FINISH_REBUILD,
    "release_lease": RELEASE_LEASE,
    "renew_lease": RENEW_LEASE,
}
