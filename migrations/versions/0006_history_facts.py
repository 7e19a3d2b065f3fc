"""History that explains every change a user saw: explicit facts and segment rules.

* ``segment_history``: each segment's life and percentage rule over time (created with
  its ``auto_bp``, ``rule_changed`` old -> new, ``deleted``), written in the same
  transaction as the change.
* ``membership_history`` gets ``kind`` and ``expires_at``: from now on it holds explicit
  *facts*, whether or not a reader could see them (``kind = 'member'``: a membership
  begins, is renewed with a new expiry, ends; ``kind = 'exclusion'``: an exclusion from
  a rule begins (``remove``) or ends (``add``)).  Reports derive what readers saw from
  the facts and the rules (service/domain/history.py).  An index by segment serves the
  reports' reads of rule segments.
* A baseline, stamped at the migration: one ``baseline`` row per live segment (its rule
  then) and one fact per membership and exclusion (``cause = 'baseline'``).  Rows from
  before it keep ``kind`` NULL: they recorded what readers saw of explicit changes
  only, and reports show them as they are; derived rows start at the baseline, which
  itself reports nothing (the state before it is not known).

The CHECK on the new column and the index are built under the table's lock (a scan of
the history; PostgreSQL cannot build either concurrently on a partitioned table): run
the migration when a short pause of writes is acceptable.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_UP = [
    """
    CREATE TABLE segment_history (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        segment_id bigint NOT NULL REFERENCES segments (id),
        slug text NOT NULL,
        occurred_at timestamptz NOT NULL,
        operation text NOT NULL,
        old_bp integer,
        new_bp integer,
        CONSTRAINT segment_history_operation
            CHECK (operation IN ('created', 'rule_changed', 'deleted', 'baseline'))
    )
    """,
    "CREATE INDEX segment_history_segment ON segment_history (segment_id, occurred_at)",
    """
    ALTER TABLE membership_history
        ADD COLUMN kind text,
        ADD COLUMN expires_at timestamptz,
        ADD CONSTRAINT membership_history_kind CHECK (kind IN ('member', 'exclusion'))
    """,
    """
    CREATE INDEX membership_history_segment
        ON membership_history (segment_id, user_id, occurred_at)
    """,
    # The baseline, all at the migration's instant.
    """
    INSERT INTO segment_history (segment_id, slug, occurred_at, operation, new_bp)
    SELECT id, slug, now(), 'baseline', auto_bp FROM segments WHERE deleted_at IS NULL
    """,
    """
    INSERT INTO membership_history
        (occurred_at, user_id, segment_id, slug, operation, cause, kind, expires_at)
    SELECT now(), m.user_id, m.segment_id, s.slug, 'add', 'baseline', 'member', m.expires_at
    FROM memberships m JOIN segments s ON s.id = m.segment_id
    UNION ALL
    SELECT now(), x.user_id, x.segment_id, s.slug, 'remove', 'baseline', 'exclusion', NULL
    FROM auto_exclusions x JOIN segments s ON s.id = x.segment_id
    """,
]

_DOWN = [
    # Facts written since are left as rows the old code reads as changes readers saw.
    "DELETE FROM membership_history WHERE cause = 'baseline'",
    "DROP INDEX membership_history_segment",
    """
    ALTER TABLE membership_history
        DROP CONSTRAINT membership_history_kind,
        DROP COLUMN expires_at,
        DROP COLUMN kind
    """,
    "DROP TABLE segment_history",
]


def upgrade() -> None:
    for statement in _UP:
        op.execute(statement)


def downgrade() -> None:
    for statement in _DOWN:
        op.execute(statement)
