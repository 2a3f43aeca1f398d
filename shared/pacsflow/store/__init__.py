"""The state store: the :class:`Database` port, its two backends, migrations and the file ledger.

``await open_database(settings.state)`` gives the backend the configuration names; repositories
(:class:`Ledger`, and each service's own) take that :class:`Database`. ``upgrade`` brings the
schema up to date (``pacsflow db upgrade``).
"""

from __future__ import annotations

from pacsflow.config import StateSettings
from pacsflow.store.base import Database, Row
from pacsflow.store.ledger import (
    DELIVERY_STATUSES,
    FILE_STATUSES,
    Delivery,
    FileDetails,
    Ledger,
    LedgerFile,
    Outcome,
    Recorded,
    SeenFile,
)
from pacsflow.store.migrate import (
    COMPONENTS,
    AppliedMigration,
    Migration,
    applied,
    discover,
    pending,
    upgrade,
)
from pacsflow.store.postgres import PostgresDatabase
from pacsflow.store.sqlite import SqliteDatabase

__all__ = [
    "COMPONENTS",
    "DELIVERY_STATUSES",
    "FILE_STATUSES",
    "AppliedMigration",
    "Database",
    "Delivery",
    "FileDetails",
    "Ledger",
    "LedgerFile",
    "Migration",
    "Outcome",
    "PostgresDatabase",
    "Recorded",
    "Row",
    "SeenFile",
    "SqliteDatabase",
    "applied",
    "discover",
    "open_database",
    "pending",
    "upgrade",
]


async def open_database(settings: StateSettings) -> Database:
    """Connect to the configured backend; StoreError when it cannot be reached or opened."""
    if settings.backend == "postgres":
        return await PostgresDatabase.connect(
            settings.dsn.get_secret_value(), pool_size=settings.pool_size
        )
    return await SqliteDatabase.open(settings.path)
