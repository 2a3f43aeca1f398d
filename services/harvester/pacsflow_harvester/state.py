"""The harvest in the state store: patients, studies and series, their claims and outcomes.

Every stage is a claimable row, so the work survives restarts and spreads over processes:

==========  ===========================  =========================================
table       claimable status -> claimed  done
==========  ===========================  =========================================
scans       pending -> running           done (pending again after rescan_hours)
patients    pending -> listing           listed (its studies are rows)
studies     pending -> listing           listed (its series are rows), excluded
series      pending -> retrieving        complete, excluded
==========  ===========================  =========================================

Any of them can end ``failed`` after ``max_attempts``. A claim is one atomic
``UPDATE ... RETURNING`` (on PostgreSQL with ``FOR UPDATE SKIP LOCKED``; on SQLite under the
write lock), counts an attempt, and holds a lease that the claimer renews. A lease that runs
out goes back to pending (or failed, once its attempts are used up); a harvester that restarts
on the same host takes its dead predecessor's claims back at once.

A series that completes bumps its patient's ``version`` in the same transaction, and marks a
``moved`` event to publish (``event_pending``); the archiver builds the patient's zip for a
version and records which version it announced, so a crash between writing, announcing and
recording repeats the step instead of losing it.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pacsflow.store import Database, Row

__all__ = [
    "CLAIMED",
    "Claims",
    "HarvestState",
    "PatientJob",
    "SeriesFound",
    "SeriesJob",
    "StudyFound",
    "StudyJob",
    "Table",
    "owner_id",
    "owner_is_gone",
]

Table = Literal["scans", "patients", "studies", "series"]

_KEYS: dict[str, str] = {
    "scans": "name",
    "patients": "patient_id",
    "studies": "study_uid",
    "series": "series_uid",
}
#: the status of a claimed row, per table
CLAIMED: dict[str, str] = {
    "scans": "running",
    "patients": "listing",
    "studies": "listing",
    "series": "retrieving",
}
_ORDER: dict[str, str] = {
    "scans": "name",
    "patients": "patient_id",
    "studies": "patient_id, study_uid",
    "series": "patient_id, study_uid, series_uid",
}

PATIENT_STATES = ("pending", "listing", "listed", "failed")
STUDY_STATES = ("pending", "listing", "listed", "excluded", "failed")
SERIES_STATES = ("pending", "retrieving", "complete", "failed", "excluded")


def owner_id(instance: str) -> str:
    """A name for this process's claims: instance, host, process id and a random token."""
    return f"{instance}|{socket.gethostname()}|{os.getpid()}|{uuid.uuid4().hex[:8]}"


def owner_is_gone(owner: str | None, me: str) -> bool:
    """True when ``owner`` is an earlier harvester process on this host that no longer runs."""
    if owner is None:
        return True
    parts, mine = owner.split("|"), me.split("|")
    if len(parts) != 4 or len(mine) != 4 or owner == me or parts[1] != mine[1]:
        return False
    pid = int(parts[2]) if parts[2].isdigit() else -1
    if pid == int(mine[2]):
        # Our own process id with another token: our previous life (a container restarts
        # with the same pid).
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


@dataclass(frozen=True, slots=True)
class PatientJob:
    patient_id: str
    attempts: int


@dataclass(frozen=True, slots=True)
class StudyJob:
    study_uid: str
    patient_id: str
    attempts: int


@dataclass(frozen=True, slots=True)
class SeriesJob:
    series_uid: str
    study_uid: str
    patient_id: str
    study_date: str
    study_time: str
    modality: str
    expected_instances: int | None
    instances: int
    attempts: int


@dataclass(frozen=True, slots=True)
class StudyFound:
    """A study a patient's C-FIND returned, and whether the criteria take it."""

    study_uid: str
    study_date: str
    study_time: str
    description: str
    modalities: str
    selected: bool


@dataclass(frozen=True, slots=True)
class SeriesFound:
    """A series a study's C-FIND returned, and whether the criteria take it."""

    series_uid: str
    modality: str
    series_number: str
    description: str
    expected_instances: int | None
    selected: bool


@dataclass(frozen=True, slots=True)
class SeriesOutcome:
    """What a finished retrieve left at the destination."""

    instances: int
    bytes: int
    refetched: int
    move_status: int | None
    move_completed: int | None
    move_failed: int | None
    move_warning: int | None
    duration_seconds: float


@dataclass(frozen=True, slots=True)
class ArchiveJob:
    patient_id: str
    version: int
    archive_version: int
    published_version: int
    archive_path: str | None
    archive_series: int | None
    archive_instances: int | None


class Claims:
    """What this process is working on now, per table (``archives`` for archive claims)."""

    def __init__(self) -> None:
        self._held: dict[str, set[str]] = {}

    def add(self, table: str, key: str) -> None:
        self._held.setdefault(table, set()).add(key)

    def discard(self, table: str, key: str) -> None:
        self._held.get(table, set()).discard(key)

    def snapshot(self) -> dict[str, set[str]]:
        return {table: set(keys) for table, keys in self._held.items() if keys}


_SERIES_INSERT = """
INSERT INTO harvest_series (series_uid, study_uid, patient_id, modality, series_number,
    description, expected_instances, status, created_at, modified_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
ON CONFLICT (series_uid) DO UPDATE SET
    modality = excluded.modality,
    series_number = excluded.series_number,
    description = excluded.description,
    expected_instances = COALESCE(excluded.expected_instances, harvest_series.expected_instances),
    status = CASE
        WHEN excluded.status = 'excluded' AND harvest_series.status = 'pending' THEN 'excluded'
        WHEN excluded.status = 'excluded' THEN harvest_series.status
        WHEN harvest_series.status = 'excluded' THEN 'pending'
        -- The PACS holds more of a series than arrived: fetch the rest (only the rest).
        WHEN harvest_series.status = 'complete'
             AND excluded.expected_instances > harvest_series.instances THEN 'pending'
        ELSE harvest_series.status END,
    attempts = CASE
        WHEN excluded.status = 'pending' AND (harvest_series.status = 'excluded'
             OR (harvest_series.status = 'complete'
                 AND excluded.expected_instances > harvest_series.instances)) THEN 0
        ELSE harvest_series.attempts END,
    modified_at = excluded.modified_at
"""

_STUDY_INSERT = """
INSERT INTO harvest_studies (study_uid, patient_id, study_date, study_time, description,
    modalities, status, created_at, modified_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
ON CONFLICT (study_uid) DO UPDATE SET
    study_date = excluded.study_date,
    study_time = excluded.study_time,
    description = excluded.description,
    modalities = excluded.modalities,
    status = CASE
        WHEN harvest_studies.status = 'listing' THEN harvest_studies.status
        WHEN excluded.status = 'excluded' AND harvest_studies.status = 'pending' THEN 'excluded'
        WHEN excluded.status = 'excluded' THEN harvest_studies.status
        -- Listed again on a rescan: new series may have come.
        ELSE 'pending' END,
    attempts = CASE WHEN excluded.status = 'pending' AND harvest_studies.status <> 'listing'
        THEN 0 ELSE harvest_studies.attempts END,
    next_attempt_at = 0,
    modified_at = excluded.modified_at
"""

_SERIES_COLUMNS = (
    "r.series_uid, r.study_uid, r.patient_id, s.study_date, s.study_time, r.modality,"
    " r.expected_instances, r.instances, r.attempts"
)


class HarvestState:
    """The harvester's tables, for one :class:`~pacsflow.store.Database`."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    # --- claiming ---------------------------------------------------------------------------

    def _claim_sql(self, table: str, extra: str = "") -> str:
        key = _KEYS[table]
        lock = " FOR UPDATE SKIP LOCKED" if self.db.dialect == "postgres" else ""
        return (
            f"UPDATE harvest_{table} SET status = '{CLAIMED[table]}', claimed_by = $1,"
            f" lease_until = $2, attempts = attempts + 1, modified_at = $3"
            f"{', started_at = $3' if table == 'series' else ''}"
            f" WHERE status = 'pending' AND {key} = ("
            f"SELECT {key} FROM harvest_{table} WHERE status = 'pending'"
            f" AND next_attempt_at <= $3{extra} ORDER BY {_ORDER[table]} LIMIT 1{lock})"
            f" RETURNING {key}"
        )

    async def _claim(self, table: str, owner: str, lease: float, extra: str = "") -> str | None:
        now = self.clock()
        key = await self.db.fetchval(self._claim_sql(table, extra), owner, now + lease, now)
        return None if key is None else str(key)

    async def claim_scan(self, owner: str, lease: float) -> bool:
        """Claim the patient discovery scan when it is due; True when claimed."""
        return await self._claim("scans", owner, lease) is not None

    async def claim_patient(self, owner: str, lease: float) -> PatientJob | None:
        """Claim a patient whose studies are to be listed."""
        key = await self._claim("patients", owner, lease)
        if key is None:
            return None
        row = await self.db.fetchrow(
            "SELECT patient_id, attempts FROM harvest_patients WHERE patient_id = $1", key
        )
        return None if row is None else PatientJob(row["patient_id"], row["attempts"])

    async def claim_study(self, owner: str, lease: float) -> StudyJob | None:
        """Claim a study whose series are to be listed."""
        key = await self._claim("studies", owner, lease)
        if key is None:
            return None
        row = await self.db.fetchrow(
            "SELECT study_uid, patient_id, attempts FROM harvest_studies WHERE study_uid = $1",
            key,
        )
        return (
            None if row is None else StudyJob(row["study_uid"], row["patient_id"], row["attempts"])
        )

    async def claim_series(self, owner: str, lease: float) -> SeriesJob | None:
        """Claim a series to retrieve, in patient order."""
        key = await self._claim("series", owner, lease)
        if key is None:
            return None
        return await self.series_job(key)

    async def series_job(self, series_uid: str) -> SeriesJob | None:
        """One series with the study values its storage folder is named by."""
        row = await self.db.fetchrow(
            f"SELECT {_SERIES_COLUMNS} FROM harvest_series r"
            " JOIN harvest_studies s ON s.study_uid = r.study_uid WHERE r.series_uid = $1",
            series_uid,
        )
        return None if row is None else SeriesJob(**row)

    async def renew(self, owner: str, lease: float, claims: Claims) -> None:
        """Extend the leases of the claims this process is working on now.

        Only those: a claim whose work ended without being settled (the state store was
        away at that moment) is left to run out, so it comes back instead of staying ours.
        """
        until = self.clock() + lease
        held = claims.snapshot()
        if not any(held.values()):
            return
        async with self.db.transaction() as tx:
            for table, keys in held.items():
                for chunk in _chunks(sorted(keys)):
                    marks = ", ".join(f"${i + 3}" for i in range(len(chunk)))
                    if table == "archives":
                        sql = (
                            "UPDATE harvest_patients SET archive_lease_until = $1"
                            f" WHERE archive_claimed_by = $2 AND patient_id IN ({marks})"
                        )
                    else:
                        sql = (
                            f"UPDATE harvest_{table} SET lease_until = $1 WHERE claimed_by = $2"
                            f" AND status = '{CLAIMED[table]}' AND {_KEYS[table]} IN ({marks})"
                        )
                    await tx.execute(sql, until, owner, *chunk)

    async def take_back(self, me: str, max_attempts: int) -> dict[str, int]:
        """Give claims back whose lease ran out or whose process on this host is gone.

        Returns how many rows per table went back. A row whose attempts are used up (a series
        that kills its harvester every time) becomes failed instead of looping for ever.
        """
        now = self.clock()
        returned: dict[str, int] = {}
        for table, status in CLAIMED.items():
            key = _KEYS[table]
            rows = await self.db.fetch(
                f"SELECT {key} AS key, claimed_by, lease_until FROM harvest_{table}"
                f" WHERE status = '{status}'"
            )
            keys = [
                row["key"]
                for row in rows
                if (row["lease_until"] or 0) < now or owner_is_gone(row["claimed_by"], me)
            ]
            for chunk in _chunks(keys):
                marks = ", ".join(f"${i + 4}" for i in range(len(chunk)))
                await self.db.execute(
                    f"UPDATE harvest_{table} SET status = CASE WHEN attempts >= $1 THEN 'failed'"
                    " ELSE 'pending' END, claimed_by = NULL, lease_until = NULL,"
                    " next_attempt_at = $2, modified_at = $2, last_error = $3"
                    f" WHERE status = '{status}' AND {key} IN ({marks})",
                    max_attempts,
                    now,
                    "taken back: the harvester working on it stopped",
                    *chunk,
                )
            if keys:
                returned[table] = len(keys)
        rows = await self.db.fetch(
            "SELECT patient_id, archive_claimed_by, archive_lease_until FROM harvest_patients"
            " WHERE archive_claimed_by IS NOT NULL"
        )
        for row in rows:
            if (row["archive_lease_until"] or 0) < now or owner_is_gone(
                row["archive_claimed_by"], me
            ):
                await self.db.execute(
                    "UPDATE harvest_patients SET archive_claimed_by = NULL,"
                    " archive_lease_until = NULL WHERE patient_id = $1 AND archive_claimed_by = $2",
                    row["patient_id"],
                    row["archive_claimed_by"],
                )
                returned["archives"] = returned.get("archives", 0) + 1
        return returned

    # --- settling claims --------------------------------------------------------------------

    async def retry_later(
        self,
        table: Table,
        key: str,
        owner: str,
        error: str,
        *,
        delay: float,
        max_attempts: int,
        refund: bool = False,
    ) -> str | None:
        """Put a claimed row back to pending after ``delay``, or failed when its attempts are
        used up; ``refund`` gives the attempt back (not the row's fault). Returns the new
        status, None when the claim was no longer ours."""
        now = self.clock()
        # SET expressions see the row as it was: attempts counts this claim already.
        status = await self.db.fetchval(
            f"UPDATE harvest_{table} SET"
            " attempts = CASE WHEN $5 AND attempts > 0 THEN attempts - 1 ELSE attempts END,"
            " status = CASE WHEN NOT $5 AND attempts >= $4 THEN 'failed' ELSE 'pending' END,"
            " claimed_by = NULL, lease_until = NULL, next_attempt_at = $3, last_error = $6,"
            " modified_at = $7"
            f" WHERE {_KEYS[table]} = $1 AND claimed_by = $2 AND status = '{CLAIMED[table]}'"
            " RETURNING status",
            key,
            owner,
            now + delay,
            max_attempts,
            refund,
            error[:2000],
            now,
        )
        return None if status is None else str(status)

    async def finish_scan(self, owner: str, found: int, rescan_after: float | None) -> None:
        """The patient scan is done; with ``rescan_after`` it is due again that much later."""
        now = self.clock()
        await self.db.execute(
            "UPDATE harvest_scans SET status = $3, claimed_by = NULL, lease_until = NULL,"
            " attempts = 0, last_error = NULL, found = $4, done_at = $5, modified_at = $5,"
            " next_attempt_at = $6 WHERE name = $1 AND claimed_by = $2",
            "patients",
            owner,
            "done" if rescan_after is None else "pending",
            found,
            now,
            now + (rescan_after or 0),
        )

    async def ensure_scan(self, criteria: str | None = None) -> bool:
        """Create the patient scan row (pending) if there is none; with ``criteria`` (a
        digest), a scan made with other criteria is due again. True when a scan is due."""
        now = self.clock()
        await self.db.execute(
            "INSERT INTO harvest_scans (name, criteria, created_at, modified_at)"
            " VALUES ($1, $2, $3, $3) ON CONFLICT DO NOTHING",
            "patients",
            criteria,
            now,
        )
        if criteria is None:
            return False
        changed = await self.db.fetchval(
            "UPDATE harvest_scans SET status = 'pending', attempts = 0, next_attempt_at = 0,"
            " criteria = $2, modified_at = $3 WHERE name = $1 AND status <> 'running'"
            " AND (criteria IS NULL OR criteria <> $2) RETURNING name",
            "patients",
            criteria,
            now,
        )
        return changed is not None

    async def add_patients(self, patient_ids: Sequence[str]) -> int:
        """Queue patients for study listing; known ones are listed again (a rescan)."""
        now = self.clock()
        await self.db.executemany(
            "INSERT INTO harvest_patients (patient_id, created_at, modified_at)"
            " VALUES ($1, $2, $2) ON CONFLICT (patient_id) DO UPDATE SET status = 'pending',"
            " attempts = 0, next_attempt_at = 0, modified_at = excluded.modified_at"
            " WHERE harvest_patients.status IN ('listed', 'failed')",
            [(patient_id, now) for patient_id in patient_ids],
        )
        return len(patient_ids)

    async def finish_patient(
        self, owner: str, patient_id: str, studies: Sequence[StudyFound]
    ) -> bool:
        """Record a patient's studies and mark the patient listed; False if not our claim."""
        now = self.clock()
        async with self.db.transaction() as tx:
            mine = await tx.fetchval(
                "UPDATE harvest_patients SET status = 'listed', claimed_by = NULL,"
                " lease_until = NULL, attempts = 0, last_error = NULL, modified_at = $3"
                " WHERE patient_id = $1 AND claimed_by = $2 AND status = 'listing'"
                " RETURNING patient_id",
                patient_id,
                owner,
                now,
            )
            if mine is None:
                return False
            if studies:
                await tx.executemany(
                    _STUDY_INSERT,
                    [
                        (s.study_uid, patient_id, s.study_date, s.study_time, s.description,
                         s.modalities, "pending" if s.selected else "excluded", now)
                        for s in studies
                    ],
                )  # fmt: skip
        return True

    async def finish_study(self, owner: str, study_uid: str, series: Sequence[SeriesFound]) -> bool:
        """Record a study's series and mark the study listed; False if not our claim."""
        now = self.clock()
        async with self.db.transaction() as tx:
            patient_id = await tx.fetchval(
                "UPDATE harvest_studies SET status = 'listed', claimed_by = NULL,"
                " lease_until = NULL, attempts = 0, last_error = NULL, modified_at = $3"
                " WHERE study_uid = $1 AND claimed_by = $2 AND status = 'listing'"
                " RETURNING patient_id",
                study_uid,
                owner,
                now,
            )
            if patient_id is None:
                return False
            if series:
                await tx.executemany(
                    _SERIES_INSERT,
                    [
                        (s.series_uid, study_uid, patient_id, s.modality, s.series_number,
                         s.description, s.expected_instances,
                         "pending" if s.selected else "excluded", now)
                        for s in series
                    ],
                )  # fmt: skip
        return True

    async def series_progress(
        self, series_uid: str, owner: str, instances: int, nbytes: int
    ) -> None:
        """Record what is at the destination so far (for status while a series runs)."""
        await self.db.execute(
            "UPDATE harvest_series SET instances = $3, bytes = $4, modified_at = $5"
            " WHERE series_uid = $1 AND claimed_by = $2",
            series_uid,
            owner,
            instances,
            nbytes,
            self.clock(),
        )

    async def complete_series(
        self, series_uid: str, owner: str, outcome: SeriesOutcome, *, expected: int
    ) -> bool:
        """Mark a series complete, queue its ``moved`` event, and bump its patient's version
        when what is on disk changed; False if the claim was no longer ours."""
        now = self.clock()
        async with self.db.transaction() as tx:
            before = await tx.fetchrow(
                "SELECT patient_id, instances, completed_at FROM harvest_series"
                " WHERE series_uid = $1 AND claimed_by = $2 AND status = 'retrieving'",
                series_uid,
                owner,
            )
            if before is None:
                return False
            await tx.execute(
                "UPDATE harvest_series SET status = 'complete', claimed_by = NULL,"
                " lease_until = NULL, attempts = 0, last_error = NULL, instances = $2,"
                " bytes = $3, refetched = refetched + $4, move_status = $5,"
                " move_completed = $6, move_failed = $7, move_warning = $8,"
                " duration_seconds = $9, completed_at = $10, modified_at = $10,"
                " expected_instances = $11, event_pending = 1 WHERE series_uid = $1",
                series_uid,
                outcome.instances,
                outcome.bytes,
                outcome.refetched,
                outcome.move_status,
                outcome.move_completed,
                outcome.move_failed,
                outcome.move_warning,
                outcome.duration_seconds,
                now,
                expected,
            )
            if before["completed_at"] is None or before["instances"] != outcome.instances:
                await tx.execute(
                    "UPDATE harvest_patients SET version = version + 1, modified_at = $2"
                    " WHERE patient_id = $1",
                    before["patient_id"],
                    now,
                )
        return True

    async def fail_series(
        self,
        series_uid: str,
        owner: str,
        error: str,
        *,
        delay: float,
        max_attempts: int,
        outcome: SeriesOutcome | None = None,
        refund: bool = False,
    ) -> str | None:
        """An attempt that did not complete the series: retry later or mark failed. A
        ``moved`` event is queued when it ends failed. Returns the new status."""
        if outcome is not None:
            await self.db.execute(
                "UPDATE harvest_series SET instances = $3, bytes = $4,"
                " refetched = refetched + $5, move_status = $6, move_completed = $7,"
                " move_failed = $8, move_warning = $9, duration_seconds = $10"
                " WHERE series_uid = $1 AND claimed_by = $2",
                series_uid,
                owner,
                outcome.instances,
                outcome.bytes,
                outcome.refetched,
                outcome.move_status,
                outcome.move_completed,
                outcome.move_failed,
                outcome.move_warning,
                outcome.duration_seconds,
            )
        status = await self.retry_later(
            "series", series_uid, owner, error, delay=delay, max_attempts=max_attempts,
            refund=refund,
        )  # fmt: skip
        if status == "failed":
            await self.db.execute(
                "UPDATE harvest_series SET event_pending = 1 WHERE series_uid = $1", series_uid
            )
        return status

    # --- events -----------------------------------------------------------------------------

    async def pending_moved(self, limit: int = 100) -> list[Row]:
        """Series whose outcome is still to be announced with a ``moved`` event."""
        return await self.db.fetch(
            "SELECT series_uid, study_uid, status, instances, move_completed, move_failed,"
            " move_warning, duration_seconds, last_error, completed_at, modified_at"
            " FROM harvest_series WHERE event_pending = 1 ORDER BY series_uid LIMIT $1",
            limit,
        )

    async def moved_published(self, series: Iterable[tuple[str, float]]) -> None:
        """Clear the event flag of series announced (unless they changed since)."""
        await self.db.executemany(
            "UPDATE harvest_series SET event_pending = 0 WHERE series_uid = $1"
            " AND modified_at = $2",
            list(series),
        )

    # --- archives ---------------------------------------------------------------------------

    async def claim_archive(self, owner: str, lease: float) -> ArchiveJob | None:
        """Claim a patient whose series are all complete and whose archive is out of date
        (or built but not yet announced)."""
        now = self.clock()
        lock = " FOR UPDATE OF p SKIP LOCKED" if self.db.dialect == "postgres" else ""
        row = await self.db.fetchrow(
            "UPDATE harvest_patients SET archive_claimed_by = $1, archive_lease_until = $2"
            " WHERE archive_claimed_by IS NULL AND patient_id = ("
            "SELECT p.patient_id FROM harvest_patients p"
            " WHERE p.status = 'listed' AND p.archive_claimed_by IS NULL"
            " AND (p.version > p.archive_version OR p.published_version < p.archive_version)"
            " AND NOT EXISTS (SELECT 1 FROM harvest_studies s WHERE s.patient_id = p.patient_id"
            " AND s.status IN ('pending', 'listing', 'failed'))"
            " AND NOT EXISTS (SELECT 1 FROM harvest_series r WHERE r.patient_id = p.patient_id"
            " AND r.status IN ('pending', 'retrieving', 'failed'))"
            " AND EXISTS (SELECT 1 FROM harvest_series r WHERE r.patient_id = p.patient_id"
            " AND r.status = 'complete')"
            f" ORDER BY p.patient_id LIMIT 1{lock})"
            " RETURNING patient_id, version, archive_version, published_version, archive_path,"
            " archive_series, archive_instances",
            owner,
            now + lease,
        )
        return None if row is None else ArchiveJob(**row)

    async def complete_series_of(self, patient_id: str) -> list[SeriesJob]:
        """The complete series of a patient, with their study values."""
        rows = await self.db.fetch(
            f"SELECT {_SERIES_COLUMNS} FROM harvest_series r"
            " JOIN harvest_studies s ON s.study_uid = r.study_uid"
            " WHERE r.patient_id = $1 AND r.status = 'complete'"
            " ORDER BY s.study_date, s.study_time, r.study_uid, r.series_uid",
            patient_id,
        )
        return [SeriesJob(**row) for row in rows]

    async def archive_built(
        self, owner: str, job: ArchiveJob, path: str, series: int, instances: int, nbytes: int
    ) -> None:
        """Record the archive written for ``job.version``."""
        now = self.clock()
        await self.db.execute(
            "UPDATE harvest_patients SET archive_version = $3, archive_path = $4,"
            " archive_series = $5, archive_instances = $6, archive_bytes = $7,"
            " archived_at = $8, modified_at = $8 WHERE patient_id = $1"
            " AND archive_claimed_by = $2",
            job.patient_id,
            owner,
            job.version,
            path,
            series,
            instances,
            nbytes,
            now,
        )

    async def archive_published(self, owner: str, patient_id: str, version: int) -> None:
        """Record that patient-complete went out for ``version``; release the claim."""
        await self.db.execute(
            "UPDATE harvest_patients SET published_version = $3, archive_claimed_by = NULL,"
            " archive_lease_until = NULL WHERE patient_id = $1 AND archive_claimed_by = $2",
            patient_id,
            owner,
            version,
        )

    async def release_archive(self, owner: str, patient_id: str) -> None:
        """Give an archive claim back without recording anything."""
        await self.db.execute(
            "UPDATE harvest_patients SET archive_claimed_by = NULL, archive_lease_until = NULL"
            " WHERE patient_id = $1 AND archive_claimed_by = $2",
            patient_id,
            owner,
        )

    async def reopen_series(self, series_uids: Sequence[str], reason: str) -> None:
        """Complete series whose files went missing: fetch them again (only what is missing)."""
        now = self.clock()
        await self.db.executemany(
            "UPDATE harvest_series SET status = 'pending', attempts = 0, next_attempt_at = 0,"
            " last_error = $2, modified_at = $3 WHERE series_uid = $1 AND status = 'complete'",
            [(uid, reason, now) for uid in series_uids],
        )

    # --- reporting and operator actions -----------------------------------------------------

    async def counts(self) -> dict[str, dict[str, int]]:
        """Rows per status, per table."""
        result: dict[str, dict[str, int]] = {}
        for table in ("patients", "studies", "series"):
            rows = await self.db.fetch(
                f"SELECT status, count(*) AS n FROM harvest_{table} GROUP BY status"
            )
            result[table] = {row["status"]: int(row["n"]) for row in rows}
        return result

    async def totals(self) -> dict[str, Any]:
        """Instances and bytes at the destination and expected, archives written."""
        series = await self.db.fetchrow(
            "SELECT COALESCE(sum(instances), 0) AS instances, COALESCE(sum(bytes), 0) AS bytes,"
            " COALESCE(sum(CASE WHEN status = 'complete' THEN instances"
            " ELSE COALESCE(expected_instances, 0) END), 0) AS expected,"
            " COALESCE(sum(refetched), 0) AS refetched"
            " FROM harvest_series WHERE status <> 'excluded'"
        )
        archives = await self.db.fetchrow(
            "SELECT count(*) AS patients, COALESCE(sum(CASE WHEN archive_version > 0"
            " AND archive_version = version THEN 1 ELSE 0 END), 0) AS current,"
            " COALESCE(sum(CASE WHEN archive_version > 0 THEN 1 ELSE 0 END), 0) AS built"
            " FROM harvest_patients"
        )
        scan = await self.db.fetchrow(
            "SELECT status, found, done_at, last_error FROM harvest_scans WHERE name = 'patients'"
        )
        return {
            "instances": int(series["instances"]) if series else 0,
            "bytes": int(series["bytes"]) if series else 0,
            "expected_instances": int(series["expected"]) if series else 0,
            "refetched": int(series["refetched"]) if series else 0,
            "archives_built": int(archives["built"]) if archives else 0,
            "archives_current": int(archives["current"]) if archives else 0,
            "scan": dict(scan) if scan else None,
        }

    async def failures(self, limit: int = 100) -> list[Row]:
        """Failed rows of every table, newest first."""
        rows: list[Row] = []
        for table in ("scans", "patients", "studies", "series"):
            key = _KEYS[table]
            rows.extend(
                {"stage": table, **row}
                for row in await self.db.fetch(
                    f"SELECT {key} AS key, attempts, last_error, modified_at FROM harvest_{table}"
                    " WHERE status = 'failed' ORDER BY modified_at DESC LIMIT $1",
                    limit,
                )
            )
        rows.sort(key=lambda row: row["modified_at"], reverse=True)
        return rows[:limit]

    async def retry_failed(self, keys: Sequence[str] = ()) -> int:
        """Failed rows (all, or those with these keys) back to pending with fresh attempts."""
        now = self.clock()
        total = 0
        for table in ("scans", "patients", "studies", "series"):
            key = _KEYS[table]
            where = "status = 'failed'"
            args: list[Any] = [now]
            if keys:
                marks = ", ".join(f"${i + 2}" for i in range(len(keys)))
                where += f" AND {key} IN ({marks})"
                args.extend(keys)
            changed = await self.db.fetch(
                f"UPDATE harvest_{table} SET status = 'pending', attempts = 0,"
                f" next_attempt_at = 0, modified_at = $1 WHERE {where} RETURNING {key}",
                *args,
            )
            total += len(changed)
        return total

    async def request_rescan(self) -> None:
        """Query the PACS again for patients, studies and series at the next chance."""
        now = self.clock()
        await self.ensure_scan()
        await self.db.execute(
            "UPDATE harvest_scans SET status = 'pending', attempts = 0, next_attempt_at = 0,"
            " modified_at = $1 WHERE name = 'patients' AND status <> 'running'",
            now,
        )


def _chunks(items: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
