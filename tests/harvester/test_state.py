"""The harvest state on both backends: claims, leases, attempts, completion and archives.

The cases are written once (``*Contract``) and run on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pacsflow.store import Database, PostgresDatabase, SqliteDatabase, upgrade
from pacsflow_harvester.state import (
    Claims,
    HarvestState,
    SeriesFound,
    SeriesOutcome,
    StudyFound,
    owner_id,
    owner_is_gone,
)

LEASE = 60.0


class SqliteBackend:
    @pytest.fixture
    async def databases(self, tmp_path: Path) -> AsyncIterator[tuple[Database, Database]]:
        """Two connections to one fresh state file (two harvester processes)."""
        first = await SqliteDatabase.open(tmp_path / "state.db")
        second = await SqliteDatabase.open(tmp_path / "state.db")
        await upgrade(first)
        try:
            yield first, second
        finally:
            await first.close()
            await second.close()


class PostgresBackend:
    @pytest.fixture
    async def databases(self, pg_dsn: str) -> AsyncIterator[tuple[Database, Database]]:
        """Two pools on one fresh database (two harvester processes)."""
        first = await PostgresDatabase.connect(pg_dsn, pool_size=4)
        second = await PostgresDatabase.connect(pg_dsn, pool_size=4)
        await upgrade(first)
        try:
            yield first, second
        finally:
            await first.close()
            await second.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


OUTCOME = SeriesOutcome(4, 4000, 0, 0, 4, 0, 0, 0.5)


async def listed_patient(state: HarvestState, owner: str, patient: str, series: int) -> list[str]:
    """A patient with one listed study of ``series`` pending series; their UIDs."""
    await state.add_patients([patient])
    job = await state.claim_patient(owner, LEASE)
    assert job is not None and job.patient_id == patient
    study = f"1.2.{patient[-1]}"
    assert await state.finish_patient(owner, patient, [StudyFound(study, "20230101", "010000",
                                                                  "", "CT", True)])  # fmt: skip
    claimed = await state.claim_study(owner, LEASE)
    assert claimed is not None and claimed.study_uid == study
    uids = [f"{study}.{n}" for n in range(1, series + 1)]
    found = [SeriesFound(uid, "CT", str(n), "", 4, True) for n, uid in enumerate(uids, 1)]
    assert await state.finish_study(owner, study, found)
    return uids


class ClaimsContract:
    async def test_each_series_goes_to_exactly_one_of_two_processes(
        self, databases: tuple[Database, Database]
    ) -> None:
        clock = Clock()
        one, two = (HarvestState(db, clock=clock) for db in databases)
        uids = await listed_patient(one, "A", "P1", 30)
        claims = await asyncio.gather(
            *(state.claim_series(f"owner{i % 2}", LEASE) for i, state in
              enumerate([one, two] * 20))
        )  # fmt: skip
        taken = [job.series_uid for job in claims if job is not None]
        assert sorted(taken) == sorted(uids)
        assert len(taken) == len(set(taken))
        assert all(job.attempts == 1 and job.study_date == "20230101" for job in claims if job)

    async def test_a_lease_that_runs_out_goes_back_and_the_old_claim_loses(
        self, databases: tuple[Database, Database]
    ) -> None:
        clock = Clock()
        state = HarvestState(databases[0], clock=clock)
        (uid,) = await listed_patient(state, "A", "P1", 1)
        job = await state.claim_series("host-a", LEASE)
        assert job is not None
        assert await state.claim_series("host-b", LEASE) is None
        await state.renew("host-a", LEASE, Claims())  # renews nothing it does not work on
        clock.now += LEASE + 1
        assert await state.take_back("host-b", max_attempts=5) == {"series": 1}
        again = await state.claim_series("host-b", LEASE)
        assert again is not None and again.series_uid == uid and again.attempts == 2
        assert not await state.complete_series(uid, "host-a", OUTCOME, expected=4)
        assert await state.complete_series(uid, "host-b", OUTCOME, expected=4)

    async def test_renewed_claims_are_kept(self, databases: tuple[Database, Database]) -> None:
        clock = Clock()
        state = HarvestState(databases[0], clock=clock)
        (uid,) = await listed_patient(state, "A", "P1", 1)
        assert await state.claim_series("host-a", LEASE) is not None
        claims = Claims()
        claims.add("series", uid)
        clock.now += LEASE / 2
        await state.renew("host-a", LEASE, claims)
        clock.now += LEASE / 2 + 1
        assert await state.take_back("host-b", max_attempts=5) == {}

    async def test_claims_of_a_dead_process_on_this_host_come_back_at_once(
        self, databases: tuple[Database, Database]
    ) -> None:
        state = HarvestState(databases[0], clock=Clock())
        await listed_patient(state, "A", "P1", 1)
        dead = f"harvest|{socket.gethostname()}|{2**22 + 12345}|dead0000"
        assert await state.claim_series(dead, LEASE) is not None
        me = owner_id("harvest")
        assert owner_is_gone(dead, me)
        assert not owner_is_gone(f"harvest|{socket.gethostname()}|{os.getppid()}|x", me)
        assert not owner_is_gone(f"harvest|other-host|{2**22 + 12345}|x", me)
        assert await state.take_back(me, max_attempts=5) == {"series": 1}

    async def test_a_series_that_kills_its_harvester_every_time_ends_failed(
        self, databases: tuple[Database, Database]
    ) -> None:
        clock = Clock()
        state = HarvestState(databases[0], clock=clock)
        await listed_patient(state, "A", "P1", 1)
        for _ in range(3):
            assert await state.claim_series("crashing", LEASE) is not None
            clock.now += LEASE + 1
            await state.take_back("other", max_attempts=3)
        assert await state.claim_series("crashing", LEASE) is None
        assert (await state.counts())["series"] == {"failed": 1}


class AttemptsContract:
    async def test_failures_back_off_then_fail_and_queue_a_moved_event(
        self, databases: tuple[Database, Database]
    ) -> None:
        clock = Clock()
        state = HarvestState(databases[0], clock=clock)
        (uid,) = await listed_patient(state, "A", "P1", 1)
        for attempt in (1, 2):
            job = await state.claim_series("w", LEASE)
            assert job is not None and job.attempts == attempt
            status = await state.fail_series(uid, "w", "reset", delay=10, max_attempts=3)
            assert status == "pending"
            assert await state.claim_series("w", LEASE) is None  # not before the delay
            clock.now += 10
        assert await state.claim_series("w", LEASE) is not None
        assert await state.fail_series(uid, "w", "reset", delay=10, max_attempts=3) == "failed"
        pending = await state.pending_moved()
        assert [(row["series_uid"], row["status"], row["last_error"]) for row in pending] == [
            (uid, "failed", "reset")
        ]
        await state.moved_published([(uid, pending[0]["modified_at"])])
        assert await state.pending_moved() == []
        # The operator retries: fresh attempts.
        assert await state.retry_failed([uid]) == 1
        job = await state.claim_series("w", LEASE)
        assert job is not None and job.attempts == 1

    async def test_an_unreachable_pacs_uses_no_attempts(
        self, databases: tuple[Database, Database]
    ) -> None:
        state = HarvestState(databases[0], clock=Clock())
        (uid,) = await listed_patient(state, "A", "P1", 1)
        for _ in range(10):
            assert await state.claim_series("w", LEASE) is not None
            status = await state.fail_series(
                uid, "w", "refused", delay=0, max_attempts=2, refund=True
            )
            assert status == "pending"
        job = await state.claim_series("w", LEASE)
        assert job is not None and job.attempts == 1


class ArchivesContract:
    async def test_a_patient_is_archived_once_every_series_is_complete(
        self, databases: tuple[Database, Database]
    ) -> None:
        state = HarvestState(databases[0], clock=Clock())
        uids = await listed_patient(state, "A", "P1", 2)
        first = await state.claim_series("w", LEASE)
        assert first is not None
        assert await state.complete_series(first.series_uid, "w", OUTCOME, expected=4)
        assert await state.claim_archive("w", LEASE) is None  # one series still pending
        second = await state.claim_series("w", LEASE)
        assert second is not None
        assert await state.complete_series(second.series_uid, "w", OUTCOME, expected=4)
        job = await state.claim_archive("w", LEASE)
        assert job is not None and (job.version, job.archive_version) == (2, 0)
        assert await state.claim_archive("other", LEASE) is None  # claimed
        await state.archive_built("w", job, "/a/P1.zip", 2, 8, 8000)
        await state.archive_published("w", "P1", 2)
        assert await state.claim_archive("w", LEASE) is None
        assert sorted(s.series_uid for s in await state.complete_series_of("P1")) == uids

    async def test_a_failed_series_holds_the_archive_back(
        self, databases: tuple[Database, Database]
    ) -> None:
        state = HarvestState(databases[0], clock=Clock())
        await listed_patient(state, "A", "P1", 2)
        job = await state.claim_series("w", LEASE)
        assert job is not None
        await state.complete_series(job.series_uid, "w", OUTCOME, expected=4)
        other = await state.claim_series("w", LEASE)
        assert other is not None
        await state.fail_series(other.series_uid, "w", "gone", delay=0, max_attempts=1)
        assert await state.claim_archive("w", LEASE) is None

    async def test_a_rescan_that_finds_more_instances_reopens_the_series_and_rebuilds(
        self, databases: tuple[Database, Database]
    ) -> None:
        state = HarvestState(databases[0], clock=Clock())
        (uid,) = await listed_patient(state, "A", "P1", 1)
        job = await state.claim_series("w", LEASE)
        assert job is not None
        await state.complete_series(uid, "w", OUTCOME, expected=4)
        built = await state.claim_archive("w", LEASE)
        assert built is not None
        await state.archive_built("w", built, "/a/P1.zip", 1, 4, 4000)
        await state.archive_published("w", "P1", built.version)

        # The rescan lists the patient, its study and the series again: now with 6 images,
        # and a new series next to it.
        await state.add_patients(["P1"])
        assert await state.claim_patient("w", LEASE) is not None
        await state.finish_patient("w", "P1", [StudyFound("1.2.1", "20230101", "010000",
                                                          "", "CT", True)])  # fmt: skip
        assert await state.claim_study("w", LEASE) is not None
        await state.finish_study("w", "1.2.1", [
            SeriesFound(uid, "CT", "1", "", 6, True),
            SeriesFound("1.2.1.9", "SR", "9", "", 1, False),
        ])  # fmt: skip
        counts = await state.counts()
        assert counts["series"] == {"pending": 1, "excluded": 1}
        again = await state.claim_series("w", LEASE)
        assert again is not None and again.expected_instances == 6 and again.instances == 4
        await state.complete_series(uid, "w", SeriesOutcome(6, 6000, 2, 0, 2, 0, 0, 0.1),
                                    expected=6)  # fmt: skip
        rebuild = await state.claim_archive("w", LEASE)
        assert rebuild is not None and rebuild.version == 2 and rebuild.archive_version == 1

    async def test_completing_with_nothing_new_does_not_rebuild(
        self, databases: tuple[Database, Database]
    ) -> None:
        state = HarvestState(databases[0], clock=Clock())
        (uid,) = await listed_patient(state, "A", "P1", 1)
        await state.claim_series("w", LEASE)
        await state.complete_series(uid, "w", OUTCOME, expected=4)
        built = await state.claim_archive("w", LEASE)
        assert built is not None
        await state.archive_built("w", built, "/a/P1.zip", 1, 4, 4000)
        await state.archive_published("w", "P1", built.version)
        await state.reopen_series([uid], "checked again")
        await state.claim_series("w", LEASE)
        await state.complete_series(uid, "w", OUTCOME, expected=4)
        assert await state.claim_archive("w", LEASE) is None

    async def test_changed_criteria_make_the_scan_due_again(
        self, databases: tuple[Database, Database]
    ) -> None:
        state = HarvestState(databases[0], clock=Clock())
        assert not await state.ensure_scan("digest-1")  # new: due because pending
        assert await state.claim_scan("w", LEASE)
        await state.finish_scan("w", 3, None)
        assert not await state.ensure_scan("digest-1")
        assert not await state.claim_scan("w", LEASE)
        assert await state.ensure_scan("digest-2")
        assert await state.claim_scan("w", LEASE)


class TestSqliteClaims(SqliteBackend, ClaimsContract):
    pass


class TestSqliteAttempts(SqliteBackend, AttemptsContract):
    pass


class TestSqliteArchives(SqliteBackend, ArchivesContract):
    pass


@pytest.mark.postgres
class TestPostgresClaims(PostgresBackend, ClaimsContract):
    pass


@pytest.mark.postgres
class TestPostgresAttempts(PostgresBackend, AttemptsContract):
    pass


@pytest.mark.postgres
class TestPostgresArchives(PostgresBackend, ArchivesContract):
    pass
