"""The uploader's work queue in the ledger, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pacsflow.events import (
    FileOutcome,
    FileOutcomePayload,
    FileSent,
    ReadyFile,
    decode_event,
)
from pacsflow.store import (
    Database,
    Ledger,
    PostgresDatabase,
    SeenFile,
    SqliteDatabase,
    upgrade,
)
from pacsflow_uploader.deliveries import (
    _CLAIM_POSTGRES,
    _SCHEDULE_POSTGRES,
    _SETTLE_POSTGRES,
    DeliveryQueue,
    Settlement,
    owner_id,
    owner_is_gone,
)

from tests.store.contract import CountingDatabase, explain
from tests.uploader.support import WATCHER


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def ready(paths: list[Path]) -> list[ReadyFile]:
    return [
        ReadyFile(
            path=str(p), size=p.stat().st_size, sop_instance_uid=f"1.2.3.{i}",
            series_instance_uid="1.2.3", study_instance_uid="1.2", sop_class_uid="1.2.840.1",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        for i, p in enumerate(paths, start=1)
    ]  # fmt: skip


def make_files(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"f{i:03d}.dcm"
        path.write_bytes(b"x" * (i + 1))
        paths.append(path)
    return paths


def dead_owner() -> str:
    """The owner name of a process of this host that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return f"old|{socket.gethostname()}|{process.pid}|abcd1234"


class DeliveryQueueContract:
    """Cases every backend passes; subclasses provide ``db``."""

    @pytest.fixture
    def clock(self) -> Clock:
        return Clock()

    @pytest.fixture
    def queue(self, db: Database, clock: Clock) -> DeliveryQueue:
        return DeliveryQueue(db, owner=owner_id("test"), clock=clock)

    async def test_schedule_adds_pending_deliveries_once(
        self, queue: DeliveryQueue, db: Database, tmp_path: Path
    ) -> None:
        files = ready(make_files(tmp_path / "in", 3))
        first = await queue.schedule(files, ["pacs", "backup"], "b1")
        again = await queue.schedule(files, ["pacs", "backup"], "b1")
        assert len(first.file_ids) == 3 and sorted(again.file_ids) == sorted(first.file_ids)
        rows = await db.fetch("SELECT status, count(*) AS n FROM ledger_deliveries GROUP BY status")
        assert [(r["status"], r["n"]) for r in rows] == [("pending", 6)]

    async def test_redelivered_file_ready_never_resets_a_confirmed_delivery(
        self, queue: DeliveryQueue, db: Database, tmp_path: Path
    ) -> None:
        files = ready(make_files(tmp_path / "in", 2))
        await queue.schedule(files, ["pacs"], "b1")
        claims = await queue.claim("pacs", 10)
        await queue.settle([Settlement(c, "sent", 0, attempts=1) for c in claims], [])
        await queue.schedule(files, ["pacs"], "b1")
        assert await queue.claim("pacs", 10) == []
        statuses = await db.fetch("SELECT status FROM ledger_deliveries")
        assert [r["status"] for r in statuses] == ["sent", "sent"]

    async def test_files_handled_otherwise_or_gone_are_not_scheduled(
        self, queue: DeliveryQueue, db: Database, tmp_path: Path
    ) -> None:
        paths = make_files(tmp_path / "in", 3)
        files = ready(paths)
        ledger = Ledger(db)
        recorded = await queue.schedule(files[:1], [], "b0")  # recorded, no destination yet
        await ledger.mark_invalid({recorded.file_ids[0]: "damaged"})
        paths[2].unlink()
        unknown = files[2].model_copy(update={"path": str(tmp_path / "never-seen.dcm")})
        result = await queue.schedule([files[0], files[1], files[2], unknown], ["pacs"], "b1")
        assert len(result.file_ids) == 1
        assert (result.skipped, result.missing) == (1, 2)

    async def test_a_sent_or_failed_file_scheduled_to_a_new_destination_is_ready_again(
        self, queue: DeliveryQueue, db: Database, tmp_path: Path
    ) -> None:
        files = ready(make_files(tmp_path / "in", 3))
        ids = (await queue.schedule(files, ["pacs"], "b1")).file_ids
        claims = await queue.claim("pacs", 3)
        await queue.settle([Settlement(claims[0], "sent", 0, attempts=1),
                            Settlement(claims[1], "failed", 0xA900, "no", attempts=5),
                            Settlement(claims[2], "sent", 0, attempts=1)], [])  # fmt: skip
        ledger = Ledger(db)
        await db.execute("UPDATE ledger_files SET status = 'archived' WHERE id = $1", ids[2])
        # The same file twice in one event: one row, one delivery per destination.
        again = await queue.schedule([*files, files[0]], ["pacs", "backup"], "b1")
        assert again.file_ids == [ids[0], ids[1], ids[0]] and again.skipped == 1
        assert [f.status for f in await ledger.get_files(ids)] == ["ready", "ready", "archived"]
        assert [c.file_id for c in await queue.claim("backup", 5)] == ids[:2]
        assert await queue.claim("pacs", 5) == []  # the confirmed and the failed stay so

    async def test_claim_takes_due_deliveries_in_order_and_only_once(
        self, queue: DeliveryQueue, db: Database, tmp_path: Path
    ) -> None:
        paths = make_files(tmp_path / "in", 5)
        await queue.schedule(ready(paths), ["pacs"], "b1")
        first = await queue.claim("pacs", 3)
        second = await queue.claim("pacs", 3)
        assert [c.path for c in first + second] == [str(p) for p in paths]
        assert await queue.claim("pacs", 3) == []
        assert first[0].sop_instance_uid == "1.2.3.1" and first[0].batch_key == "b1"
        counts = await Ledger(db).count_by_status()
        assert counts["sending"] == 5

    async def test_claiming_rewrites_no_file_row(
        self, queue: DeliveryQueue, db: Database, clock: Clock, tmp_path: Path
    ) -> None:
        await queue.schedule(ready(make_files(tmp_path / "in", 3)), ["pacs"], "b1")
        before = [tuple(r) for r in await db.fetch("SELECT * FROM ledger_files ORDER BY id")]
        clock.now += 10
        claims = await queue.claim("pacs", 3)
        after = [tuple(r) for r in await db.fetch("SELECT * FROM ledger_files ORDER BY id")]
        assert after == before
        ids = [c.file_id for c in claims]
        assert [f.status for f in await Ledger(db).get_files(ids)] == ["sending"] * 3
        await queue.settle([Settlement(c, "sent", 0, attempts=1) for c in claims], [])
        assert [f.status for f in await Ledger(db).get_files(ids)] == ["sent"] * 3

    async def test_two_claimers_never_get_the_same_delivery(
        self, db: Database, clock: Clock, tmp_path: Path
    ) -> None:
        one = DeliveryQueue(db, owner=owner_id("one"), clock=clock)
        two = DeliveryQueue(db, owner=owner_id("two"), clock=clock)
        await one.schedule(ready(make_files(tmp_path / "in", 60)), ["pacs"], "b1")
        batches = await asyncio.gather(*(q.claim("pacs", 7) for q in [one, two] * 6))
        claimed = [c.file_id for batch in batches for c in batch]
        assert len(claimed) == len(set(claimed)) == 60

    async def test_retry_waits_for_its_time(
        self, queue: DeliveryQueue, clock: Clock, tmp_path: Path
    ) -> None:
        await queue.schedule(ready(make_files(tmp_path / "in", 1)), ["pacs"], "b1")
        (claim,) = await queue.claim("pacs", 1)
        await queue.settle(
            [Settlement(claim, "pending", 0xA700, "busy", attempts=1,
                        next_attempt_at=clock.now + 30)], []
        )  # fmt: skip
        assert await queue.claim("pacs", 1) == []
        assert await queue.next_due("pacs") == clock.now + 30
        clock.now += 31
        (again,) = await queue.claim("pacs", 1)
        assert again.attempts == 1 and not again.in_doubt

    async def test_settle_records_outcomes_and_keeps_events_until_published(
        self, queue: DeliveryQueue, db: Database, tmp_path: Path
    ) -> None:
        await queue.schedule(ready(make_files(tmp_path / "in", 2)), ["pacs"], "b1")
        claims = await queue.claim("pacs", 2)
        event = FileSent(source=WATCHER, payload=FileOutcomePayload(files=[
            FileOutcome(path=claims[0].path, sop_instance_uid="1.2.3.1", destination="pacs",
                        status=0)]))  # fmt: skip
        ids = await queue.settle(
            [Settlement(claims[0], "sent", 0, attempts=1),
             Settlement(claims[1], "failed", 0xA900, "does not match", attempts=5)],
            [event],
        )  # fmt: skip
        deliveries = {d.file_id: d for d in await Ledger(db).deliveries([c.file_id for c in claims])}
        assert (deliveries[claims[0].file_id].status, deliveries[claims[0].file_id].attempts) == (
            "sent", 1)
        failed = deliveries[claims[1].file_id]
        assert (failed.status, failed.dimse_status, failed.last_error, failed.attempts) == (
            "failed", 0xA900, "does not match", 5)
        (stored,) = await queue.unpublished()
        assert stored[0] == ids[0] and decode_event(stored[1]).id == event.id
        await queue.published(ids)
        assert await queue.unpublished() == []
        claimed_by = await db.fetch("SELECT claimed_by FROM ledger_deliveries")
        assert {r["claimed_by"] for r in claimed_by} == {None}

    async def test_a_claim_whose_answer_was_lost_is_given_back_untouched(
        self, queue: DeliveryQueue, db: Database, clock: Clock, tmp_path: Path
    ) -> None:
        await queue.schedule(ready(make_files(tmp_path / "in", 6)), ["pacs"], "b1")
        held = await queue.claim("pacs", 2)
        # The same claim by the same process, committed, its answer lost (a database crash
        # mid-statement): the rows are ours in the table, but nothing here knows them.
        lost = await DeliveryQueue(db, owner=queue.owner, clock=clock).claim("pacs", 3)
        await queue.renew()
        assert await queue.release_orphans() == 3
        assert await queue.release_orphans() == 0
        again = await queue.claim("pacs", 10)
        # The three given back and the one never claimed; not the two held.
        assert len(again) == 4 and {c.file_id for c in lost} <= {c.file_id for c in again}
        assert not {c.file_id for c in held} & {c.file_id for c in again}
        assert not any(c.in_doubt for c in again)  # never sent: not in doubt
        # What this process holds stays claimed, and settles as usual.
        await queue.settle([Settlement(c, "sent", 0, attempts=1) for c in held], [])
        assert (await Ledger(db).count_by_status())["sent"] == 2

    async def test_claims_of_a_process_that_ended_come_back_in_doubt(
        self, db: Database, clock: Clock, tmp_path: Path
    ) -> None:
        crashed = DeliveryQueue(db, owner=dead_owner(), clock=clock)
        await crashed.schedule(ready(make_files(tmp_path / "in", 4)), ["pacs"], "b1")
        claims = await crashed.claim("pacs", 4)
        await crashed.settle([Settlement(claims[0], "sent", 0, attempts=1)], [])
        restarted = DeliveryQueue(db, owner=owner_id("test"), clock=clock)
        assert await restarted.take_back(claim_timeout=600) == {"pacs": 3}
        again = await restarted.claim("pacs", 10)
        assert sorted(c.file_id for c in again) == sorted(c.file_id for c in claims[1:])
        assert all(c.in_doubt for c in again)
        # The confirmed one stays confirmed.
        statuses = {d.file_id: d.status for d in await Ledger(db).deliveries([claims[0].file_id])}
        assert statuses == {claims[0].file_id: "sent"}

    async def test_live_claims_stay_until_their_renewal_is_overdue(
        self, db: Database, clock: Clock, tmp_path: Path
    ) -> None:
        # A live process of this host (our parent) and one of another host.
        here = f"other|{socket.gethostname()}|{os.getppid()}|abcd1234"
        elsewhere = f"other|host-b|{os.getpid()}|abcd1234"
        paths = make_files(tmp_path / "in", 2)
        for owner, path in zip([here, elsewhere], paths, strict=True):
            queue = DeliveryQueue(db, owner=owner, clock=clock)
            await queue.schedule(ready([path]), ["pacs"], "b1")
            await queue.claim("pacs", 1)
        me = DeliveryQueue(db, owner=owner_id("test"), clock=clock)
        assert await me.take_back(claim_timeout=600) == {}
        clock.now += 300
        await DeliveryQueue(db, owner=here, clock=clock).renew()
        clock.now += 301
        assert await me.take_back(claim_timeout=600) == {"pacs": 1}
        (claim,) = await me.claim("pacs", 5)
        assert claim.path == str(paths[1]) and claim.in_doubt

    async def test_file_status_follows_every_destination_as_batches_settle(
        self, queue: DeliveryQueue, db: Database, tmp_path: Path
    ) -> None:
        files = ready(make_files(tmp_path / "in", 3))
        ids = (await queue.schedule(files, ["pacs", "backup"], "b1")).file_ids
        ledger = Ledger(db)

        async def statuses() -> list[str]:
            return [f.status for f in await ledger.get_files(ids)]

        pacs = await queue.claim("pacs", 3)
        assert await statuses() == ["sending"] * 3
        await queue.settle(
            [Settlement(pacs[0], "sent", 0, attempts=1),
             Settlement(pacs[1], "pending", 0xA700, "busy", attempts=1, next_attempt_at=1e12),
             Settlement(pacs[2], "failed", 0xA900, "mismatch", attempts=5)], []
        )  # fmt: skip
        # backup is still pending for all three
        assert await statuses() == ["ready", "ready", "ready"]
        backup = await queue.claim("backup", 3)
        assert [c.file_id for c in backup] == ids
        assert await statuses() == ["sending"] * 3
        await queue.settle(
            [Settlement(c, "warning", 0xB000, attempts=1) for c in backup]
            + [Settlement(backup[0], "sent", 0, attempts=1)], []
        )  # fmt: skip
        assert await statuses() == ["sent", "ready", "failed"]
        deliveries = {(d.file_id, d.destination): d for d in await ledger.deliveries(ids)}
        assert (deliveries[(ids[0], "backup")].status, deliveries[(ids[0], "backup")].dimse_status
                ) == ("sent", 0)  # the last outcome of a delivery in a batch wins
        retry = deliveries[(ids[1], "pacs")]
        assert (retry.status, retry.dimse_status, retry.last_error) == ("pending", 0xA700, "busy")

    async def test_a_claim_carries_the_previous_answer_for_giving_it_back(
        self, queue: DeliveryQueue, clock: Clock, tmp_path: Path
    ) -> None:
        await queue.schedule(ready(make_files(tmp_path / "in", 1)), ["pacs"], "b1")
        (claim,) = await queue.claim("pacs", 1)
        assert (claim.dimse_status, claim.last_error) == (None, None)
        await queue.settle([Settlement(claim, "pending", 0xA700, "busy", attempts=1)], [])
        (again,) = await queue.claim("pacs", 1)
        assert (again.dimse_status, again.last_error, again.attempts) == (0xA700, "busy", 1)

    async def test_backlog_counts_pending_work(
        self, queue: DeliveryQueue, clock: Clock, tmp_path: Path
    ) -> None:
        await queue.schedule(ready(make_files(tmp_path / "in", 3)), ["pacs", "backup"], "b1")
        await queue.claim("pacs", 1)
        assert await queue.backlog() == {"pacs": (2, clock.now), "backup": (3, clock.now)}
        assert await queue.destinations_with_work() == ["backup", "pacs"]


def test_owner_names_say_whose_process_ended() -> None:
    me = owner_id("a")
    assert not owner_is_gone(me, me)
    assert owner_is_gone(None, me)
    assert owner_is_gone(dead_owner(), me)
    assert not owner_is_gone(f"a|{socket.gethostname()}|{os.getppid()}|x", me)
    assert not owner_is_gone(f"a|elsewhere|{os.getpid()}|x", me)
    # This process under another token: the previous life of a restarted container.
    assert owner_is_gone(f"a|{socket.gethostname()}|{os.getpid()}|old", me)


class TestSqliteDeliveryQueue(DeliveryQueueContract):
    @pytest.fixture
    async def db(self, tmp_path: Path) -> AsyncIterator[Database]:
        database = await SqliteDatabase.open(tmp_path / "state.db")
        await upgrade(database)
        yield database
        await database.close()


@pytest.mark.postgres
class TestPostgresDeliveryQueue(DeliveryQueueContract):
    @pytest.fixture
    async def db(self, pg_dsn: str) -> AsyncIterator[Database]:
        database = await PostgresDatabase.connect(pg_dsn, pool_size=4)
        await upgrade(database)
        yield database
        await database.close()

    async def test_schedule_claim_and_settle_take_one_statement_each(
        self, db: Database, clock: Clock, tmp_path: Path
    ) -> None:
        counting = CountingDatabase(db)
        queue = DeliveryQueue(counting, owner=owner_id("t"), clock=clock)  # type: ignore[arg-type]
        files = ready(make_files(tmp_path / "in", 600))
        # Recorded by the watcher beforehand, as a rule; the rest is new to the ledger.
        await Ledger(db).record_seen([SeenFile(path=f.path, size=f.size, mtime=os.stat(
            f.path).st_mtime, batch_key="b1") for f in files[:400]])  # fmt: skip
        scheduled = await queue.schedule(files, ["pacs"], "b1")
        assert len(scheduled.file_ids) == 600 and counting.calls == ["fetch"]
        counting.calls.clear()
        claims = await queue.claim("pacs", 500)
        assert len(claims) == 500 and counting.calls == ["fetch"]
        event = FileSent(source=WATCHER, payload=FileOutcomePayload(files=[
            FileOutcome(path=c.path, sop_instance_uid=c.sop_instance_uid or "",
                        destination="pacs", status=0) for c in claims]))  # fmt: skip
        counting.calls.clear()
        ids = await queue.settle([Settlement(c, "sent", 0, attempts=1) for c in claims],
                                 [event, event.model_copy(update={"id": uuid.uuid4()})])
        assert counting.calls == ["fetch"] and len(ids) == 2
        counts = await Ledger(db).count_by_status()
        assert (counts["sent"], counts["ready"]) == (500, 100)
        assert [i for i, _ in await queue.unpublished()] == ids

    async def test_the_first_batch_finds_its_types_known(
        self, db: Database, clock: Clock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """asyncpg asks the catalog for an array type's codec on a connection's first use of
        it: the pool's connections learn them when they open, not in the first batch."""
        import asyncpg.connection

        asked: list[object] = []
        learn = asyncpg.connection.Connection._introspect_types

        async def spy(self: asyncpg.connection.Connection, types: object, timeout: float) -> object:
            asked.append(types)
            return await learn(self, types, timeout)

        monkeypatch.setattr(asyncpg.connection.Connection, "_introspect_types", spy)
        queue = DeliveryQueue(db, owner=owner_id("t"), clock=clock)
        await queue.schedule(ready(make_files(tmp_path / "in", 5)), ["pacs"], "b1")
        claims = await queue.claim("pacs", 5)
        await queue.settle([Settlement(c, "sent", 0, attempts=1) for c in claims], [])
        assert len(claims) == 5 and asked == []

    async def test_a_row_another_writer_inserts_meanwhile_is_scheduled_too(
        self, db: Database, pg_dsn: str, clock: Clock, tmp_path: Path
    ) -> None:
        """The watcher records a file while the uploader's statement runs: the statement
        waits for it, finds it neither seen nor inserted, and the general path takes it."""
        import asyncpg

        files = ready(make_files(tmp_path / "in", 3))
        queue = DeliveryQueue(db, owner=owner_id("t"), clock=clock)
        other = await asyncpg.connect(pg_dsn)
        try:
            writing = other.transaction()
            await writing.start()
            racing = await other.fetchval(
                "INSERT INTO ledger_files (path, size, mtime, status, created_at, updated_at)"
                " VALUES ($1, $2, $3, 'ready', 0, 0) RETURNING id",
                files[1].path, files[1].size, os.stat(files[1].path).st_mtime,
            )  # fmt: skip
            scheduling = asyncio.create_task(queue.schedule(files, ["pacs"], "b1"))
            await asyncio.sleep(0.3)
            assert not scheduling.done()  # waiting for the other writer's row
            await writing.commit()
            scheduled = await asyncio.wait_for(scheduling, 10)
        finally:
            await other.close()
        assert scheduled.file_ids[1] == racing and len(set(scheduled.file_ids)) == 3
        claims = await queue.claim("pacs", 5)
        assert sorted(c.file_id for c in claims) == sorted(scheduled.file_ids)

    async def test_schedule_claim_and_settle_read_the_ledger_by_index_without_statistics(
        self, db: Database
    ) -> None:
        """Fresh tables have no statistics: the plans must still probe by index, or every
        batch reads the whole ledger."""
        await db.execute(
            "INSERT INTO ledger_files (path, size, mtime, status, created_at, updated_at)"
            " SELECT '/inbox/' || i, 1000, 1.5, 'ready', 0, 0 FROM generate_series(1, 50000) i"
        )
        await db.execute(
            "INSERT INTO ledger_deliveries (file_id, destination, status, attempts, created_at,"
            " updated_at) SELECT id, d, CASE WHEN id > 49000 THEN 'pending' ELSE 'sent' END,"
            " 0, 0, 0 FROM ledger_files, (VALUES ('pacs'), ('backup')) AS v (d)"
        )
        ids = list(range(49001, 49501))
        n = len(ids)
        paths = [f"/inbox/{i}" for i in range(49001, 49501)] + ["/inbox/new"]
        m = len(paths)
        plans = {
            "schedule": await explain(db, _SCHEDULE_POSTGRES, [
                paths, [1000] * m, [1.5] * m, *[["1.2"] * m] * 5, "b1", 1e10, ["pacs"]]),
            "claim": await explain(db, _CLAIM_POSTGRES, ["me", 1e10, "pacs", 500]),
            "settle": await explain(db, _SETTLE_POSTGRES, [
                ids, ["pacs"] * n, ["sent"] * n, [0] * n, [1] * n, [None] * n, [0.0] * n,
                [0] * n, 1e10, ["{}"]]),
        }  # fmt: skip
        for name, plan in plans.items():
            scans = [line for line in plan if line.rstrip().endswith(("ledger_files",
                                                                      "ledger_deliveries"))]
            assert scans, (name, plan)
            assert not [line for line in scans if "Seq Scan" in line], (name, plan)
            # nor every file of a status, through the status index
            statuses = [line for line in plan if "ledger_files_status" in line]
            assert not statuses, (name, "\n".join(plan))
