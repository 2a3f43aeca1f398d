"""The state store contract: cases written once, run against every backend.

Each backend's module subclasses these classes and provides the ``settings`` fixture (a
:class:`~pacsflow.config.StateSettings` naming a fresh, empty store); everything else is opened
through :func:`pacsflow.store.open_database`, as the services do.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pacsflow.config import StateSettings
from pacsflow.errors import StoreError
from pacsflow.store import (
    Database,
    FileDetails,
    Ledger,
    Outcome,
    Row,
    SeenFile,
    applied,
    discover,
    open_database,
    pending,
    upgrade,
)
from pacsflow.store.ledger import SentCopy, find_sent_query

# ---------------------------------------------------------------------------------------------
# helpers


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingDatabase:
    """A Database that counts the statements sent through it (transactions included)."""

    def __init__(self, inner: Database, counter: list[str] | None = None) -> None:
        self.inner = inner
        self.dialect = inner.dialect
        self.calls: list[str] = [] if counter is None else counter

    async def execute(self, sql: str, *args: Any) -> None:
        self.calls.append("execute")
        await self.inner.execute(sql, *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.calls.append("executemany")
        await self.inner.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        self.calls.append("fetch")
        return await self.inner.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        self.calls.append("fetchrow")
        return await self.inner.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        self.calls.append("fetchval")
        return await self.inner.fetchval(sql, *args)

    def transaction(self) -> AbstractAsyncContextManager[Database]:
        @asynccontextmanager
        async def wrapped() -> AsyncIterator[Database]:
            self.calls.append("transaction")
            async with self.inner.transaction() as tx:
                yield CountingDatabase(tx, self.calls)

        return wrapped()

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


def blob_type(db: Database) -> str:
    return "BYTEA" if db.dialect == "postgres" else "BLOB"


def make_migrations(root: Path, files: dict[str, str]) -> str:
    """A package ``<unique>.migrations`` under ``root`` holding ``files``; its dotted name."""
    name = f"pf_demo_{uuid.uuid4().hex[:10]}"
    folder = root / name / "migrations"
    folder.mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    (folder / "__init__.py").write_text("")
    for filename, sql in files.items():
        (folder / filename).write_text(textwrap.dedent(sql))
    return f"{name}.migrations"


def settings_json(settings: StateSettings) -> str:
    return json.dumps(
        {
            "backend": settings.backend,
            "path": str(settings.path),
            "dsn": settings.dsn.get_secret_value(),
            "pool_size": settings.pool_size,
        }
    )


class StoreCase:
    """Opens the store under test; backends override ``settings``."""

    @pytest.fixture
    def settings(self) -> StateSettings:
        raise NotImplementedError("each backend's test module provides the settings")

    @pytest.fixture
    async def db(self, settings: StateSettings) -> AsyncIterator[Database]:
        database = await open_database(settings)
        try:
            yield database
        finally:
            await database.close()

    @pytest.fixture
    async def other_db(self, settings: StateSettings) -> AsyncIterator[Database]:
        """A second, independent connection (pool or file handle) to the same store."""
        database = await open_database(settings)
        try:
            yield database
        finally:
            await database.close()


# ---------------------------------------------------------------------------------------------
# the Database port


class DatabaseContract(StoreCase):
    """execute / fetch / transactions behave the same on every backend."""

    async def _make_table(self, db: Database) -> None:
        await db.execute(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT UNIQUE, n BIGINT,"
            f" x DOUBLE PRECISION, data {blob_type(db)})"
        )

    async def test_round_trip_keeps_text_int_float_bytes_and_null(self, db: Database) -> None:
        await self._make_table(db)
        await db.execute(
            "INSERT INTO items (id, name, n, x, data) VALUES ($1, $2, $3, $4, $5)",
            1, "Zürich ✓ 'quoted'", 2**53 + 1, 0.1, b"\x00\xff\x10",
        )  # fmt: skip
        await db.execute(
            "INSERT INTO items (id, name, n, x, data) VALUES (2, NULL, NULL, NULL, NULL)"
        )
        rows = await db.fetch("SELECT id, name, n, x, data FROM items ORDER BY id")
        assert rows == [
            {
                "id": 1,
                "name": "Zürich ✓ 'quoted'",
                "n": 2**53 + 1,
                "x": 0.1,
                "data": b"\x00\xff\x10",
            },
            {"id": 2, "name": None, "n": None, "x": None, "data": None},
        ]
        assert isinstance(rows[0]["n"], int) and isinstance(rows[0]["x"], float)
        assert isinstance(rows[0]["data"], bytes)

    async def test_rows_are_mappings_by_column_name(self, db: Database) -> None:
        await self._make_table(db)
        await db.execute("INSERT INTO items (id, name) VALUES ($1, $2)", 7, "seven")
        row = await db.fetchrow("SELECT name AS label, id FROM items")
        assert row is not None
        assert list(row) == ["label", "id"]
        assert row["label"] == "seven" and dict(row) == {"label": "seven", "id": 7}

    async def test_fetchrow_and_fetchval_give_none_without_rows(self, db: Database) -> None:
        await self._make_table(db)
        assert await db.fetchrow("SELECT * FROM items") is None
        assert await db.fetchval("SELECT id FROM items") is None
        assert await db.fetch("SELECT * FROM items") == []
        assert await db.fetchval("SELECT count(*) FROM items") == 0

    async def test_parameters_may_repeat_and_come_in_any_order(self, db: Database) -> None:
        await self._make_table(db)
        await db.execute("INSERT INTO items (id, name) VALUES ($2, $1 || '-' || $1)", "ab", 3)
        assert await db.fetchrow("SELECT id, name FROM items") == {"id": 3, "name": "ab-ab"}
        assert await db.fetchval("SELECT $2 || '-' || $1 || '-' || $2", "a", "b") == "b-a-b"

    async def test_dollar_in_literal_or_comment_is_not_a_parameter(self, db: Database) -> None:
        value = await db.fetchval(
            "SELECT '$1 costs $2' || $1 -- and $2 here is a comment\n", " (really)"
        )
        assert value == "$1 costs $2 (really)"

    async def test_wrong_number_of_arguments_raises_store_error(self, db: Database) -> None:
        await self._make_table(db)
        with pytest.raises(StoreError):
            await db.execute("INSERT INTO items (id, name) VALUES ($1, $2)", 1)
        with pytest.raises(StoreError):
            await db.execute("INSERT INTO items (id) VALUES ($1)", 1, 2)

    async def test_bad_sql_raises_store_error_with_the_cause(self, db: Database) -> None:
        with pytest.raises(StoreError) as caught:
            await db.fetch("SELEKT 1")
        assert caught.value.__cause__ is not None
        assert "SELEKT" in str(caught.value)

    async def test_unique_violation_raises_store_error(self, db: Database) -> None:
        await self._make_table(db)
        await db.execute("INSERT INTO items (id, name) VALUES (1, 'a')")
        with pytest.raises(StoreError):
            await db.execute("INSERT INTO items (id, name) VALUES (2, 'a')")
        assert await db.fetchval("SELECT count(*) FROM items") == 1

    async def test_on_conflict_and_returning(self, db: Database) -> None:
        await self._make_table(db)
        upsert = (
            "INSERT INTO items (id, name, n) VALUES ($1, $2, 1)"
            " ON CONFLICT (name) DO UPDATE SET n = items.n + 1 RETURNING id, n"
        )
        assert await db.fetchrow(upsert, 1, "a") == {"id": 1, "n": 1}
        assert await db.fetchrow(upsert, 2, "a") == {"id": 1, "n": 2}
        skipped = await db.fetch(
            "INSERT INTO items (id, name) VALUES (3, 'a'), (4, 'b')"
            " ON CONFLICT DO NOTHING RETURNING id"
        )
        assert skipped == [{"id": 4}]

    async def test_executemany_inserts_every_row(self, db: Database) -> None:
        await self._make_table(db)
        await db.executemany(
            "INSERT INTO items (id, name, x) VALUES ($1, $2, $3)",
            ((i, f"n{i}", i / 2) for i in range(500)),
        )
        assert await db.fetchval("SELECT count(*) FROM items") == 500
        assert await db.fetchval("SELECT x FROM items WHERE id = 499") == 249.5
        await db.executemany("INSERT INTO items (id) VALUES ($1)", [])

    async def test_executemany_is_atomic(self, db: Database) -> None:
        await self._make_table(db)
        with pytest.raises(StoreError):
            await db.executemany(
                "INSERT INTO items (id, name) VALUES ($1, $2)",
                [(1, "a"), (2, "b"), (3, "a")],
            )
        assert await db.fetchval("SELECT count(*) FROM items") == 0

    async def test_script_without_arguments_runs_every_statement(self, db: Database) -> None:
        await db.execute(
            """
            -- two tables; the semicolon in 'a;b' does not end a statement
            CREATE TABLE one (v TEXT);
            CREATE TABLE two (v TEXT);
            INSERT INTO one (v) VALUES ('a;b');
            """
        )
        assert await db.fetchval("SELECT v FROM one") == "a;b"
        assert await db.fetchval("SELECT count(*) FROM two") == 0

    async def test_failing_script_outside_a_transaction_changes_nothing(self, db: Database) -> None:
        await self._make_table(db)
        with pytest.raises(StoreError):
            await db.execute(
                "INSERT INTO items (id, name) VALUES (1, 'a');"
                " INSERT INTO items (id, name) VALUES (1, 'b');"
            )
        assert await db.fetchval("SELECT count(*) FROM items") == 0

    async def test_transaction_commits_on_exit(self, db: Database, other_db: Database) -> None:
        await self._make_table(db)
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO items (id, name) VALUES (1, 'a')")
            await tx.executemany("INSERT INTO items (id) VALUES ($1)", [(2,), (3,)])
            assert await tx.fetchval("SELECT count(*) FROM items") == 3
        assert await other_db.fetchval("SELECT count(*) FROM items") == 3

    async def test_transaction_rolls_back_on_exception(self, db: Database) -> None:
        await self._make_table(db)

        class Boom(Exception):
            pass

        with pytest.raises(Boom):
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO items (id, name) VALUES (1, 'a')")
                raise Boom
        assert await db.fetchval("SELECT count(*) FROM items") == 0

    async def test_failed_statement_rolls_back_the_whole_transaction(self, db: Database) -> None:
        await self._make_table(db)
        with pytest.raises(StoreError):
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO items (id, name) VALUES (1, 'a')")
                await tx.execute("INSERT INTO items (id, name) VALUES (2, 'a')")
        assert await db.fetchval("SELECT count(*) FROM items") == 0

    async def test_nested_transaction_rolls_back_alone(self, db: Database) -> None:
        await self._make_table(db)
        async with db.transaction() as tx:
            await tx.execute("INSERT INTO items (id) VALUES (1)")
            with pytest.raises(KeyError):
                async with tx.transaction() as inner:
                    await inner.execute("INSERT INTO items (id) VALUES (2)")
                    raise KeyError("undo the savepoint only")
            async with tx.transaction() as inner:
                await inner.execute("INSERT INTO items (id) VALUES (3)")
        ids = [row["id"] for row in await db.fetch("SELECT id FROM items ORDER BY id")]
        assert ids == [1, 3]

    async def test_transaction_database_is_unusable_after_the_block(self, db: Database) -> None:
        await self._make_table(db)
        async with db.transaction() as tx:
            pass
        with pytest.raises(StoreError):
            await tx.execute("INSERT INTO items (id) VALUES (1)")
        assert await db.fetchval("SELECT count(*) FROM items") == 0

    async def test_other_tasks_do_not_join_an_open_transaction(self, db: Database) -> None:
        await self._make_table(db)
        inside = asyncio.Event()

        async def rolled_back() -> None:
            with pytest.raises(RuntimeError):
                async with db.transaction() as tx:
                    await tx.execute("INSERT INTO items (id, name) VALUES (1, 'in tx')")
                    inside.set()
                    await asyncio.sleep(0.2)
                    raise RuntimeError("roll back")

        async def outside() -> None:
            await inside.wait()
            await db.execute("INSERT INTO items (id, name) VALUES (2, 'outside')")

        await asyncio.gather(rolled_back(), outside())
        names = [row["name"] for row in await db.fetch("SELECT name FROM items")]
        assert names == ["outside"]

    async def test_concurrent_transactions_all_commit(self, db: Database) -> None:
        await db.execute("CREATE TABLE counter (n INTEGER NOT NULL)")
        await db.execute("INSERT INTO counter (n) VALUES (0)")

        async def bump() -> None:
            async with db.transaction() as tx:
                await tx.execute("UPDATE counter SET n = n + 1")
                await asyncio.sleep(0)

        await asyncio.gather(*(bump() for _ in range(25)))
        assert await db.fetchval("SELECT n FROM counter") == 25

    async def test_cancelled_transaction_rolls_back_and_frees_the_store(self, db: Database) -> None:
        await self._make_table(db)
        started = asyncio.Event()

        async def stuck() -> None:
            async with db.transaction() as tx:
                await tx.execute("INSERT INTO items (id) VALUES (1)")
                started.set()
                await asyncio.sleep(30)

        task = asyncio.create_task(stuck())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await db.execute("INSERT INTO items (id) VALUES (2)")
        assert [r["id"] for r in await db.fetch("SELECT id FROM items")] == [2]

    async def test_two_connections_see_each_others_commits(
        self, db: Database, other_db: Database
    ) -> None:
        await self._make_table(db)
        await db.execute("INSERT INTO items (id) VALUES (1)")
        assert await other_db.fetchval("SELECT count(*) FROM items") == 1
        async with other_db.transaction() as tx:
            await tx.execute("INSERT INTO items (id) VALUES (2)")
        assert await db.fetchval("SELECT count(*) FROM items") == 2

    async def test_ping_answers_until_closed(self, settings: StateSettings) -> None:
        db = await open_database(settings)
        assert await db.ping() is True
        await db.close()
        assert await db.ping() is False
        with pytest.raises(StoreError):
            await db.fetchval("SELECT 1")


# ---------------------------------------------------------------------------------------------
# migrations


DEMO = {
    "0001_base.sql": """
        CREATE TABLE demo (id INTEGER PRIMARY KEY, dialect TEXT);
        CREATE TABLE demo_log (note TEXT);
        INSERT INTO demo_log (note) VALUES ('0001');
    """,
    "0002_dialect.postgres.sql": "INSERT INTO demo (id, dialect) VALUES (2, 'postgres');",
    "0002_dialect.sqlite.sql": "INSERT INTO demo (id, dialect) VALUES (2, 'sqlite');",
    "0003_shared.sql": "INSERT INTO demo (id, dialect) VALUES (3, 'shared');",
}


class MigrationContract(StoreCase):
    """Versioned migrations apply once, in order, from one or many processes."""

    @pytest.fixture
    def demo(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
        """Component ``demo`` with the DEMO migrations (packages mapping for migrate)."""
        root = tmp_path / "packages"
        root.mkdir()
        monkeypatch.syspath_prepend(str(root))
        return {"demo": make_migrations(root, DEMO)}

    async def test_core_migrations_apply_once_and_are_recorded(self, db: Database) -> None:
        core = [("core", 1, "ledger"), ("core", 2, "ledger_announced"),
                ("core", 3, "ledger_announcing"), ("core", 4, "ledger_sending_read")]
        assert [str(m) for m in await pending(db, ["core"])] == [
            "core 0001_ledger", "core 0002_ledger_announced", "core 0003_ledger_announcing",
            "core 0004_ledger_sending_read"]
        first = await upgrade(db, ["core"])
        assert [(m.component, m.version, m.name) for m in first] == core
        assert first[0].filename == f"0001_ledger.{db.dialect}.sql"
        assert await upgrade(db, ["core"]) == []
        assert await pending(db, ["core"]) == []
        rows = await applied(db)
        assert [(r.component, r.version, r.name) for r in rows] == core
        assert rows[0].applied_at > 0
        assert await db.fetchval("SELECT count(*) FROM ledger_files") == 0

    async def test_applied_is_empty_before_any_upgrade(self, db: Database) -> None:
        assert await applied(db) == []

    async def test_each_dialect_gets_its_own_file(self, db: Database, demo: dict[str, str]) -> None:
        done = await upgrade(db, packages=demo)
        assert [m.filename for m in done] == [
            "0001_base.sql",
            f"0002_dialect.{db.dialect}.sql",
            "0003_shared.sql",
        ]
        rows = await db.fetch("SELECT id, dialect FROM demo ORDER BY id")
        assert rows == [{"id": 2, "dialect": db.dialect}, {"id": 3, "dialect": "shared"}]

    async def test_missing_component_package_is_skipped(self, db: Database) -> None:
        packages = {"core": "pacsflow.store.migrations", "ghost": "pf_no_such_package.migrations"}
        assert {m.component for m in discover(db.dialect, packages=packages)} == {"core"}
        assert [str(m) for m in await upgrade(db, packages=packages)] == [
            "core 0001_ledger", "core 0002_ledger_announced", "core 0003_ledger_announcing",
            "core 0004_ledger_sending_read"]

    async def test_failed_migration_is_rolled_back_and_not_recorded(
        self, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.syspath_prepend(str(tmp_path))
        package = make_migrations(
            tmp_path,
            {
                "0001_ok.sql": "CREATE TABLE kept (v TEXT);",
                "0002_broken.sql": "CREATE TABLE undone (v TEXT); INSERT INTO nowhere VALUES (1);",
            },
        )
        with pytest.raises(StoreError, match="0002_broken"):
            await upgrade(db, packages={"demo": package})
        assert [(m.component, m.version) for m in await applied(db)] == [("demo", 1)]
        with pytest.raises(StoreError):
            await db.fetch("SELECT * FROM undone")
        assert [m.version for m in await pending(db, packages={"demo": package})] == [2]

    async def test_misnamed_file_is_refused(
        self, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.syspath_prepend(str(tmp_path))
        package = make_migrations(tmp_path, {"0001-first.sql": "SELECT 1;"})
        with pytest.raises(StoreError, match=r"0001-first\.sql"):
            await upgrade(db, packages={"demo": package})

    async def test_migration_added_out_of_order_is_refused(
        self, db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.syspath_prepend(str(tmp_path))
        package = make_migrations(tmp_path, {"0002_second.sql": "CREATE TABLE second (v TEXT);"})
        await upgrade(db, packages={"demo": package})
        late = Path(tmp_path / package.replace(".", "/") / "0001_first.sql")
        late.write_text("CREATE TABLE first (v TEXT);")
        with pytest.raises(StoreError, match="out of order"):
            await upgrade(db, packages={"demo": package})

    async def test_concurrent_upgrades_apply_each_migration_once(
        self, db: Database, other_db: Database, demo: dict[str, str]
    ) -> None:
        results = await asyncio.gather(upgrade(db, packages=demo), upgrade(other_db, packages=demo))
        applied_versions = sorted(m.version for result in results for m in result)
        assert applied_versions == [1, 2, 3]
        assert await db.fetchval("SELECT count(*) FROM demo_log") == 1
        assert len(await applied(db)) == 3

    async def test_upgrades_from_two_processes_apply_each_migration_once(
        self, db: Database, settings: StateSettings, tmp_path: Path
    ) -> None:
        # A slow first migration, so that both processes are inside upgrade at once.
        slow = (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000)"
            " SELECT count(*) FROM c;"
        )
        package = make_migrations(
            tmp_path,
            {
                "0001_slow.sql": f"CREATE TABLE race_log (note TEXT); {slow}"
                " INSERT INTO race_log (note) VALUES ('0001');",
                "0002_next.sql": "INSERT INTO race_log (note) VALUES ('0002');",
            },
        )
        go = tmp_path / "go"
        child = textwrap.dedent(
            f"""
            import asyncio, json, os, sys, time
            from pacsflow.config import StateSettings
            from pacsflow.store import open_database, upgrade

            async def main():
                db = await open_database(StateSettings(**json.loads(os.environ["PF_STATE"])))
                while not os.path.exists({str(go)!r}):
                    time.sleep(0.005)
                done = await upgrade(db, packages={{"race": {package!r}}})
                await db.close()
                print(json.dumps([m.version for m in done]))

            asyncio.run(main())
            """
        )
        env = dict(os.environ, PF_STATE=settings_json(settings), PYTHONPATH=str(tmp_path))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", child],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        await asyncio.sleep(0.5)
        go.write_text("")
        outputs = [await asyncio.to_thread(p.communicate, timeout=60) for p in procs]
        for proc, (_, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, err
        versions = sorted(v for out, _ in outputs for v in json.loads(out))
        assert versions == [1, 2]
        notes = [r["note"] for r in await db.fetch("SELECT note FROM race_log ORDER BY note")]
        assert notes == ["0001", "0002"]


# ---------------------------------------------------------------------------------------------
# the file ledger


async def explain(db: Database, sql: str, args: Sequence[Any]) -> list[str]:
    """The plan's lines: access path per table on PostgreSQL, EXPLAIN QUERY PLAN on SQLite."""
    if db.dialect == "postgres":
        [row] = await db.fetch(f"EXPLAIN (FORMAT JSON) {sql}", *args)
        plan = row["QUERY PLAN"]
        plan = json.loads(plan) if isinstance(plan, str) else plan
        lines: list[str] = []

        def walk(node: dict[str, Any]) -> None:
            lines.append(f"{node['Node Type']} {node.get('Index Name', '')}"
                         f" on {node.get('Relation Name', '')}")  # fmt: skip
            for child in node.get("Plans", []):
                walk(child)

        walk(plan[0]["Plan"])
        return lines
    rows = await db.fetch(f"EXPLAIN QUERY PLAN {sql}", *args)
    return [str(row["detail"]) for row in rows]


def assert_index_lookups(plan: list[str], dialect: str) -> None:
    """Both ledger tables are read through an index, never scanned whole."""
    text = "\n".join(plan)
    if dialect == "postgres":
        # Per UID: an index (or bitmap index) scan of each table, nothing read whole.
        assert not any("Seq Scan" in line for line in plan), text
        assert any(line.startswith(("Index Scan ledger_files_sop_instance",
                                     "Bitmap Index Scan ledger_files_sop_instance"))
                   for line in plan), text  # fmt: skip
        assert any(line.startswith(("Index Scan ledger_deliveries_pkey",
                                    "Index Only Scan ledger_deliveries_pkey",
                                    "Bitmap Index Scan ledger_deliveries_pkey"))
                   for line in plan), text  # fmt: skip
        assert plan[0].startswith("Nested Loop"), text
    else:
        assert any("ledger_files_sop_instance" in line for line in plan), text
        assert any("d USING" in line and ("PRIMARY KEY" in line or "INDEX" in line)
                   for line in plan), text  # fmt: skip
        assert not any(line.startswith("SCAN") and " USING " not in line for line in plan), text


def sent_pairs(found: dict[str, list[SentCopy]]) -> dict[tuple[str, str | None], frozenset[str]]:
    """(SOP Instance UID, sha256) -> destinations of :meth:`Ledger.sent_copies`' answer."""
    return {(copy.sop_instance_uid, copy.sha256): copy.destinations
            for copies in found.values() for copy in copies}  # fmt: skip


def seen(name: str, size: int = 100, mtime: float = 1.0, **details: Any) -> SeenFile:
    return SeenFile(path=f"/inbox/{name}", size=size, mtime=mtime, **details)


class LedgerContract(StoreCase):
    """The file ledger, on a migrated store."""

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    async def ledger(self, db: Database, clock: FakeClock) -> Ledger:
        await upgrade(db, ["core"])
        return Ledger(db, clock=clock)

    async def _sent(
        self, ledger: Ledger, name: str, uid: str = "1.2.3", sha: str | None = "h"
    ) -> int:
        """Record one file and confirm it at ``pacs``; its id."""
        [rec] = await ledger.record_seen([seen(name, sop_instance_uid=uid, sha256=sha)])
        await ledger.record_outcomes([Outcome(rec.id, "pacs", "sent", 0)])
        return rec.id

    async def test_rescan_finds_the_same_rows(self, ledger: Ledger) -> None:
        first = await ledger.record_seen([seen("a"), seen("b")])
        assert [r.new for r in first] == [True, True]
        assert [r.status for r in first] == ["ready", "ready"]
        again = await ledger.record_seen([seen("b"), seen("c"), seen("a")])
        assert [(r.path, r.new) for r in again] == [
            ("/inbox/b", False),
            ("/inbox/c", True),
            ("/inbox/a", False),
        ]
        assert again[0].id == first[1].id and again[2].id == first[0].id
        assert await ledger.count_files() == 3

    async def test_looking_up_first_finds_and_records_the_same(self, ledger: Ledger) -> None:
        first = await ledger.record_seen([seen("a"), seen("b")])
        await ledger.mark_invalid({first[1].id: "not DICOM"})
        again = await ledger.record_seen(
            [seen("b"), seen("c"), seen("a"), seen("c"), seen("a", size=5)], look_up_first=True
        )
        assert [(r.path, r.size, r.new, r.status) for r in again] == [
            ("/inbox/b", 100, False, "invalid"), ("/inbox/c", 100, True, "ready"),
            ("/inbox/a", 100, False, "ready"), ("/inbox/c", 100, False, "ready"),
            ("/inbox/a", 5, True, "ready"),
        ]  # fmt: skip
        assert (again[0].id, again[2].id) == (first[1].id, first[0].id)
        assert again[1].id == again[3].id
        assert await ledger.count_files() == 4

    async def test_file_changed_in_place_is_a_new_row(self, ledger: Ledger) -> None:
        [old] = await ledger.record_seen([seen("a", size=100, mtime=1.0)])
        [bigger, touched] = await ledger.record_seen(
            [seen("a", size=200, mtime=1.0), seen("a", size=100, mtime=2.5)]
        )
        assert bigger.new and touched.new
        assert len({old.id, bigger.id, touched.id}) == 3

    async def test_same_file_twice_in_one_batch_is_one_row(self, ledger: Ledger) -> None:
        first, second = await ledger.record_seen([seen("a"), seen("a")])
        assert first.id == second.id
        assert (first.new, second.new) == (True, False)
        assert await ledger.count_files() == 1

    async def test_whole_rows_of_seen_files_are_what_the_store_holds(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        [known] = await ledger.record_seen([seen("known", sha256="k")])
        await ledger.mark_invalid({known.id: "not DICOM"})
        clock.now += 5
        files = [seen("known", sha256="k"),
                 seen("new", sha256="ab", sop_instance_uid="1.2.3", series_instance_uid="1.2",
                      study_instance_uid="1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                      transfer_syntax_uid="1.2.840.10008.1.2.1", batch_key="unit@1"),
                 seen("bare")]  # fmt: skip
        rows = await ledger.record_seen_rows(files)
        # New rows are built, not read back: they must equal what a read gives.
        stored = await ledger.get_files([row.id for row in rows])
        assert sorted(rows, key=lambda row: row.id) == stored
        assert [(r.path, r.status) for r in rows] == [
            ("/inbox/known", "invalid"), ("/inbox/new", "ready"), ("/inbox/bare", "ready"),
        ]  # fmt: skip
        assert rows[1].created_at == clock() and rows[0].created_at < clock()

    async def test_an_announcement_stands_once_its_batch_is_confirmed(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        files = [seen("a"), seen("b"), seen("bad")]
        first = await ledger.record_for_announcing(files, [True, True, False])
        assert [row.announced_at for row in first.rows] == [None, None, None]
        assert first.batch_id is not None
        assert first.file_ids == {first.rows[0].id, first.rows[1].id}
        # Not confirmed (the bus refused, or a crash): seen again, they still wait.
        clock.now += 5
        again = await ledger.record_for_announcing(files, [True, True, False])
        assert again.batch_id is None and again.file_ids == frozenset()
        assert [row.announced_at for row in again.rows] == [None, None, None]
        await ledger.mark_announced([first.rows[0].id, first.rows[1].id], first)
        assert await ledger._db.fetchval("SELECT count(*) FROM ledger_announcing") == 0  # noqa: SLF001
        rows = await ledger.record_seen_rows(files)
        assert [row.announced_at for row in rows] == [1000.0, 1000.0, None]

    async def test_files_announced_again_leave_the_batch_a_crash_left(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        files = [seen("a"), seen("b")]
        left = await ledger.record_for_announcing(files, [True, True])  # never confirmed
        clock.now += 5
        again = await ledger.record_for_announcing(files, [True, True])
        await ledger.mark_announced([again.rows[0].id], again)
        rows = await ledger.record_seen_rows(files)
        assert [row.announced_at for row in rows] == [1005.0, None]
        batches = await ledger._db.fetch("SELECT id, file_ids FROM ledger_announcing")  # noqa: SLF001
        assert [(b["id"], b["file_ids"]) for b in batches] == [
            (left.batch_id, f"[{again.rows[1].id}]")]
        await ledger.mark_announced([again.rows[1].id])
        assert await ledger._db.fetchval("SELECT count(*) FROM ledger_announcing") == 0  # noqa: SLF001

    async def test_pruning_keeps_only_files_still_waiting_to_be_announced(
        self, ledger: Ledger
    ) -> None:
        kept = await ledger.record_for_announcing([seen("a"), seen("b")], [True, True])
        gone = await ledger.record_for_announcing([seen("c")], [True])
        await ledger.mark_invalid({kept.rows[1].id: "not DICOM", gone.rows[0].id: "not DICOM"})
        assert await ledger.prune_announcing() == 1
        batches = await ledger._db.fetch("SELECT id, file_ids FROM ledger_announcing")  # noqa: SLF001
        assert [(b["id"], b["file_ids"]) for b in batches] == [
            (kept.batch_id, f"[{kept.rows[0].id}]")]
        assert await ledger.prune_announcing() == 1
        # Being sent (stored as ready): the uploader has it, so it no longer waits either.
        await ledger.record_outcomes([Outcome(kept.rows[0].id, "pacs", "sending")])
        assert await ledger.prune_announcing() == 0
        assert await ledger._db.fetchval("SELECT count(*) FROM ledger_announcing") == 0  # noqa: SLF001

    async def test_status_tells_what_a_known_file_still_needs(self, ledger: Ledger) -> None:
        [rec] = await ledger.record_seen([seen("a")])
        await ledger.mark_invalid({rec.id: "not DICOM"})
        [again] = await ledger.record_seen([seen("a")])
        assert (again.new, again.status) == (False, "invalid")

    async def test_details_are_kept(self, ledger: Ledger) -> None:
        details: dict[str, Any] = dict(
            sha256="ab" * 32,
            sop_instance_uid="1.2.3.4",
            series_instance_uid="1.2.3",
            study_instance_uid="1.2",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            batch_key="series-1",
        )
        [rec] = await ledger.record_seen([seen("a", **details)])
        [later] = await ledger.record_seen([seen("b")])
        await ledger.set_details([FileDetails(later.id, sha256="cd" * 32, sop_instance_uid="9.9")])
        a, b = await ledger.get_files([rec.id, later.id])
        assert {k: getattr(a, k) for k in details} == details
        assert (a.size, a.mtime, a.status, a.created_at) == (100, 1.0, "ready", 1000.0)
        assert (b.sha256, b.sop_instance_uid, b.batch_key) == ("cd" * 32, "9.9", None)

    async def test_invalid_file_keeps_its_reason(self, ledger: Ledger) -> None:
        _, bad = await ledger.record_seen([seen("good"), seen("bad")])
        await ledger.mark_invalid({bad.id: "no DICM prefix"})
        [file] = await ledger.get_files([bad.id])
        assert (file.status, file.reason) == ("invalid", "no DICM prefix")
        counts = await ledger.count_by_status()
        assert (counts["invalid"], counts["ready"]) == (1, 1)

    async def test_duplicate_found_only_for_same_uid_and_content_once_confirmed(
        self, ledger: Ledger
    ) -> None:
        await self._sent(ledger, "a", uid="1.2.3", sha="h1")
        [warned] = await ledger.record_seen([seen("w", sop_instance_uid="1.2.4", sha256="h4")])
        await ledger.record_outcomes([Outcome(warned.id, "backup", "warning", 0xB000)])
        [waiting] = await ledger.record_seen([seen("p", sop_instance_uid="1.2.5", sha256="h5")])
        await ledger.add_deliveries([waiting.id], ["pacs"])
        [failed] = await ledger.record_seen([seen("f", sop_instance_uid="1.2.6", sha256="h6")])
        await ledger.record_outcomes(
            [Outcome(failed.id, "pacs", "failed", 0xA700, "out of resources")]
        )
        found = await ledger.sent_copies(["1.2.3", "1.2.4", "1.2.5", "1.2.6", "9.9"])
        assert sent_pairs(found) == {
            ("1.2.3", "h1"): frozenset({"pacs"}),
            ("1.2.4", "h4"): frozenset({"backup"}),
        }

    async def test_a_file_is_no_copy_of_itself(self, ledger: Ledger) -> None:
        original = await self._sent(ledger, "a", uid="1.2.3", sha="h1")
        assert await ledger.sent_copies(["1.2.3"], exclude_file_ids=[original]) == {}
        [copy] = await ledger.record_seen([seen("copy", sop_instance_uid="1.2.3", sha256="h1")])
        found = await ledger.sent_copies(["1.2.3"], exclude_file_ids=[copy.id])
        assert sent_pairs(found) == {("1.2.3", "h1"): frozenset({"pacs"})}
        assert found["1.2.3"][0].location == "/inbox/a"

    async def test_a_copy_is_read_where_it_is_now_and_can_be_hashed_later(
        self, ledger: Ledger
    ) -> None:
        original = await self._sent(ledger, "a", uid="1.2.3", sha=None)
        await ledger.mark_archived({original: "/archive/a"})
        [copy] = (await ledger.sent_copies(["1.2.3"]))["1.2.3"]
        assert (copy.file_id, copy.sha256, copy.location) == (original, None, "/archive/a")
        await ledger.set_hashes({original: "h1"})
        [copy] = (await ledger.sent_copies(["1.2.3"]))["1.2.3"]
        assert copy.sha256 == "h1"

    async def test_duplicate_is_marked_and_skipped(self, ledger: Ledger) -> None:
        original = await self._sent(ledger, "a", uid="1.2.3", sha="h1")
        [copy] = await ledger.record_seen([seen("copy", sop_instance_uid="1.2.3", sha256="h1")])
        await ledger.mark_duplicate({copy.id: f"already sent as file {original}"})
        [file] = await ledger.get_files([copy.id])
        assert (file.status, file.reason) == ("duplicate", f"already sent as file {original}")
        assert [f.id for f in await ledger.list_confirmed()] == [original]

    async def test_outcomes_set_delivery_and_file_status(self, ledger: Ledger) -> None:
        [rec] = await ledger.record_seen([seen("a")])
        await ledger.add_deliveries([rec.id], ["pacs", "backup"])
        await ledger.add_deliveries([rec.id], ["pacs"])  # already there: unchanged
        deliveries = await ledger.deliveries([rec.id])
        assert [(d.destination, d.status, d.attempts) for d in deliveries] == [
            ("backup", "pending", 0),
            ("pacs", "pending", 0),
        ]
        await ledger.record_outcomes([Outcome(rec.id, "pacs", "sending")])
        assert (await ledger.get_files([rec.id]))[0].status == "sending"
        await ledger.record_outcomes(
            [Outcome(rec.id, "pacs", "failed", 0xA700, error="out of resources")]
        )
        # backup is still pending: the file waits rather than counting as failed
        assert (await ledger.get_files([rec.id]))[0].status == "ready"
        await ledger.record_outcomes(
            [Outcome(rec.id, "backup", "unsupported", 0x0122, error="SOP class not supported")]
        )
        assert (await ledger.get_files([rec.id]))[0].status == "failed"
        await ledger.record_outcomes([Outcome(rec.id, "pacs", "sent", 0x0000)])
        pacs = {d.destination: d for d in await ledger.deliveries([rec.id])}["pacs"]
        assert (pacs.status, pacs.dimse_status, pacs.attempts, pacs.last_error) == (
            "sent", 0, 2, None,
        )  # fmt: skip
        await ledger.record_outcomes(
            [
                Outcome(rec.id, "backup", "sent", 0, attempts=7),
                Outcome(rec.id, "pacs", "sent", 0, attempts=2),
            ]
        )
        assert {d.destination: d.attempts for d in await ledger.deliveries([rec.id])} == {
            "backup": 7,
            "pacs": 2,
        }
        assert (await ledger.get_files([rec.id]))[0].status == "sent"

    async def test_outcome_for_unknown_file_raises(self, ledger: Ledger) -> None:
        with pytest.raises(StoreError):
            await ledger.record_outcomes([Outcome(424242, "pacs", "sent", 0)])

    async def test_unknown_status_is_refused(self, ledger: Ledger) -> None:
        with pytest.raises(ValueError):
            await ledger.record_outcomes([Outcome(1, "pacs", "done", 0)])  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await ledger.list_files(status="gone")  # type: ignore[arg-type]

    async def test_file_stays_until_every_destination_succeeds(self, ledger: Ledger) -> None:
        recs = await ledger.record_seen(
            [seen(n) for n in ("both", "one", "failed", "warn", "none")]
        )
        both, one, failed, warn, none = (r.id for r in recs)
        await ledger.add_deliveries([both, one, failed, warn], ["pacs", "backup"])
        await ledger.record_outcomes(
            [
                Outcome(both, "pacs", "sent", 0), Outcome(both, "backup", "sent", 0),
                Outcome(one, "pacs", "sent", 0),
                Outcome(failed, "pacs", "sent", 0), Outcome(failed, "backup", "failed", 0xC000),
                Outcome(warn, "pacs", "warning", 0xB007), Outcome(warn, "backup", "sent", 0),
            ]
        )  # fmt: skip
        confirmed = await ledger.list_confirmed()
        assert sorted(f.id for f in confirmed) == sorted([both, warn])
        assert [f.id for f in await ledger.list_confirmed([one, warn, none])] == [warn]
        # a destination added later holds the file back again
        await ledger.add_deliveries([both], ["research"])
        assert [f.id for f in await ledger.list_confirmed()] == [warn]

    async def test_a_new_destination_makes_a_sent_or_failed_file_ready(
        self, ledger: Ledger
    ) -> None:
        sent, failed, sending, waiting = (
            r.id for r in await ledger.record_seen([seen(n) for n in ("s", "f", "g", "w")])
        )
        await ledger.add_deliveries([sent, failed, sending, waiting], ["pacs"])
        await ledger.record_outcomes([
            Outcome(sent, "pacs", "sent", 0), Outcome(failed, "pacs", "failed", 0xC000),
            Outcome(sending, "pacs", "sending"),
        ])  # fmt: skip
        await ledger.add_deliveries([sent, failed, sending, waiting], ["pacs", "backup"])
        statuses = {f.id: f.status for f in await ledger.get_files([sent, failed, sending,
                                                                     waiting])}  # fmt: skip
        assert statuses == {sent: "ready", failed: "ready", sending: "sending", waiting: "ready"}

    async def test_archived_file_is_no_longer_listed(self, ledger: Ledger) -> None:
        a = await self._sent(ledger, "a", uid="1", sha="x")
        b = await self._sent(ledger, "b", uid="2", sha="y")
        await ledger.mark_archived({a: "/archive/a", b: None})
        assert await ledger.list_confirmed() == []
        files = {f.id: f for f in await ledger.get_files([a, b])}
        assert (files[a].status, files[a].archive_path) == ("archived", "/archive/a")
        assert (files[b].status, files[b].archive_path) == ("archived", None)
        # a late outcome does not bring an archived file back
        await ledger.record_outcomes([Outcome(a, "pacs", "sent", 0)])
        assert (await ledger.get_files([a]))[0].status == "archived"

    async def test_counts_and_since_filter(self, ledger: Ledger, clock: FakeClock) -> None:
        clock.now = 100.0
        early = await ledger.record_seen([seen("e1"), seen("e2")])
        clock.now = 200.0
        late = await ledger.record_seen([seen("l1"), seen("l2"), seen("l3")])
        await ledger.mark_invalid({late[0].id: "truncated"})
        clock.now = 300.0
        await ledger.mark_invalid({early[0].id: "empty"})

        everything = await ledger.count_by_status()
        assert (everything["ready"], everything["invalid"], everything["sent"]) == (3, 2, 0)
        assert sum(everything.values()) == 5
        recent = await ledger.count_by_status(since=200.0)
        assert (recent["ready"], recent["invalid"]) == (2, 2)
        assert await ledger.count_files(since=300.0) == 1
        assert await ledger.count_files(status="invalid", since=250.0) == 1
        listed = await ledger.list_files(status="ready", since=150.0)
        assert [f.path for f in listed] == ["/inbox/l2", "/inbox/l3"]
        assert [f.path for f in await ledger.list_files(since=250.0)] == ["/inbox/e1"]

    async def test_a_ready_file_reads_as_sending_while_a_delivery_is_sent(
        self, ledger: Ledger, db: Database, clock: FakeClock
    ) -> None:
        clock.now = 100.0
        waiting, sending, both = (
            r.id for r in await ledger.record_seen([seen(n) for n in ("w", "s", "b")])
        )
        await ledger.add_deliveries([waiting, sending, both], ["pacs", "backup"])
        await db.execute(
            "UPDATE ledger_deliveries SET status = 'sending'"
            " WHERE (file_id = $1 OR (file_id = $2 AND destination = 'pacs'))",
            sending, both,
        )  # fmt: skip
        # Stored as ready; read as sending by every way in.
        stored = await db.fetch("SELECT id, status FROM ledger_files ORDER BY id")
        assert {r["status"] for r in stored} == {"ready"}
        statuses = {f.id: f.status for f in await ledger.get_files([waiting, sending, both])}
        assert statuses == {waiting: "ready", sending: "sending", both: "sending"}
        counts = await ledger.count_by_status()
        assert (counts["ready"], counts["sending"]) == (1, 2)
        assert [f.id for f in await ledger.list_files(status="sending")] == sorted([sending, both])
        assert [f.id for f in await ledger.list_files(status="ready")] == [waiting]
        assert await ledger.count_files(status=["ready", "sending"]) == 3
        assert await ledger.count_files(status=["sending", "invalid"]) == 2
        # The last delivery being sent ends: the file reads as ready again, or its outcome.
        await ledger.record_outcomes([Outcome(both, "pacs", "sent", 0)])
        await ledger.record_outcomes(
            [Outcome(sending, "pacs", "sent", 0), Outcome(sending, "backup", "sent", 0)]
        )
        statuses = {f.id: f.status for f in await ledger.get_files([sending, both])}
        assert statuses == {sending: "sent", both: "ready"}

    async def test_a_file_stored_as_sending_by_an_earlier_version_becomes_ready(
        self, ledger: Ledger, db: Database
    ) -> None:
        await db.execute("DELETE FROM schema_migrations WHERE component = 'core' AND version = 4")
        await db.execute(
            "INSERT INTO ledger_files (path, size, mtime, status, created_at, updated_at)"
            " VALUES ('/inbox/old', 1, 1.0, 'sending', 1.0, 1.0)"
        )
        assert [str(m) for m in await upgrade(db, ["core"])] == ["core 0004_ledger_sending_read"]
        assert await db.fetchval("SELECT status FROM ledger_files") == "ready"

    async def test_listing_pages_through_every_file_once(
        self, ledger: Ledger, clock: FakeClock
    ) -> None:
        for second in range(5):
            clock.now = 1000.0 + second
            await ledger.record_seen([seen(f"{second}-{i}") for i in range(3)])
        paths = [f.path async for f in ledger.iter_files(page_size=4)]
        assert len(paths) == 15 and len(set(paths)) == 15
        assert paths == [f.path for f in await ledger.list_files(limit=100)]
        first_page = await ledger.list_files(limit=4)
        after = (first_page[-1].updated_at, first_page[-1].id)
        assert [f.path for f in await ledger.list_files(after=after, limit=100)] == paths[4:]

    async def test_duplicate_check_probes_indexes_on_fifty_thousand_rows(
        self, db: Database
    ) -> None:
        """find_sent looks up both tables by index, with and without table statistics (a
        full scan of the deliveries per batch is what made a long soak slow down)."""
        await upgrade(db, ["core"])
        await db.execute(
            "INSERT INTO ledger_files (path, size, mtime, sha256, sop_instance_uid, status,"
            " created_at, updated_at)"
            " WITH RECURSIVE n (i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000)"
            " SELECT '/inbox/' || i, 1000, 1.5, 'h' || i, '1.2.826.0.1.' || i, 'sent', 0, 0"
            " FROM n"
        )
        await db.execute(
            "INSERT INTO ledger_deliveries (file_id, destination, status, attempts,"
            " created_at, updated_at)"
            " SELECT id, 'pacs', CASE WHEN id % 2 = 0 THEN 'sent' ELSE 'pending' END, 0, 0, 0"
            " FROM ledger_files"
        )
        ledger = Ledger(db)
        rows = await db.fetch(
            "SELECT id, sop_instance_uid, sha256 FROM ledger_files WHERE id % 25 = 0"
        )
        wanted = [(r["sop_instance_uid"], r["sha256"]) for r in rows]
        assert len(wanted) == 2000
        found = await ledger.sent_copies([uid for uid, _ in wanted])
        assert sent_pairs(found) == {
            (r["sop_instance_uid"], r["sha256"]): frozenset({"pacs"})
            for r in rows if r["id"] % 2 == 0
        }  # fmt: skip
        sql, args = find_sent_query(db.dialect, sorted({uid for uid, _ in wanted}))
        assert_index_lookups(await explain(db, sql, args), db.dialect)
        await db.execute("ANALYZE")
        assert_index_lookups(await explain(db, sql, args), db.dialect)

    async def test_ten_thousand_files_take_a_few_statements_per_step(self, db: Database) -> None:
        await upgrade(db, ["core"])
        counting = CountingDatabase(db)
        ledger = Ledger(counting)
        files = [
            SeenFile(f"/inbox/big/{i:05d}.dcm", 1000 + i, 1.5e9 + i, sha256=f"{i:064x}",
                     sop_instance_uid=f"1.2.826.0.1.{i}", batch_key="big")
            for i in range(10_000)
        ]  # fmt: skip
        records = await ledger.record_seen(files)
        assert len(records) == 10_000 and all(r.new for r in records)
        ids = [r.id for r in records]
        await ledger.add_deliveries(ids, ["pacs", "backup"])
        await ledger.record_outcomes(
            [Outcome(i, d, "sent", 0) for i in ids for d in ("pacs", "backup")]
        )
        assert (
            len(await ledger.sent_copies(f.sop_instance_uid or "" for f in files))
            == 10_000
        )
        assert len(await ledger.list_confirmed(ids, limit=10_000)) == 10_000
        await ledger.mark_archived({i: f"/archive/{i}" for i in ids})
        again = await ledger.record_seen(files)
        assert not any(r.new for r in again)
        # Six steps and a re-scan over 10,000 files; one statement per file would be 70,000.
        assert len(counting.calls) < 10_000 * 7 // 100
        assert (await ledger.count_by_status())["archived"] == 10_000
