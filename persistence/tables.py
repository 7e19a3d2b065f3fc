"""The PostgreSQL schema, as SQLAlchemy Core tables.

The migrations in ``migrations/`` create exactly these; the queries in
``persistence/store.py`` run on asyncpg directly (see the note there).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Sequence,
    Table,
    Text,
    func,
    text,
)

metadata = MetaData()

# One sequence orders every change: user versions and segment (registry) versions are
# drawn from it, so "newer" means the same thing for every writer of the cache.
change_id_seq = Sequence("change_id_seq", metadata=metadata)

segments = Table(
    "segments",
    metadata,
    # Identity ids are never reused, so re-creating a deleted slug gets a new id and
    # cannot bring back the old members.
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("slug", Text, nullable=False),
    Column("description", Text, nullable=False, server_default=""),
    Column("auto_bp", Integer, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("deleted_at", DateTime(timezone=True), nullable=True),
    Column("version", BigInteger, nullable=False),
    CheckConstraint("auto_bp BETWEEN 0 AND 10000", name="segments_auto_bp_range"),
    Index(
        "segments_live_slug",
        "slug",
        unique=True,
        postgresql_where=text("deleted_at IS NULL"),
    ),
)

memberships = Table(
    "memberships",
    metadata,
    Column("user_id", BigInteger, nullable=False),
    Column("segment_id", BigInteger, ForeignKey("segments.id"), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("user_id", "segment_id", name="memberships_pkey"),
    Index("memberships_segment", "segment_id"),
    Index("memberships_expiry", "expires_at", postgresql_where=text("expires_at IS NOT NULL")),
)

# Explicit removals of a user from a percentage segment: they win over the rule.
auto_exclusions = Table(
    "auto_exclusions",
    metadata,
    Column("user_id", BigInteger, nullable=False),
    Column("segment_id", BigInteger, ForeignKey("segments.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("user_id", "segment_id", name="auto_exclusions_pkey"),
)

# The version of each user's state; the row is also the lock that serialises
# concurrent changes of one user.
user_versions = Table(
    "user_versions",
    metadata,
    Column("user_id", BigInteger, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False),
)

# Append-only history, partitioned by month of ``occurred_at`` (the partitions are
# created by the migrations and on demand; see persistence/partitions.py).
membership_history = Table(
    "membership_history",
    metadata,
    Column("id", BigInteger, Identity(always=True), nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("user_id", BigInteger, nullable=False),
    Column("segment_id", BigInteger, nullable=False),
    # The slug at the time of the event: reports stay readable after deletion.
    Column("slug", Text, nullable=False),
    Column("operation", Text, nullable=False),
    # Why it happened: api, expiry, segment_deleted, ...
    Column("cause", Text, nullable=False),
    PrimaryKeyConstraint("occurred_at", "id", name="membership_history_pkey"),
    CheckConstraint("operation IN ('add', 'remove')", name="membership_history_operation"),
    postgresql_partition_by="RANGE (occurred_at)",
)
