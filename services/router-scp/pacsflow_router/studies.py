"""The router's study table: batched updates, and claims that make each completion exactly-once.

Receivers never touch the store per instance: :class:`StudyUpdates` coalesces what a flush
drained into one delta per study, and :meth:`StudyStore.record` writes them in one
transaction. Completion is a claim: a conditional ``UPDATE ... RETURNING`` that only one
process can win, carrying the event id and the event itself, so that a claimer that dies
before publishing leaves enough behind for any other process to publish the same event.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pacsflow.store import Database, Row

from pacsflow_router.collector import Stored

__all__ = ["Claim", "StudyDelta", "StudyStore", "StudyUpdates"]


@dataclass(slots=True)
class StudyDelta:
    """What one flush adds to one study."""

    route: str
    study_uid: str
    patient_id: str
    study_description: str
    storage_path: str
    instances: int = 0
    received_bytes: int = 0
    first_received: float = float("inf")
    last_received: float = 0.0
    series: set[tuple[str, str]] = field(default_factory=set)

    def add(self, record: Stored) -> None:
        self.instances += 1
        self.received_bytes += record.size
        self.first_received = min(self.first_received, record.received_at)
        self.last_received = max(self.last_received, record.received_at)
        self.series.add((record.series_instance_uid, record.series_folder))
        if not self.study_description and record.study_description:
            self.study_description = record.study_description

    def merge(self, other: StudyDelta) -> None:
        self.instances += other.instances
        self.received_bytes += other.received_bytes
        self.first_received = min(self.first_received, other.first_received)
        self.last_received = max(self.last_received, other.last_received)
        self.series |= other.series
        self.study_description = self.study_description or other.study_description


class StudyUpdates:
    """Study deltas waiting to be written; kept (and added to) until a write succeeds."""

    def __init__(self) -> None:
        self.deltas: dict[tuple[str, str], StudyDelta] = {}

    def add(self, records: Iterable[Stored]) -> None:
        deltas = self.deltas
        for record in records:
            if not record.study_instance_uid:
                continue  # Type 1 in every storage IOD; without it there is no study to track
            key = (record.route, record.study_instance_uid)
            delta = deltas.get(key)
            if delta is None:
                delta = deltas[key] = StudyDelta(
                    record.route,
                    record.study_instance_uid,
                    record.patient_id,
                    record.study_description,
                    record.study_folder,
                )
            delta.add(record)

    def __len__(self) -> int:
        return len(self.deltas)

    def take(self) -> list[StudyDelta]:
        deltas, self.deltas = list(self.deltas.values()), {}
        return deltas

    def put_back(self, deltas: Iterable[StudyDelta]) -> None:
        for delta in deltas:
            key = (delta.route, delta.study_uid)
            newer = self.deltas.get(key)
            if newer is not None:
                delta.merge(newer)
            self.deltas[key] = delta


@dataclass(frozen=True, slots=True)
class Claim:
    """A claimed completion: the event to publish, and what to compare when marking it."""

    route: str
    study_uid: str
    claim_id: str
    claim_event: str
    claimed_at: float


_UPSERT = """
INSERT INTO router_studies (
    route, study_uid, patient_id, study_description, storage_path,
    instances, received_bytes, first_received, last_received, status
) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'open')
ON CONFLICT (route, study_uid) DO UPDATE SET
    instances = router_studies.instances + excluded.instances,
    received_bytes = router_studies.received_bytes + excluded.received_bytes,
    first_received = CASE WHEN excluded.first_received < router_studies.first_received
        THEN excluded.first_received ELSE router_studies.first_received END,
    last_received = CASE WHEN excluded.last_received > router_studies.last_received
        THEN excluded.last_received ELSE router_studies.last_received END,
    study_description = CASE WHEN router_studies.study_description = ''
        THEN excluded.study_description ELSE router_studies.study_description END,
    -- late instances re-open a reported study; a claimed one is re-opened when its claim ends
    status = CASE WHEN router_studies.status = 'notified' THEN 'open' ELSE router_studies.status END
"""

_SERIES = """
INSERT INTO router_series (route, study_uid, series_uid, folder) VALUES ($1, $2, $3, $4)
ON CONFLICT DO NOTHING
"""

_COLUMNS = (
    "route, study_uid, patient_id, study_description, storage_path, instances, received_bytes,"
    " first_received, last_received, status, completion, notified_files, claim_id, claimed_by,"
    " claimed_at, claim_last_received, claim_event"
)


class StudyStore:
    """The ``router_studies`` and ``router_series`` tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(self, deltas: list[StudyDelta]) -> None:
        """Add flushed deltas, all or none."""
        if not deltas:
            return
        studies = [
            (
                d.route, d.study_uid, d.patient_id, d.study_description, d.storage_path,
                d.instances, d.received_bytes, d.first_received, d.last_received,
            )
            for d in deltas
        ]  # fmt: skip
        series = sorted(
            {(d.route, d.study_uid, uid, folder) for d in deltas for uid, folder in d.series}
        )
        async with self.db.transaction() as tx:
            # Sorted: two processes updating the same studies take row locks in one order.
            await tx.executemany(_UPSERT, sorted(studies))
            await tx.executemany(_SERIES, series)

    async def get(self, route: str, study_uid: str) -> Row | None:
        return await self.db.fetchrow(
            f"SELECT {_COLUMNS} FROM router_studies WHERE route = $1 AND study_uid = $2",
            route,
            study_uid,
        )

    async def quiet(self, cutoff: float, limit: int = 100) -> list[Row]:
        """Open studies with no instance since ``cutoff``, oldest first."""
        return await self.db.fetch(
            f"SELECT {_COLUMNS} FROM router_studies WHERE status = 'open'"
            " AND last_received <= $1 ORDER BY last_received LIMIT $2",
            cutoff,
            limit,
        )

    async def series_folders(self, route: str, study_uid: str) -> list[str]:
        rows = await self.db.fetch(
            "SELECT DISTINCT folder FROM router_series WHERE route = $1 AND study_uid = $2",
            route,
            study_uid,
        )
        return [row["folder"] for row in rows]

    async def claim(
        self,
        row: Row,
        *,
        claim_id: str,
        claim_event: str,
        owner: str,
        now: float,
    ) -> bool:
        """Claim the next completion of the study ``row`` was read from; True if this won.

        Only wins while the study is as read: still open, no instance since, same completion.
        """
        claimed = await self.db.fetchval(
            "UPDATE router_studies SET status = 'claimed', completion = completion + 1,"
            " claim_id = $3, claim_event = $4, claimed_by = $5, claimed_at = $6,"
            " claim_last_received = last_received"
            " WHERE route = $1 AND study_uid = $2 AND status = 'open'"
            " AND last_received = $7 AND completion = $8 RETURNING completion",
            row["route"],
            row["study_uid"],
            claim_id,
            claim_event,
            owner,
            now,
            row["last_received"],
            row["completion"],
        )
        return claimed is not None

    async def settle_without_event(self, row: Row, files: int, now: float) -> bool:
        """Mark a re-opened study reported when nothing new is on disk (a re-sent instance)."""
        done = await self.db.fetchval(
            "UPDATE router_studies SET status = 'notified', notified_files = $3, notified_at = $4"
            " WHERE route = $1 AND study_uid = $2 AND status = 'open'"
            " AND last_received = $5 AND completion = $6 RETURNING completion",
            row["route"],
            row["study_uid"],
            files,
            now,
            row["last_received"],
            row["completion"],
        )
        return done is not None

    async def published(self, claim_id: str, files: int, now: float) -> None:
        """The claim's event is published: notified, or open again if instances came since."""
        await self.db.execute(
            "UPDATE router_studies SET notified_files = $2, notified_at = $3,"
            " status = CASE WHEN last_received > claim_last_received THEN 'open' ELSE 'notified' END,"
            " claim_event = NULL"
            " WHERE claim_id = $1 AND status = 'claimed'",
            claim_id,
            files,
            now,
        )

    async def stale_claims(self, before: float, limit: int = 100) -> list[Claim]:
        """Claims older than ``before`` whose publishing was never confirmed."""
        rows = await self.db.fetch(
            "SELECT route, study_uid, claim_id, claim_event, claimed_at FROM router_studies"
            " WHERE status = 'claimed' AND claimed_at <= $1 ORDER BY claimed_at LIMIT $2",
            before,
            limit,
        )
        return [Claim(**row) for row in rows]

    async def retake(self, claim: Claim, owner: str, now: float) -> bool:
        """Take over a stale claim (one process wins); its event keeps its id."""
        taken = await self.db.fetchval(
            "UPDATE router_studies SET claimed_by = $2, claimed_at = $3"
            " WHERE claim_id = $1 AND status = 'claimed' AND claimed_at = $4 RETURNING claim_id",
            claim.claim_id,
            owner,
            now,
            claim.claimed_at,
        )
        return taken is not None

    async def open_count(self) -> int:
        return int(
            await self.db.fetchval("SELECT count(*) FROM router_studies WHERE status <> 'notified'")
        )

    async def prune(self, before: float) -> int:
        """Forget studies reported before ``before`` (their files stay); how many."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch(
                "DELETE FROM router_studies WHERE status = 'notified' AND notified_at < $1"
                " RETURNING route, study_uid",
                before,
            )
            await tx.executemany(
                "DELETE FROM router_series WHERE route = $1 AND study_uid = $2",
                [(row["route"], row["study_uid"]) for row in rows],
            )
        return len(rows)
