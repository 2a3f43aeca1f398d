"""The PostgreSQL backend of the state store: an asyncpg connection pool.

Used by the distributed deployment, where every service process has its own pool.

* Rows come back as ``dict`` (as from SQLite), not as asyncpg records.
* A PostgreSQL restart (or an operator ending a session) leaves dead connections in the pool.
  A statement outside a transaction that fails because its connection is gone is run once more
  on a fresh connection; so is the ``BEGIN`` of a transaction. Inside a transaction nothing is
  retried: the error reaches the caller, who repeats the whole unit of work.
* Every other failure is raised as :class:`~pacsflow.errors.StoreError` with the asyncpg error as
  its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from pacsflow.errors import StoreError
from pacsflow.store.base import Database, Row

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    _Connection = PoolConnectionProxy[asyncpg.Record]

__all__ = ["PostgresDatabase"]

_T = TypeVar("_T")

# Errors after which the connection is known to be unusable.
_CONNECTION_LOST = (
    # 08xxx, and "connection was closed in the middle of operation"
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,  # 57P01: the server is shutting down, or pg_terminate_backend
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.CannotConnectNowError,  # 57P03: the server is starting up
    ConnectionError,  # reset, refused, broken pipe
)

_FAILURES = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


def _connection_lost(err: BaseException) -> bool:
    if isinstance(err, _CONNECTION_LOST):
        return True
    # Both are raised before anything is sent: by a connection whose socket has closed, and
    # by one that has read the server's "terminating connection" but not yet the socket's end.
    return (isinstance(err, asyncpg.InterfaceError) and "connection is closed" in str(err)) or (
        isinstance(err, asyncpg.InternalClientError) and "cannot switch to state" in str(err)
    )


def _redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "(unparsable DSN)"
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _describe(sql: str) -> str:
    text = " ".join(sql.split())
    return text if len(text) <= 160 else text[:157] + "..."


def _store_error(err: BaseException, sql: str = "") -> StoreError:
    where = f" in: {_describe(sql)}" if sql else ""
    name = type(err).__name__
    return StoreError(f"PostgreSQL: {name}: {err}{where}")


class _Queries:
    """The query methods, given a way to run work on a connection."""

    dialect: Literal["postgres", "sqlite"] = "postgres"

    async def _run(self, sql: str, work: Callable[[_Connection], Awaitable[_T]]) -> _T:
        raise NotImplementedError

    async def execute(self, sql: str, *args: Any) -> None:
        """Run one statement; without arguments, a script of several."""
        await self._run(sql, lambda conn: conn.execute(sql, *args))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement for many parameter rows, atomically, pipelined in one round trip."""
        # A list, so that a retry can send the rows again.
        batch = list(rows)
        if batch:
            await self._run(sql, lambda conn: conn.executemany(sql, batch))

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """All rows of a query."""

        async def work(conn: _Connection) -> list[Row]:
            return [dict(record.items()) for record in await conn.fetch(sql, *args)]

        return await self._run(sql, work)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        """The first row, or None."""

        async def work(conn: _Connection) -> Row | None:
            record = await conn.fetchrow(sql, *args)
            return None if record is None else dict(record.items())

        return await self._run(sql, work)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        """The first column of the first row, or None."""
        return await self._run(sql, lambda conn: conn.fetchval(sql, *args))


async def _keep_session(_connection: _Connection) -> None:
    """What a connection needs before it goes back to the pool, beyond the rollback of an
    open transaction that asyncpg always does: nothing. pacsflow sets no session state (no
    SET, LISTEN or session advisory lock), so asyncpg's default reset, one more round trip
    on every release, would buy nothing."""


# Array types pacsflow's statements bind (one statement per batch, whatever its size).
# asyncpg learns an array type's codec per connection, with a catalog query, the first time
# a statement uses it: asked when the connection opens, so that the first batch does not
# pay it (several milliseconds, on every connection of the pool) on its way to the PACS.
_ARRAY_TYPES = "SELECT NULL::bigint[], NULL::int[], NULL::float8[], NULL::text[]"


async def _learn_array_types(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    await connection.fetchrow(_ARRAY_TYPES)


class PostgresDatabase(_Queries):
    """The state store in PostgreSQL, through a pool of connections."""

    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout: float = 60.0) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        pool_size: int = 10,
        command_timeout: float = 60.0,
        connect_timeout: float = 10.0,
    ) -> PostgresDatabase:
        """Open a pool of up to ``pool_size`` connections; StoreError when unreachable."""
        try:
            pool = await asyncpg.create_pool(
                dsn,
                # A few connections open from the start: the first burst of work does not
                # wait for (and PostgreSQL does not fork) a new backend per statement.
                min_size=min(pool_size, 4),
                max_size=pool_size,
                reset=_keep_session,
                init=_learn_array_types,
                command_timeout=command_timeout,
                timeout=connect_timeout,
                server_settings={
                    "application_name": "pacsflow",
                    # Compiling these short queries costs more than it saves.
                    "jit": "off",
                },
            )
        except (*_FAILURES, ValueError) as err:
            raise StoreError(f"cannot connect to PostgreSQL at {_redact(dsn)}: {err}") from err
        return cls(pool, acquire_timeout=command_timeout)

    async def _run(self, sql: str, work: Callable[[_Connection], Awaitable[_T]]) -> _T:
        for attempt in (1, 2):
            try:
                async with self._pool.acquire(timeout=self._acquire_timeout) as conn:
                    return await work(conn)
            except _FAILURES as err:
                if attempt == 1 and _connection_lost(err):
                    await self._drop_dead_connections()
                    continue
                raise _store_error(err, sql) from err
        raise AssertionError("unreachable")

    async def _drop_dead_connections(self) -> None:
        # After a restart every idle connection of the pool is dead: replace them all
        # (each on its next use) rather than failing once per connection.
        await self._pool.expire_connections()

    async def _begin(self) -> tuple[_Connection, Any]:
        for attempt in (1, 2):
            conn: _Connection | None = None
            try:
                conn = await self._pool.acquire(timeout=self._acquire_timeout)
                transaction = conn.transaction()
                await transaction.start()
                return conn, transaction
            except _FAILURES as err:
                if conn is not None:
                    await self._pool.release(conn)
                # Nothing has run yet, so a BEGIN on a dead connection can be repeated.
                if attempt == 1 and _connection_lost(err):
                    await self._drop_dead_connections()
                    continue
                raise _store_error(err, "BEGIN") from err
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Database]:
        """A transaction on one connection of the pool: commit on exit, rollback on error."""
        conn, transaction = await self._begin()
        try:
            async with _bound(conn, transaction) as bound:
                yield bound
        finally:
            await self._pool.release(conn)

    async def ping(self) -> bool:
        """True when the server answers a query within five seconds."""
        try:
            async with asyncio.timeout(5):
                return bool(await self.fetchval("SELECT 1") == 1)
        except (StoreError, TimeoutError):
            return False

    async def close(self) -> None:
        """Close every connection, waiting up to ten seconds for those in use."""
        try:
            async with asyncio.timeout(10):
                await self._pool.close()
        except TimeoutError:
            self._pool.terminate()


@contextlib.asynccontextmanager
async def _bound(connection: _Connection, transaction: Any) -> AsyncIterator[Database]:
    """Run the body in a started transaction (or savepoint) and end it."""
    bound = _PostgresTransaction(connection)
    try:
        yield bound
    except BaseException:
        bound.closed = True
        try:
            await transaction.rollback()
        except _FAILURES as err:
            # A dead connection has no transaction left to roll back; the server dropped it.
            if not _connection_lost(err):
                raise _store_error(err, "ROLLBACK") from err
        raise
    bound.closed = True
    try:
        await transaction.commit()
    except _FAILURES as err:
        raise _store_error(err, "COMMIT") from err


class _PostgresTransaction(_Queries):
    """The database inside one transaction, on one connection; nothing is retried."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.closed = False

    async def _run(self, sql: str, work: Callable[[_Connection], Awaitable[_T]]) -> _T:
        if self.closed:
            raise StoreError("the transaction has ended; its Database cannot be used any more")
        try:
            return await work(self._connection)
        except _FAILURES as err:
            raise _store_error(err, sql) from err

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Database]:
        """A nested transaction: a savepoint, rolled back alone on error."""
        if self.closed:
            raise StoreError("the transaction has ended; its Database cannot be used any more")
        transaction = self._connection.transaction()
        try:
            await transaction.start()
        except _FAILURES as err:
            raise _store_error(err, "SAVEPOINT") from err
        async with _bound(self._connection, transaction) as bound:
            yield bound

    async def ping(self) -> bool:
        """True while the transaction can run statements."""
        try:
            return bool(await self.fetchval("SELECT 1") == 1)
        except StoreError:
            return False

    async def close(self) -> None:
        """Nothing to release: the transaction ends with its ``async with`` block."""
