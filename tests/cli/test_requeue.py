"""What ``ledger retry`` and ``ledger list --status sent`` rest on, on both state stores."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pacsflow.store import (
    Database,
    Ledger,
    Outcome,
    PostgresDatabase,
    SeenFile,
    SqliteDatabase,
    upgrade,
)
from pacsflow_uploader.deliveries import requeue_failed


async def _files(ledger: Ledger, count: int) -> list[int]:
    recorded = await ledger.record_seen(
        [SeenFile(path=f"/in/f{n}.dcm", size=10, mtime=1.0) for n in range(count)])
    return [r.id for r in recorded]


class RequeueCases:
    """The cases, run on each state store."""

    async def test_requeue_takes_failed_deliveries_of_failed_files_only(self, db: Database) -> None:
        ledger = Ledger(db)
        failed, unsupported, sent, half = await _files(ledger, 4)
        await ledger.add_deliveries([failed, unsupported, sent, half], ["main", "backup"])
        await ledger.record_outcomes([
            Outcome(failed, "main", "failed", 0xA700, "out of resources", attempts=5),
            Outcome(failed, "backup", "sent", 0),
            Outcome(unsupported, "main", "unsupported", None, "no presentation context"),
            Outcome(unsupported, "backup", "sent", 0),
            Outcome(sent, "main", "sent", 0), Outcome(sent, "backup", "sent", 0),
            # Still waiting for backup: not failed yet, so not retried.
            Outcome(half, "main", "failed", 0xC000, "cannot understand"),
        ])  # fmt: skip
        by_id = {f.id: f.status for f in await ledger.get_files([failed, unsupported, sent, half])}
        assert by_id == {failed: "failed", unsupported: "failed", sent: "sent", half: "ready"}

        requeued = await requeue_failed(db, [failed, unsupported, sent, half])
        assert sorted(requeued) == sorted([(failed, "main"), (unsupported, "main")])
        deliveries = {(d.file_id, d.destination): d for d in await ledger.deliveries([failed])}
        assert deliveries[(failed, "main")].status == "pending"
        assert deliveries[(failed, "main")].attempts == 0
        assert deliveries[(failed, "backup")].status == "sent"
        assert {f.status for f in await ledger.get_files([failed, unsupported])} == {"ready"}
        assert await requeue_failed(db, [failed, unsupported]) == []


    async def test_requeue_can_keep_to_one_destination(self, db: Database) -> None:
        ledger = Ledger(db)
        [file_id] = await _files(ledger, 1)
        await ledger.add_deliveries([file_id], ["main", "backup"])
        await ledger.record_outcomes([Outcome(file_id, "main", "failed", error="x"),
                                      Outcome(file_id, "backup", "failed", error="y")])
        assert await requeue_failed(db, [file_id], destination="backup") == [(file_id, "backup")]


    async def test_files_by_several_statuses(self, db: Database) -> None:
        ledger = Ledger(db)
        ids = await _files(ledger, 3)
        await ledger.add_deliveries(ids[:2], ["main"])
        await ledger.record_outcomes([Outcome(i, "main", "sent", 0) for i in ids[:2]])
        await ledger.mark_archived({ids[0]: "/archive/f0.dcm"})
        found = await ledger.list_files(status=["sent", "archived"])
        assert sorted((f.id, f.status) for f in found) == [(ids[0], "archived"), (ids[1], "sent")]
        assert await ledger.count_files(status=["sent", "archived"]) == 2
        with pytest.raises(ValueError, match="lost"):
            await ledger.list_files(status=["sent", "lost"])  # type: ignore[list-item]


class TestSqlite(RequeueCases):
    @pytest.fixture
    async def db(self, tmp_path: Path) -> AsyncIterator[Database]:
        database = await SqliteDatabase.open(tmp_path / "state.db")
        await upgrade(database)
        yield database
        await database.close()


@pytest.mark.postgres
class TestPostgres(RequeueCases):
    @pytest.fixture
    async def db(self, pg_dsn: str) -> AsyncIterator[Database]:
        database = await PostgresDatabase.connect(pg_dsn, pool_size=2)
        await upgrade(database)
        yield database
        await database.close()
