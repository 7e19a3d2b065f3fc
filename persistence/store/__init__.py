"""The PostgreSQL store: the source of truth.

Queries are SQL run on asyncpg directly: the tables are defined once in
``persistence/tables.py`` (SQLAlchemy Core, for the migrations), while the hot write
path avoids SQLAlchemy's per-statement compile and result-processing overhead.

The store's parts: ``pool`` (connections, transactions, the outcome of a failed
commit), ``segments`` (the registry), ``changes`` (a user's membership changes),
``states`` (reading users' states), ``upkeep`` (expiry, the outbox, the version scan)
and ``reports`` (history and explanations).
"""

from persistence.store.changes import OPTIMISTIC_TRIES, MembershipChanges
from persistence.store.pool import BULK_TIMEOUT_S, Conn
from persistence.store.reports import Reports
from persistence.store.segments import REGISTRY_LOCK, SegmentTables
from persistence.store.upkeep import Upkeep


class PgStore(SegmentTables, MembershipChanges, Upkeep, Reports):
    """The store (``service.domain.ports.Store``) in PostgreSQL."""


__all__ = ["BULK_TIMEOUT_S", "OPTIMISTIC_TRIES", "REGISTRY_LOCK", "Conn", "PgStore"]
