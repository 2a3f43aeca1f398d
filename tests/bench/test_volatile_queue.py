"""The benchmark's uploader queue held in memory: it queues as the ledger does, records nothing."""

from __future__ import annotations

from pathlib import Path

from pacsflow.store import Database
from pacsflow_uploader.deliveries import Settlement, owner_id

from bench.volatile_queue import VolatileQueue
from tests.uploader.conftest import db  # noqa: F401  (the fixture: a fresh SQLite ledger)
from tests.uploader.test_deliveries import make_files, ready


async def test_it_queues_claims_and_retries_without_writing_the_ledger(
    db: Database, tmp_path: Path
) -> None:
    queue = VolatileQueue(db, owner=owner_id("bench"))
    files = ready(make_files(tmp_path / "in", 5))
    scheduled = await queue.schedule(files, ["pacs", "backup"], "b1")
    # A redelivered event adds no second delivery.
    await queue.schedule(files, ["pacs", "backup"], "b1")
    assert len(scheduled.file_ids) == 5
    assert (await queue.backlog()).keys() == {"pacs", "backup"}

    first = await queue.claim("pacs", 3)
    rest = await queue.claim("pacs", 10)
    assert [c.path for c in first + rest] == [f.path for f in files]
    assert await queue.claim("pacs", 10) == []

    retried = first[0]
    ids = await queue.settle(
        [Settlement(retried, "pending", attempts=1)]
        + [Settlement(c, "sent", 0, attempts=1) for c in first[1:] + rest],
        [],
    )  # fmt: skip
    assert ids == []
    assert await queue.claim("pacs", 10) == [retried]
    assert await queue.destinations_with_work() == ["backup"]
    for table in ("ledger_files", "ledger_deliveries", "uploader_outbox"):
        assert await db.fetchval(f"SELECT count(*) FROM {table}") == 0, table


async def test_a_file_gone_from_disk_is_counted_missing(db: Database, tmp_path: Path) -> None:
    queue = VolatileQueue(db, owner=owner_id("bench"))
    paths = make_files(tmp_path / "in", 2)
    files = ready(paths)
    paths[0].unlink()
    scheduled = await queue.schedule(files, ["pacs"], None)
    assert (len(scheduled.file_ids), scheduled.missing) == (1, 1)
    assert [c.path for c in await queue.claim("pacs", 10)] == [str(paths[1])]
