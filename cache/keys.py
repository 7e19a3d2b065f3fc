"""Redis key names (the schema is described in docs/cache-format.md).

Per-user and per-customer keys carry a *bucket* (``id % KEY_BUCKETS``) as their hash
tag, and every bucket has its own meta hash under the same tag.  A read script can then
check the completeness marker and read the user in one slot, which Redis Cluster
requires, and a shard that restarts empty loses its buckets' markers together with
their data.  The global keys carry the ``{meta}`` tag so scripts touching several of
them stay in one slot.
"""

from __future__ import annotations

# Hash-tag buckets of the keys, not the percentage rule's 10,000 buckets
# (service/domain/rules.py): a power of two well above any sensible shard count, so
# buckets spread evenly over the masters; small enough that marking every bucket is
# one cheap pipeline.
KEY_BUCKETS = 1024

META = "seg:{meta}"
REGISTRY = "seg:{meta}:registry"
REBUILD_LEASE = "seg:{meta}:rebuild-lease"


def bucket_meta(bucket: int) -> str:
    """A bucket's completeness marker and registry version."""
    return f"seg:{{{bucket}}}:m"


BUCKET_METAS = tuple(bucket_meta(b) for b in range(KEY_BUCKETS))
ALL_METAS = (META, *BUCKET_METAS)


def meta_of(entity_id: int) -> str:
    """The meta hash of the bucket holding a user's or customer's key."""
    return BUCKET_METAS[entity_id % KEY_BUCKETS]


def user(user_id: int) -> str:
    return f"seg:{{{user_id % KEY_BUCKETS}}}:u:{user_id}"


def synced(customer_id: int) -> str:
    """A customer's active synced segments: promo id -> end of promo (Unix seconds)."""
    return f"seg:{{{customer_id % KEY_BUCKETS}}}:c:{customer_id}"
