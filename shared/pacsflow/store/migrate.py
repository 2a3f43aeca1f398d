"""Versioned schema migrations, per component, for both backends.

Each component keeps its migrations as SQL files in a package: ``core`` in
``pacsflow.store.migrations``, a service in ``pacsflow_<service>.migrations`` (a service without
that package has no tables of its own). Files are named ``NNNN_name.sql``; where PostgreSQL and
SQLite need different SQL, ``NNNN_name.postgres.sql`` and ``NNNN_name.sqlite.sql`` (a dialect's
own file wins over the shared one of the same version).

Applied versions are recorded in ``schema_migrations(component, version, name, applied_at)``.
Each migration runs in its own transaction together with its record, under a lock (PostgreSQL:
a transaction-level advisory lock; SQLite: the write lock of ``BEGIN IMMEDIATE``), and is
checked again once the lock is held: processes that start at the same time apply each
migration exactly once. Running :func:`upgrade` again does nothing.
"""

from __future__ import annotations

import importlib.resources
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from pacsflow.errors import StoreError
from pacsflow.store.base import Database

__all__ = [
    "COMPONENTS",
    "AppliedMigration",
    "Migration",
    "applied",
    "discover",
    "pending",
    "upgrade",
]

#: component -> package holding its migrations, in the order they are applied
COMPONENTS: Mapping[str, str] = {
    "core": "pacsflow.store.migrations",
    "watcher": "pacsflow_watcher.migrations",
    "uploader": "pacsflow_uploader.migrations",
    "router": "pacsflow_router.migrations",
    "harvester": "pacsflow_harvester.migrations",
    "sync": "pacsflow_sync.migrations",
    "notifier": "pacsflow_notifier.migrations",
}

# Key of the PostgreSQL advisory lock held while a migration runs ("pacsflow" in ASCII).
_LOCK_KEY = 0x70616373666C6F77

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(postgres|sqlite))?\.sql$")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    name TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (component, version)
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file, chosen for one dialect."""

    component: str
    version: int
    name: str
    filename: str
    sql: str = field(repr=False)

    def __str__(self) -> str:
        return f"{self.component} {self.version:04d}_{self.name}"


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    """A row of ``schema_migrations``."""

    component: str
    version: int
    name: str
    applied_at: float


def discover(
    dialect: str,
    components: Iterable[str] | None = None,
    *,
    packages: Mapping[str, str] | None = None,
) -> list[Migration]:
    """Every migration of the components (default: all whose package exists), in order."""
    sources = dict(COMPONENTS if packages is None else packages)
    names = list(sources) if components is None else list(components)
    found: list[Migration] = []
    for component in names:
        if component not in sources:
            raise StoreError(f"unknown component {component!r} (known: {', '.join(sources)})")
        found.extend(_discover_component(component, sources[component], dialect))
    return found


def _discover_component(component: str, package: str, dialect: str) -> list[Migration]:
    parts = package.split(".")
    parents = {".".join(parts[: i + 1]) for i in range(len(parts))}
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as err:
        # Only a missing package means "no migrations"; a broken import is a bug to show.
        if err.name in parents:
            return []
        raise
    shared: dict[int, tuple[str, str]] = {}
    own: dict[int, tuple[str, str]] = {}
    names: dict[int, str] = {}
    for entry in root.iterdir():
        filename = entry.name
        if not filename.endswith(".sql") or not entry.is_file():
            continue
        match = _FILE_NAME.match(filename)
        if match is None:
            raise StoreError(
                f"{package}: {filename} is not named NNNN_name.sql or NNNN_name.<dialect>.sql"
                " (dialect: postgres or sqlite; name: a-z, 0-9, _)"
            )
        version, name, file_dialect = int(match[1]), match[2], match[3]
        if names.setdefault(version, name) != name:
            raise StoreError(
                f"{package}: version {version:04d} has two names, {names[version]} and {name}"
            )
        if file_dialect is None:
            shared[version] = (filename, entry.read_text(encoding="utf-8"))
        elif file_dialect == dialect:
            own[version] = (filename, entry.read_text(encoding="utf-8"))
    migrations = []
    for version in sorted(names):
        chosen = own.get(version) or shared.get(version)
        if chosen is None:
            raise StoreError(
                f"{package}: version {version:04d}_{names[version]} has no file for {dialect}"
            )
        filename, sql = chosen
        migrations.append(Migration(component, version, names[version], filename, sql))
    return migrations


async def applied(db: Database) -> list[AppliedMigration]:
    """What ``schema_migrations`` records, by component and version (empty before any)."""
    if not await _table_exists(db):
        return []
    rows = await db.fetch(
        "SELECT component, version, name, applied_at FROM schema_migrations"
        " ORDER BY component, version"
    )
    return [AppliedMigration(**row) for row in rows]


async def pending(
    db: Database,
    components: Iterable[str] | None = None,
    *,
    packages: Mapping[str, str] | None = None,
) -> list[Migration]:
    """The migrations :func:`upgrade` would apply now, in order."""
    done = {(m.component, m.version) for m in await applied(db)}
    return [
        m
        for m in discover(db.dialect, components, packages=packages)
        if (m.component, m.version) not in done
    ]


async def upgrade(
    db: Database,
    components: Iterable[str] | None = None,
    *,
    packages: Mapping[str, str] | None = None,
) -> list[Migration]:
    """Apply pending migrations in order, each in its own transaction; return those applied."""
    await _create_table(db)
    todo = await pending(db, components, packages=packages)
    done: list[Migration] = []
    for migration in todo:
        if await _apply(db, migration):
            done.append(migration)
    return done


async def _create_table(db: Database) -> None:
    # Cheap check first: creating the table takes the lock, which a running migration holds.
    if await _table_exists(db):
        return
    async with db.transaction() as tx:
        await _lock(tx)
        await tx.execute(_CREATE_TABLE)


async def _table_exists(db: Database) -> bool:
    if db.dialect == "postgres":
        sql = "SELECT to_regclass('schema_migrations') IS NOT NULL"
    else:
        sql = (
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
        )
    return bool(await db.fetchval(sql))


async def _lock(tx: Database) -> None:
    if tx.dialect == "postgres":
        # Released at commit or rollback. Concurrent CREATE TABLE IF NOT EXISTS can fail
        # in PostgreSQL without it.
        await tx.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
    # SQLite: BEGIN IMMEDIATE has already taken the write lock.


async def _apply(db: Database, migration: Migration) -> bool:
    async with db.transaction() as tx:
        await _lock(tx)
        versions: Sequence[int] = [
            row["version"]
            for row in await tx.fetch(
                "SELECT version FROM schema_migrations WHERE component = $1",
                migration.component,
            )
        ]
        if migration.version in versions:
            return False  # another process applied it while this one waited for the lock
        later = [v for v in versions if v > migration.version]
        if later:
            raise StoreError(
                f"migration {migration} is pending but {migration.component}"
                f" {max(later):04d} is already applied: a migration was added out of order"
            )
        try:
            await tx.execute(migration.sql)
        except StoreError as err:
            raise StoreError(f"migration {migration} ({migration.filename}) failed: {err}") from err
        await tx.execute(
            "INSERT INTO schema_migrations (component, version, name, applied_at)"
            " VALUES ($1, $2, $3, $4)",
            migration.component,
            migration.version,
            migration.name,
            time.time(),
        )
    return True
