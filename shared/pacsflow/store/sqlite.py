"""The SQLite backend of the state store: one file, one connection, one dedicated thread.

The embedded deployment keeps its state (and, through its own connection, the bus messages) in
one SQLite file. :class:`SqliteDatabase` runs the standard :mod:`sqlite3` module on a
single-thread executor; every call is one hop to that thread, rows come back as ``dict``.
(Measured against aiosqlite: about 20 % less time per small query, and an ``executemany`` or a
script with its BEGIN and COMMIT is one hop instead of several.)

* SQL is written in the PostgreSQL-style dialect of :mod:`pacsflow.store.base`: each ``$n``
  becomes a positional ``?`` bound from the n-th argument (string literals, quoted names and
  comments are left alone).
* WAL journal, ``synchronous=FULL`` (a committed change survives a power cut), a busy timeout and
  foreign keys on.
* Tasks share the connection: a transaction holds it (and SQLite's write lock, taken at once by
  ``BEGIN IMMEDIATE``) until it ends, so statements of other tasks wait instead of joining it,
  and writers in other connections to the same file wait on the busy timeout instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal, TypeVar

from pacsflow.errors import StoreError
from pacsflow.store.base import Database, Row

__all__ = ["SqliteDatabase", "Translated", "translate_parameters"]

#: STRICT tables need 3.37; RETURNING needs 3.35.
MIN_SQLITE_VERSION = (3, 37, 0)

_T = TypeVar("_T")

# String literals, quoted names and comments are copied unchanged; only bare $n is rewritten.
_TOKENS = re.compile(
    r"""
      '[^']*(?:''[^']*)*'
    | "[^"]*(?:""[^"]*)*"
    | --[^\n]*
    | /\*.*?\*/
    | \$(\d+)
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass(frozen=True, slots=True)
class Translated:
    """A statement with SQLite's ``?`` parameters, and where each one's value comes from."""

    sql: str
    #: for each ``?`` in order, the index of its argument; None when that is 0, 1, 2, ...
    order: tuple[int, ...] | None
    #: how many arguments the statement takes (the highest ``$n``)
    count: int

    def arguments(self, args: Sequence[Any]) -> Sequence[Any]:
        """The values to bind, from the arguments as given for ``$1..$n``."""
        if len(args) != self.count:
            raise StoreError(
                f"the statement takes {self.count} arguments, {len(args)} were passed:"
                f" {_describe(self.sql)}"
            )
        if self.order is None:
            return args
        return [args[index] for index in self.order]


@functools.lru_cache(maxsize=512)
def translate_parameters(sql: str) -> Translated:
    """Rewrite PostgreSQL parameters (``$1``) as SQLite positional ones (``?``).

    Plain ``?`` rather than ``?NNN``: SQLite prepares a statement with thousands of numbered
    parameters in quadratic time (1.4 s for 30,000), plain ones in linear time. A parameter used
    twice, or out of order, is bound twice from the same argument.
    """
    order: list[int] = []

    def replace(match: re.Match[str]) -> str:
        if match[1] is None:
            return match[0]
        order.append(int(match[1]) - 1)
        return "?"

    translated = _TOKENS.sub(replace, sql)
    count = max(order, default=-1) + 1
    identity = order == list(range(len(order)))
    return Translated(translated, None if identity else tuple(order), count)


@functools.lru_cache(maxsize=64)
def _split_script(sql: str) -> tuple[str, ...]:
    # sqlite3.execute runs one statement; complete_statement knows where a statement ends
    # (semicolons inside literals, comments and trigger bodies do not end one).
    statements: list[str] = []
    pending = ""
    for piece in sql.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if _has_code(pending):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \t\r\n;") and _has_code(pending):
        # A last statement without its semicolon.
        statements.append(pending.rstrip(";").strip())
    return tuple(statements)


def _has_code(statement: str) -> bool:
    # A piece made only of comments and semicolons is not a statement.
    without_comments = _TOKENS.sub(lambda m: " " if m[0][0] in "-/" else m[0], statement)
    return bool(without_comments.strip(" \t\r\n;"))


def _describe(sql: str) -> str:
    text = " ".join(sql.split())
    return text if len(text) <= 160 else text[:157] + "..."


def _rows(cursor: sqlite3.Cursor) -> list[Row]:
    if cursor.description is None:
        return []
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]


# Functions run in the database thread. Each takes the connection first.


def _connect(path: str, busy_timeout: float) -> sqlite3.Connection:
    # isolation_level=None: no implicit BEGIN; transactions are explicit (BEGIN IMMEDIATE).
    conn = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    try:
        _use_wal(conn, busy_timeout)
        conn.execute("PRAGMA synchronous=FULL").close()
        conn.execute("PRAGMA foreign_keys=ON").close()
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}").close()
    except BaseException:
        conn.close()
        raise
    return conn


def switch_to_wal(path: str | PathLike[str], busy_timeout: float) -> None:
    """Put the SQLite file at ``path`` (created if missing) in WAL mode, which the file keeps,
    waiting up to ``busy_timeout`` seconds while another connection holds it."""
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        _use_wal(conn, busy_timeout)
    finally:
        conn.close()


def _use_wal(conn: sqlite3.Connection, busy_timeout: float) -> None:
    # Switching a file to WAL needs its exclusive lock. While another connection is writing the
    # file in its first (rollback-journal) transaction, SQLite answers "database is locked" at
    # once instead of waiting on the busy timeout (it already holds a shared lock, and waiting
    # could deadlock), so the wait is here.
    deadline = time.monotonic() + busy_timeout
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL").close()
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _execute(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> None:
    if args:
        conn.execute(sql, args).close()
        return
    statements = _split_script(sql)
    if len(statements) <= 1 or conn.in_transaction:
        for statement in statements:
            conn.execute(statement).close()
        return

    def run_all() -> None:
        for statement in statements:
            conn.execute(statement).close()

    # Like PostgreSQL's simple query protocol: a script outside a transaction is atomic.
    _in_transaction(conn, run_all)


def _executemany(conn: sqlite3.Connection, sql: str, rows: list[Sequence[Any]]) -> None:
    if conn.in_transaction:
        conn.executemany(sql, rows).close()
    else:
        # One transaction, one commit: atomic like asyncpg's executemany, and one fsync.
        _in_transaction(conn, lambda: conn.executemany(sql, rows).close())


def _in_transaction(conn: sqlite3.Connection, work: Callable[[], object]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        work()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _fetch(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> list[Row]:
    cursor = conn.execute(sql, args)
    try:
        return _rows(cursor)
    finally:
        cursor.close()


def _fetchone(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> Row | None:
    cursor = conn.execute(sql, args)
    try:
        values = cursor.fetchone()
        if values is None:
            return None
        return dict(zip([column[0] for column in cursor.description], values, strict=True))
    finally:
        cursor.close()


def _fetchval(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> Any:
    cursor = conn.execute(sql, args)
    try:
        values = cursor.fetchone()
        return None if values is None else values[0]
    finally:
        cursor.close()


def _commit(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _rollback(conn: sqlite3.Connection, statements: Sequence[str]) -> None:
    # SQLite rolls back by itself after some errors (disk full, I/O); then there is nothing left.
    if conn.in_transaction:
        for statement in statements:
            conn.execute(statement)


def _close(conn: sqlite3.Connection) -> None:
    # Recommended before closing: refreshes planner statistics where they are stale. Only an
    # optimisation, so a failure (a read-only or full disk) must not keep the file open.
    with contextlib.suppress(sqlite3.Error):
        conn.execute("PRAGMA optimize").close()
    conn.close()


class _Connection:
    """The sqlite3 connection and the one thread that uses it."""

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor, path: str) -> None:
        self.conn = conn
        self.executor = executor
        self.path = path
        self.closed = False

    async def run(self, fn: Callable[..., _T], *args: Any, sql: str = "") -> _T:
        if self.closed:
            raise StoreError(f"the SQLite database {self.path} is closed")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, fn, self.conn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The statement runs to its end in the thread anyway: wait for it, so that the
            # connection's state (an open transaction) is settled before the task goes away.
            with contextlib.suppress(sqlite3.Error):
                await future
            raise
        except sqlite3.Error as err:
            where = f" in: {_describe(sql)}" if sql else ""
            raise StoreError(f"SQLite {self.path}: {err}{where}") from err


class _Queries:
    """The query methods shared by the database and a transaction bound to it."""

    dialect: Literal["postgres", "sqlite"] = "sqlite"
    _db: _Connection

    def _guard(self) -> contextlib.AbstractAsyncContextManager[object]:
        raise NotImplementedError

    async def execute(self, sql: str, *args: Any) -> None:
        """Run one statement; without arguments, a script of several."""
        statement = translate_parameters(sql)
        values = statement.arguments(args)
        async with self._guard():
            await self._db.run(_execute, statement.sql, values, sql=statement.sql)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement for many parameter rows, atomically, in one thread hop."""
        statement = translate_parameters(sql)
        values = [statement.arguments(row) for row in rows]
        if not values:
            return
        async with self._guard():
            await self._db.run(_executemany, statement.sql, values, sql=statement.sql)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """All rows of a query."""
        statement = translate_parameters(sql)
        values = statement.arguments(args)
        async with self._guard():
            return await self._db.run(_fetch, statement.sql, values, sql=statement.sql)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        """The first row, or None."""
        statement = translate_parameters(sql)
        values = statement.arguments(args)
        async with self._guard():
            return await self._db.run(_fetchone, statement.sql, values, sql=statement.sql)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""
        statement = translate_parameters(sql)
        values = statement.arguments(args)
        async with self._guard():
            return await self._db.run(_fetchval, statement.sql, values, sql=statement.sql)


class SqliteDatabase(_Queries):
    """The state store in one SQLite file, shared by the tasks of one process."""

    def __init__(self, connection: _Connection) -> None:
        self._db = connection
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None

    @classmethod
    async def open(cls, path: str | PathLike[str], *, busy_timeout: float = 30.0) -> SqliteDatabase:
        """Open (or create) the file and its parent folder; WAL, foreign keys, busy timeout."""
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            needed = ".".join(map(str, MIN_SQLITE_VERSION))
            raise StoreError(f"SQLite {sqlite3.sqlite_version} is too old: {needed} is needed")
        file = Path(path)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the folder of {file}: {err.strerror}") from err
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pacsflow-sqlite")
        loop = asyncio.get_running_loop()
        try:
            conn = await loop.run_in_executor(executor, _connect, str(file), busy_timeout)
        except sqlite3.Error as err:
            executor.shutdown(wait=False)
            raise StoreError(f"cannot open the SQLite database {file}: {err}") from err
        return cls(_Connection(conn, executor, str(file)))

    @property
    def path(self) -> Path:
        """The database file."""
        return Path(self._db.path)

    @contextlib.asynccontextmanager
    async def _hold(self) -> AsyncIterator[None]:
        if self._owner is not None and self._owner is asyncio.current_task():
            # Waiting for the lock this task holds would hang forever.
            raise StoreError(
                "statement on the database inside its own transaction: "
                "use the Database that transaction() yielded"
            )
        async with self._lock:
            yield

    def _guard(self) -> contextlib.AbstractAsyncContextManager[object]:
        return self._hold()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Database]:
        """A transaction holding the connection and the write lock (BEGIN IMMEDIATE)."""
        async with self._hold():
            self._owner = asyncio.current_task()
            try:
                try:
                    await self._db.run(_execute, "BEGIN IMMEDIATE", (), sql="BEGIN IMMEDIATE")
                except asyncio.CancelledError:
                    # BEGIN ran to its end in the thread before the cancel reached us: undo it,
                    # or every later transaction on this connection would fail.
                    await self._db.run(_rollback, ("ROLLBACK",))
                    raise
                bound = _SqliteTransaction(self._db)
                try:
                    yield bound
                except BaseException:
                    bound.closed = True
                    await self._db.run(_rollback, ("ROLLBACK",))
                    raise
                bound.closed = True
                await self._db.run(_commit, sql="COMMIT")
            finally:
                self._owner = None

    async def ping(self) -> bool:
        """True when the file answers a query within five seconds."""
        try:
            async with asyncio.timeout(5):
                return bool(await self.fetchval("SELECT 1") == 1)
        except (StoreError, TimeoutError):
            return False

    async def close(self) -> None:
        """Wait for running work, then close the connection and its thread."""
        if self._db.closed:
            return
        async with self._lock:
            try:
                await self._db.run(_close)
            finally:
                self._db.closed = True
                self._db.executor.shutdown(wait=False)


class _SqliteTransaction(_Queries):
    """The database inside one transaction (or savepoint), for the task that opened it."""

    _savepoints = itertools.count(1)

    def __init__(self, connection: _Connection) -> None:
        self._db = connection
        self.closed = False

    def _guard(self) -> contextlib.AbstractAsyncContextManager[object]:
        if self.closed:
            raise StoreError("the transaction has ended; its Database cannot be used any more")
        return contextlib.nullcontext()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Database]:
        """A nested transaction: a savepoint, rolled back alone on error."""
        self._guard()
        name = f"pacsflow_sp{next(self._savepoints)}"
        await self._db.run(_execute, f"SAVEPOINT {name}", (), sql="SAVEPOINT")
        nested = _SqliteTransaction(self._db)
        try:
            yield nested
        except BaseException:
            nested.closed = True
            await self._db.run(_rollback, (f"ROLLBACK TO {name}", f"RELEASE {name}"))
            raise
        nested.closed = True
        await self._db.run(_execute, f"RELEASE {name}", (), sql="RELEASE")

    async def ping(self) -> bool:
        """True while the transaction can run statements."""
        try:
            return bool(await self.fetchval("SELECT 1") == 1)
        except StoreError:
            return False

    async def close(self) -> None:
        """Nothing to release: the transaction ends with its ``async with`` block."""
