"""The state store contract on PostgreSQL, and recovery from connections the server ended."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from pydantic import SecretStr

from pacsflow.config import StateSettings
from pacsflow.errors import StoreError
from pacsflow.store import Database, PostgresDatabase, open_database

from ..conftest import PG_ADMIN_DSN
from .contract import DatabaseContract, LedgerContract, MigrationContract

pytestmark = pytest.mark.postgres


class PostgresStore:
    @pytest.fixture
    def settings(self, pg_dsn: str) -> StateSettings:
        return StateSettings(backend="postgres", dsn=SecretStr(pg_dsn), pool_size=4)


class TestPostgresDatabase(PostgresStore, DatabaseContract):
    pass


class TestPostgresMigrations(PostgresStore, MigrationContract):
    pass


class TestPostgresLedger(PostgresStore, LedgerContract):
    pass


async def terminate(dsn: str, query_like: str | None = None) -> int:
    """End the server sessions of the test database (all, or those running a query)."""
    database = dsn.rsplit("/", 1)[1]
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        return int(
            await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()"
                " AND ($2::text IS NULL OR query LIKE $2)",
                database,
                query_like,
            )
        )
    finally:
        await admin.close()


async def wait_for_query(dsn: str, query_like: str) -> None:
    database = dsn.rsplit("/", 1)[1]
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        for _ in range(500):
            running = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = $1 AND state = 'active' AND query LIKE $2",
                database,
                query_like,
            )
            if running:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{query_like} never ran")
    finally:
        await admin.close()


class TestPostgresReconnect:
    @pytest.fixture
    async def db(self, pg_dsn: str) -> AsyncIterator[Database]:
        database = await PostgresDatabase.connect(pg_dsn, pool_size=2)
        yield database
        await database.close()

    async def test_terminated_connections_are_replaced_transparently(
        self, db: Database, pg_dsn: str
    ) -> None:
        before = await db.fetchval("SELECT pg_backend_pid()")
        assert await terminate(pg_dsn) >= 1
        after = await db.fetchval("SELECT pg_backend_pid()")
        assert after != before
        assert await db.ping()

    async def test_query_cut_by_terminate_is_run_again(self, db: Database, pg_dsn: str) -> None:
        # The session is ended while the query runs: the statement is retried on a new one.
        query = asyncio.create_task(db.fetchval("SELECT 42 FROM pg_sleep(0.3) AS cut_here"))
        await wait_for_query(pg_dsn, "%cut_here%")
        assert await terminate(pg_dsn, "%cut_here%") == 1
        assert await query == 42

    async def test_transaction_begins_on_a_fresh_connection(
        self, db: Database, pg_dsn: str
    ) -> None:
        await db.fetchval("SELECT 1")
        await terminate(pg_dsn)
        async with db.transaction() as tx:
            assert await tx.fetchval("SELECT 1") == 1

    async def test_statement_in_a_transaction_is_not_retried(
        self, db: Database, pg_dsn: str
    ) -> None:
        await db.execute("CREATE TABLE t (v INTEGER)")
        with pytest.raises(StoreError) as caught:
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO t (v) VALUES (1)")
                await terminate(pg_dsn)
                await tx.execute("INSERT INTO t (v) VALUES (2)")
        assert caught.value.__cause__ is not None
        assert await db.fetchval("SELECT count(*) FROM t") == 0

    async def test_unreachable_server_raises_store_error_without_the_password(self) -> None:
        settings = StateSettings(
            backend="postgres", dsn=SecretStr("postgresql://pacsflow:s3cret@127.0.0.1:1/pacsflow")
        )
        with pytest.raises(StoreError) as caught:
            await open_database(settings)
        assert "s3cret" not in str(caught.value)
        assert "127.0.0.1:1" in str(caught.value)


async def test_postgres_settings_open_a_pool(pg_dsn: str) -> None:
    db = await open_database(StateSettings(backend="postgres", dsn=SecretStr(pg_dsn)))
    try:
        assert isinstance(db, PostgresDatabase)
        assert db.dialect == "postgres"
        assert await db.fetchval("SELECT current_setting('application_name')") == "pacsflow"
    finally:
        await db.close()
