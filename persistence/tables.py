"""The PostgreSQL schema, as SQLAlchemy Core tables.

The migrations in ``migrations/`` create exactly these; the queries in
``persistence/store/`` run on asyncpg directly (see the note there).
"""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    BigInteger,
    CheckConstraint,
    Column,
    Date,
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
    # Why it happened: api, renew, expiry, segment_deleted, baseline, ...
    Column("cause", Text, nullable=False),
    # Migration 0006: rows are explicit facts (service/domain/history.py): 'member' (a
    # membership begins or is renewed: add; ends: remove) or 'exclusion' (from a rule:
    # begins with a remove, ends with an add); NULL before the migration (rows of what
    # readers saw of explicit changes).  expires_at: of a membership that begins or is
    # renewed.
    Column("kind", Text, nullable=True),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    PrimaryKeyConstraint("occurred_at", "id", name="membership_history_pkey"),
    CheckConstraint("operation IN ('add', 'remove')", name="membership_history_operation"),
    CheckConstraint("kind IN ('member', 'exclusion')", name="membership_history_kind"),
    Index("membership_history_user", "user_id", "occurred_at"),
    Index("membership_history_segment", "segment_id", "user_id", "occurred_at"),
    postgresql_partition_by="RANGE (occurred_at)",
)

# Migration 0006: each segment's life and percentage rule over time, written in the
# same transaction as the change; 'baseline' rows are the migration's snapshot.
segment_history = Table(
    "segment_history",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("segment_id", BigInteger, ForeignKey("segments.id"), nullable=False),
    Column("slug", Text, nullable=False),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    Column("operation", Text, nullable=False),
    Column("old_bp", Integer, nullable=True),
    Column("new_bp", Integer, nullable=True),
    CheckConstraint(
        "operation IN ('created', 'rule_changed', 'deleted', 'baseline')",
        name="segment_history_operation",
    ),
    Index("segment_history_segment", "segment_id", "occurred_at"),
)

# -- merchant audiences (migration 0002) ---------------------------------------------

audience_generation_seq = Sequence("audience_generation_seq", metadata=metadata)

# One row per audience; `generation` points at its current member rows, so a replace
# writes a new generation and switches the pointer atomically.
audiences = Table(
    "audiences",
    metadata,
    Column("merchant_id", BigInteger, primary_key=True, autoincrement=False),
    Column("segment_type", Text, primary_key=True),
    Column("generation", BigInteger, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("customers", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

audience_members = Table(
    "audience_members",
    metadata,
    Column("generation", BigInteger, primary_key=True, autoincrement=False),
    Column("customer_id", BigInteger, primary_key=True, autoincrement=False),
)

audience_history = Table(
    "audience_history",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("merchant_id", BigInteger, nullable=False),
    Column("segment_type", Text, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("operation", Text, nullable=False),
    Column("added", BigInteger, nullable=False),
    Column("removed", BigInteger, nullable=False),
    Column("customers", BigInteger, nullable=False),
    Column("source", Text, nullable=False),
    Column("batch_id", Text),
    Column("occurred_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

snapshot_parts = Table(
    "snapshot_parts",
    metadata,
    Column("merchant_id", BigInteger, primary_key=True, autoincrement=False),
    Column("segment_type", Text, primary_key=True),
    Column("batch_id", Text, primary_key=True),
    Column("part", Integer, primary_key=True, autoincrement=False),
    Column("parts", Integer, nullable=False),
    Column("customer_ids", ARRAY(BigInteger), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Migration 0005: Kafka changes of an audience waiting, in log order, behind a snapshot
# being staged (kind 'snapshot': the snapshot's own place in the queue, its parts are in
# snapshot_parts).
audience_pending = Table(
    "audience_pending",
    metadata,
    Column("merchant_id", BigInteger, primary_key=True, autoincrement=False),
    Column("segment_type", Text, primary_key=True),
    Column("seq", BigInteger, Identity(always=True), primary_key=True),
    Column("kind", Text, nullable=False),
    Column("batch_id", Text),
    Column("parts", Integer),
    Column("customer_ids", ARRAY(BigInteger)),
    Column("source", Text, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(
        "kind IN ('snapshot', 'replace', 'add', 'remove')", name="audience_pending_kind_check"
    ),
    Index(
        "audience_pending_snapshot",
        "merchant_id",
        "segment_type",
        "batch_id",
        unique=True,
        postgresql_where=text("kind = 'snapshot'"),
    ),
)

ingest_offsets = Table(
    "ingest_offsets",
    metadata,
    Column("topic", Text, primary_key=True),
    Column("partition", Integer, primary_key=True, autoincrement=False),
    Column("next_offset", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

promo_syncs = Table(
    "promo_syncs",
    metadata,
    Column("promo_id", Text, primary_key=True),
    Column("merchant_id", BigInteger, nullable=False),
    Column("segment_type", Text, nullable=False),
    Column("end_date", Date, nullable=False),
    Column("state", Text, nullable=False),
    Column("synced", BigInteger, nullable=False, server_default="0"),
    Column("skipped", BigInteger, nullable=False, server_default="0"),
    Column("cp_segment_id", Text),
    Column("audience_version", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # Migration 0004: the attempt in flight (fencing token and lease) and the external
    # id of the CP segment in force.
    Column("attempt_token", Text),
    Column("lease_until", DateTime(timezone=True)),
    Column("cp_external_id", Text),
    Index(
        "promo_syncs_leased",
        "lease_until",
        postgresql_where=text("state = 'in_progress'"),
    ),
)

sync_ledger = Table(
    "sync_ledger",
    metadata,
    Column("customer_id", BigInteger, primary_key=True, autoincrement=False),
    Column("promo_id", Text, primary_key=True),
    Column("end_date", Date, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # reserved (an attempt in flight), active (synced), leaving (an update removes it).
    Column("state", Text, nullable=False, server_default="active"),
    Index("sync_ledger_active", "customer_id", "end_date"),
    Index("sync_ledger_promo", "promo_id"),
)

# One row per customer ever counted: its row lock serialises slot reservations, and
# its version orders the writes of the customer's counts to the Redis mirror.
sync_customers = Table(
    "sync_customers",
    metadata,
    Column("customer_id", BigInteger, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False, server_default="0"),
)

# Customers whose counts changed and are not yet confirmed in the Redis mirror.
counter_outbox = Table(
    "counter_outbox",
    metadata,
    Column("customer_id", BigInteger, primary_key=True, autoincrement=False),
    Column("version", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("counter_outbox_created", "created_at"),
)

# CP segments to delete (a failed, abandoned or cancelled sync's).
cp_cleanup = Table(
    "cp_cleanup",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("promo_id", Text, nullable=False),
    Column("external_id", Text, nullable=False, unique=True),
    Column("segment_id", Text),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# -- cache outbox (migration 0003) ------------------------------------------------------

# One row per user change not yet confirmed in Redis, written in the change's own
# transaction; the reconciler deletes it once Redis holds that version.
cache_outbox = Table(
    "cache_outbox",
    metadata,
    Column("change_id", BigInteger, primary_key=True, autoincrement=False),
    Column("user_id", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("cache_outbox_created", "created_at"),
)
