"""Redis key names (the schema is described in docs/cache-format.md).

Per-user keys carry the user id as a hash tag, so Redis Cluster routes them by user;
the shared keys carry the ``{meta}`` tag so scripts touching several of them stay in
one slot.
"""

from __future__ import annotations

META = "seg:{meta}"
REGISTRY = "seg:{meta}:registry"
REBUILD_LEASE = "seg:{meta}:rebuild-lease"


def user(user_id: int) -> str:
    return f"seg:u:{{{user_id}}}"


def synced(customer_id: int) -> str:
    """A customer's active synced segments: promo id -> end of promo (Unix seconds)."""
    return f"seg:c:{{{customer_id}}}"
