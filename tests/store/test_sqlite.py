"""The state store contract on SQLite, and what only the SQLite backend does."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pacsflow.config import StateSettings
from pacsflow.errors import StoreError
from pacsflow.store import Database, SqliteDatabase, open_database
from pacsflow.store.sqlite import translate_parameters
from tests.sqlite_files import first_write_in_progress

from .contract import DatabaseContract, LedgerContract, MigrationContract


class SqliteStore:
    @pytest.fixture
    def settings(self, tmp_path: Path) -> StateSettings:
        # A folder that does not exist yet: opening creates it.
        return StateSettings(backend="sqlite", path=tmp_path / "state" / "pacsflow.db")


class TestSqliteDatabase(SqliteStore, DatabaseContract):
    pass


class TestSqliteMigrations(SqliteStore, MigrationContract):
    pass


class TestSqliteLedger(SqliteStore, LedgerContract):
    pass


class TestTranslateParameters:
    def test_plain_sequence_binds_arguments_as_given(self) -> None:
        statement = translate_parameters("INSERT INTO t VALUES ($1, $2, $3)")
        assert statement.sql == "INSERT INTO t VALUES (?, ?, ?)"
        assert statement.arguments(["a", "b", "c"]) == ["a", "b", "c"]

    def test_repeated_and_reordered_parameters_are_bound_from_their_argument(self) -> None:
        statement = translate_parameters("SELECT $2, $1, $2, $10")
        assert statement.sql == "SELECT ?, ?, ?, ?"
        assert statement.count == 10
        assert list(statement.arguments(list(range(1, 11)))) == [2, 1, 2, 10]

    def test_literals_quoted_names_and_comments_are_left_alone(self) -> None:
        sql = """SELECT '$1''s' AS "$2", $1 -- $3\n/* $4 */ FROM t"""
        statement = translate_parameters(sql)
        assert statement.sql == """SELECT '$1''s' AS "$2", ? -- $3\n/* $4 */ FROM t"""
        assert statement.count == 1

    def test_wrong_argument_count_is_refused(self) -> None:
        with pytest.raises(StoreError, match="takes 2 arguments, 3 were passed"):
            translate_parameters("SELECT $1, $2").arguments([1, 2, 3])


class TestSqliteFile:
    async def test_parent_folder_is_created(self, tmp_path: Path) -> None:
        path = tmp_path / "a" / "b" / "state.db"
        db = await open_database(StateSettings(backend="sqlite", path=path))
        try:
            assert isinstance(db, SqliteDatabase) and db.path == path
            assert path.is_file()
        finally:
            await db.close()

    async def test_wal_foreign_keys_and_busy_timeout_are_on(self, tmp_path: Path) -> None:
        db = await SqliteDatabase.open(tmp_path / "s.db", busy_timeout=12.5)
        try:
            assert await db.fetchval("PRAGMA journal_mode") == "wal"
            assert await db.fetchval("PRAGMA foreign_keys") == 1
            assert await db.fetchval("PRAGMA busy_timeout") == 12500
            assert await db.fetchval("PRAGMA synchronous") == 2  # FULL
        finally:
            await db.close()

    async def test_opening_waits_while_another_connection_writes_a_new_file(
        self, tmp_path: Path
    ) -> None:
        # A file still in its first, rollback-journal write: SQLite refuses the switch to WAL
        # at once ("database is locked") rather than on the busy timeout, so opening must wait.
        path = tmp_path / "s.db"
        with first_write_in_progress(path, commit_after=0.3):
            db = await SqliteDatabase.open(path, busy_timeout=5)
            try:
                assert await db.fetchval("PRAGMA journal_mode") == "wal"
                assert await db.fetchval("SELECT count(*) FROM t") == 1
            finally:
                await db.close()

    async def test_opening_gives_up_after_the_busy_timeout(self, tmp_path: Path) -> None:
        path = tmp_path / "s.db"
        with first_write_in_progress(path):
            started = time.monotonic()
            with pytest.raises(StoreError, match="locked"):
                await SqliteDatabase.open(path, busy_timeout=0.3)
        assert time.monotonic() - started >= 0.2

    async def test_too_old_sqlite_is_refused(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
        with pytest.raises(StoreError, match="too old"):
            await SqliteDatabase.open(tmp_path / "s.db")

    async def test_unopenable_file_raises_store_error(self, tmp_path: Path) -> None:
        (tmp_path / "dir.db").mkdir()
        with pytest.raises(StoreError):
            await SqliteDatabase.open(tmp_path / "dir.db")


class TestSqliteWriters:
    @pytest.fixture
    async def db(self, tmp_path: Path) -> AsyncIterator[Database]:
        db = await SqliteDatabase.open(tmp_path / "s.db")
        await db.execute("CREATE TABLE counter (n INTEGER NOT NULL)")
        await db.execute("INSERT INTO counter (n) VALUES (0)")
        yield db
        await db.close()

    async def test_read_modify_write_from_two_connections_loses_nothing(
        self, db: Database, tmp_path: Path
    ) -> None:
        other = await SqliteDatabase.open(tmp_path / "s.db")

        async def bump(store: Database, times: int) -> None:
            for _ in range(times):
                async with store.transaction() as tx:
                    n = await tx.fetchval("SELECT n FROM counter")
                    await asyncio.sleep(0)
                    await tx.execute("UPDATE counter SET n = $1", n + 1)

        try:
            await asyncio.gather(bump(db, 40), bump(other, 40), bump(db, 20))
        finally:
            await other.close()
        assert await db.fetchval("SELECT n FROM counter") == 100

    async def test_writer_waits_for_a_lock_held_by_another_connection(
        self, db: Database, tmp_path: Path
    ) -> None:
        # Another connection to the file (as the embedded bus keeps) holds the write lock.
        locked = threading.Event()

        def hold_lock() -> None:
            conn = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE counter SET n = 10")
            locked.set()
            time.sleep(0.3)
            conn.execute("COMMIT")
            conn.close()

        holder = threading.Thread(target=hold_lock)
        holder.start()
        await asyncio.to_thread(locked.wait)
        async with db.transaction() as tx:
            await tx.execute("UPDATE counter SET n = n + 1")
        holder.join()
        assert await db.fetchval("SELECT n FROM counter") == 11

    async def test_statement_on_the_database_inside_its_own_transaction_raises(
        self, db: Database
    ) -> None:
        # It would wait forever for the connection its own transaction holds.
        with pytest.raises(StoreError, match="inside its own transaction"):
            async with db.transaction():
                await db.execute("UPDATE counter SET n = 1")
        assert await db.fetchval("SELECT n FROM counter") == 0


class TestCancelledBegin:
    async def test_a_task_cancelled_while_beginning_leaves_no_open_transaction(
        self, tmp_path: Path
    ) -> None:
        """A cancel that arrives while BEGIN IMMEDIATE runs in the thread must not leave the
        connection inside a transaction (later transactions would all fail)."""
        db = await SqliteDatabase.open(tmp_path / "state.db")
        blocker = sqlite3.connect(tmp_path / "state.db", timeout=30)
        try:
            await db.execute("CREATE TABLE t (v INTEGER)")
            blocker.execute("BEGIN IMMEDIATE")  # BEGIN in the pool now waits for this lock

            async def write() -> None:
                async with db.transaction() as tx:
                    await tx.execute("INSERT INTO t VALUES (1)")

            task = asyncio.create_task(write())
            await asyncio.sleep(0.3)
            task.cancel()
            await asyncio.sleep(0.1)
            blocker.rollback()  # the BEGIN now completes, after the cancel
            with pytest.raises(asyncio.CancelledError):
                await task
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (2)")
            assert await db.fetchval("SELECT group_concat(v) FROM t") == "2"
        finally:
            blocker.close()
            await db.close()
