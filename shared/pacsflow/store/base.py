"""The state store port: a small SQL interface with two backends (PostgreSQL and SQLite).

Repositories (the file ledger, and each service's own tables) are written once against
:class:`Database` in one SQL dialect: ``$1``-style parameters, ``ON CONFLICT``, ``RETURNING``,
times as epoch seconds (``DOUBLE PRECISION`` / ``REAL``). The SQLite backend translates the
parameters. Schema changes are versioned migrations per component, applied by
``pacsflow db upgrade``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol

__all__ = ["Database", "Row"]

Row = Mapping[str, Any]


class Database(Protocol):
    """One connection pool (PostgreSQL) or one file (SQLite)."""

    dialect: Literal["postgres", "sqlite"]

    async def execute(self, sql: str, *args: Any) -> None:
        """Run one statement; without arguments, a script of several (atomic on its own)."""

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement for many parameter rows (one round trip where possible)."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """All rows of a query."""

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        """The first row, or None."""

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""

    def transaction(self) -> AbstractAsyncContextManager[Database]:
        """A transaction: the yielded Database runs inside it; commit on exit, rollback on error."""

    async def ping(self) -> bool:
        """True when the store answers."""

    async def close(self) -> None:
        """Release connections."""
