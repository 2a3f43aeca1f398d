"""The sync service's series transfers in the state store: request, claim, outcome.

One row per (source AE, destination AE, series): the uniqueness constraint is what makes a
series that is already being moved safe from the next cycle and from a second sync process.
Every state change is one conditional statement (``INSERT … ON CONFLICT DO NOTHING
RETURNING``, ``UPDATE … WHERE status = … RETURNING``), so of two processes racing for the same
row exactly one wins.

Life of a row::

    requested ──claim──► moving ──outcome──► moved
        ▲                  │  └─────────────► failed ──(next_attempt_at passed, still missing)──┐
        └──────────────────┴── claim expired (mover died) / moved but missing again ───────────┘

``announced_at`` and ``reported_at`` are the outbox marks of the ``series-missing`` and
``moved`` events: a row whose event was not yet published is found and published again after a
crash, so a state change and its event never part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pacsflow.store import Database, Row

__all__ = [
    "TRANSFER_STATUSES",
    "Decision",
    "RunTotals",
    "SeriesRequest",
    "Transfer",
    "Transfers",
    "backoff_seconds",
]

TRANSFER_STATUSES = ("requested", "moving", "moved", "failed")

#: what :meth:`Transfers.request` did with a series a cycle found missing
Decision = Literal["requested", "in-progress", "waiting", "moved"]


@dataclass(frozen=True)
class SeriesRequest:
    """A series a cycle wants moved."""

    source_ae: str
    destination_ae: str
    study_instance_uid: str
    series_instance_uid: str
    expected_images: int | None
    reason: str


@dataclass(frozen=True)
class Transfer:
    """One row of ``sync_transfers``."""

    id: int
    source_ae: str
    destination_ae: str
    study_instance_uid: str
    series_instance_uid: str
    status: str
    reason: str
    expected_images: int | None
    run_id: int | None
    attempts: int
    next_attempt_at: float | None
    requested_at: float
    announced_at: float | None
    claimed_by: str | None
    claimed_at: float | None
    verify: bool
    started_at: float | None
    finished_at: float | None
    completed: int
    failed: int
    warning: int
    dimse_status: int | None
    last_error: str | None
    reported_at: float | None
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: Row) -> Transfer:
        values = dict(row)
        values["verify"] = bool(values["verify"])
        return cls(**values)


@dataclass(frozen=True)
class RunTotals:
    """The state of the series one cycle requested."""

    pending: int = 0
    moved: int = 0
    failed: int = 0
    completed: int = 0
    failed_images: int = 0
    warning: int = 0
    #: claimed by a mover that stopped renewing its claim: the next cycle requests them again
    stale: int = 0


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """The wait after ``attempts`` failed attempts: ``initial`` doubling up to ``maximum``."""
    exponent = min(max(attempts - 1, 0), 30)
    return min(initial * 2.0**exponent, maximum)


_COLUMNS = (
    "id, source_ae, destination_ae, study_instance_uid, series_instance_uid, status, reason,"
    " expected_images, run_id, attempts, next_attempt_at, requested_at, announced_at,"
    " claimed_by, claimed_at, verify, started_at, finished_at, completed, failed, warning,"
    " dimse_status, last_error, reported_at, created_at, updated_at"
)

_SERIES = "source_ae = $1 AND destination_ae = $2 AND series_instance_uid = $3"


class Transfers:
    """The ``sync_transfers`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(self, source_ae: str, destination_ae: str, series_uid: str) -> Transfer | None:
        """The row of one series, if any."""
        row = await self._db.fetchrow(
            f"SELECT {_COLUMNS} FROM sync_transfers WHERE {_SERIES}",
            source_ae, destination_ae, series_uid,
        )  # fmt: skip
        return Transfer.from_row(row) if row else None

    async def request(
        self,
        series: SeriesRequest,
        *,
        run_id: int | None,
        now: float,
        local_checked_at: float,
        stale_before: float,
        retry_failed: bool = False,
    ) -> tuple[Decision, Transfer]:
        """Ask for a series a cycle found missing; what was decided, and the row.

        A new series is requested. An existing row is requested again when it failed and its
        next attempt is due (any failed row with ``retry_failed``), when its mover stopped
        renewing the claim before ``stale_before``, or when it was moved before the local
        PACS was asked (``local_checked_at``) and is still missing there. Otherwise it is left
        alone: requested or moving (in progress), failed and not due yet (waiting), or moved
        after the local PACS was asked (moved: the cycle's view is older than the move).
        """
        inserted = await self._db.fetchrow(
            "INSERT INTO sync_transfers (source_ae, destination_ae, study_instance_uid,"
            " series_instance_uid, status, reason, expected_images, run_id, requested_at,"
            " created_at, updated_at)"
            " VALUES ($1, $2, $3, $4, 'requested', $5, $6, $7, $8, $8, $8)"
            f" ON CONFLICT (source_ae, destination_ae, series_instance_uid) DO NOTHING"
            f" RETURNING {_COLUMNS}",
            series.source_ae, series.destination_ae, series.study_instance_uid,
            series.series_instance_uid, series.reason, series.expected_images, run_id, now,
        )  # fmt: skip
        if inserted is not None:
            return "requested", Transfer.from_row(inserted)
        due = math.inf if retry_failed else now
        again = await self._db.fetchrow(
            "UPDATE sync_transfers SET status = 'requested', reason = $4, expected_images = $5,"
            " run_id = $6, requested_at = $7, announced_at = NULL, updated_at = $7,"
            # A stale claim's mover may have moved the series before it died.
            " verify = (status = 'moving'), claimed_by = NULL, claimed_at = NULL,"
            " last_error = CASE WHEN status = 'moving'"
            "   THEN 'the mover stopped renewing its claim' ELSE last_error END"
            f" WHERE {_SERIES} AND ("
            "   (status = 'failed' AND next_attempt_at <= $8)"
            "   OR (status = 'moving' AND claimed_at < $9)"
            "   OR (status = 'moved' AND finished_at < $10))"
            f" RETURNING {_COLUMNS}",
            series.source_ae, series.destination_ae, series.series_instance_uid,
            series.reason, series.expected_images, run_id, now, due, stale_before,
            local_checked_at,
        )  # fmt: skip
        if again is not None:
            return "requested", Transfer.from_row(again)
        row = await self.get(series.source_ae, series.destination_ae, series.series_instance_uid)
        if row is None:
            # Deleted between the two statements (by an operator): ask once more.
            return await self.request(
                series, run_id=run_id, now=now, local_checked_at=local_checked_at,
                stale_before=stale_before, retry_failed=retry_failed,
            )  # fmt: skip
        if row.status == "failed":
            return "waiting", row
        if row.status == "moved":
            return "moved", row
        return "in-progress", row

    async def ensure_requested(self, series: SeriesRequest, *, now: float) -> bool:
        """Record a series a ``series-missing`` event names, unless it has a row already."""
        inserted = await self._db.fetchval(
            "INSERT INTO sync_transfers (source_ae, destination_ae, study_instance_uid,"
            " series_instance_uid, status, reason, expected_images, requested_at, announced_at,"
            " created_at, updated_at)"
            " VALUES ($1, $2, $3, $4, 'requested', $5, $6, $7, $7, $7, $7)"
            " ON CONFLICT (source_ae, destination_ae, series_instance_uid) DO NOTHING"
            " RETURNING id",
            series.source_ae, series.destination_ae, series.study_instance_uid,
            series.series_instance_uid, series.reason, series.expected_images, now,
        )  # fmt: skip
        return inserted is not None

    async def mark_announced(self, transfers: Sequence[Transfer], now: float) -> None:
        """Note that the ``series-missing`` events of these requests are published."""
        await self._db.executemany(
            "UPDATE sync_transfers SET announced_at = $1"
            " WHERE id = $2 AND requested_at = $3 AND announced_at IS NULL",
            [(now, item.id, item.requested_at) for item in transfers],
        )

    async def unannounced(self, before: float) -> list[Transfer]:
        """Requests older than ``before`` whose ``series-missing`` was never published."""
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM sync_transfers"
            " WHERE status = 'requested' AND announced_at IS NULL AND requested_at < $1"
            " ORDER BY id",
            before,
        )
        return [Transfer.from_row(row) for row in rows]

    async def claim_next(
        self, owner: str, now: float, *, run_id: int | None = None
    ) -> Transfer | None:
        """Claim the oldest requested series (of one run, when given) for ``owner``."""
        only_run = "" if run_id is None else " AND run_id = $3"
        args: list[Any] = [owner, now] + ([] if run_id is None else [run_id])
        # Two claimers may pick the same candidate; the loser's UPDATE matches nothing
        # (status is no longer 'requested') and it looks for the next one.
        for _ in range(20):
            row = await self._db.fetchrow(
                "UPDATE sync_transfers SET status = 'moving', claimed_by = $1, claimed_at = $2,"
                " started_at = $2, attempts = attempts + 1, updated_at = $2"
                " WHERE id = (SELECT id FROM sync_transfers WHERE status = 'requested'"
                f"{only_run} ORDER BY requested_at, id LIMIT 1) AND status = 'requested'"
                f" RETURNING {_COLUMNS}",
                *args,
            )
            if row is not None:
                return Transfer.from_row(row)
            if not await self.has_requested(run_id):
                return None
        return None

    async def has_requested(self, run_id: int | None = None) -> bool:
        """True while some series (of one run, when given) waits for a mover."""
        if run_id is None:
            found = await self._db.fetchval(
                "SELECT id FROM sync_transfers WHERE status = 'requested' LIMIT 1"
            )
        else:
            found = await self._db.fetchval(
                "SELECT id FROM sync_transfers WHERE status = 'requested' AND run_id = $1"
                " LIMIT 1",
                run_id,
            )
        return found is not None

    async def renew(self, transfer_id: int, owner: str, now: float) -> bool:
        """Renew a claim while its C-MOVE runs; False when the claim is no longer ours."""
        renewed = await self._db.fetchval(
            "UPDATE sync_transfers SET claimed_at = $3"
            " WHERE id = $1 AND claimed_by = $2 AND status = 'moving' RETURNING id",
            transfer_id, owner, now,
        )  # fmt: skip
        return renewed is not None

    async def finish(
        self,
        transfer: Transfer,
        owner: str,
        *,
        moved: bool,
        completed: int,
        failed: int,
        warning: int,
        dimse_status: int | None,
        error: str | None,
        now: float,
        retry_initial: float,
        retry_max: float,
    ) -> Transfer | None:
        """Record a claimed move's outcome; None when the claim was lost meanwhile."""
        next_attempt = (
            None if moved else now + backoff_seconds(transfer.attempts, retry_initial, retry_max)
        )
        row = await self._db.fetchrow(
            "UPDATE sync_transfers SET status = $3, completed = $4, failed = $5, warning = $6,"
            " dimse_status = $7, last_error = $8, finished_at = $9, next_attempt_at = $10,"
            " claimed_by = NULL, verify = $11, reported_at = NULL, updated_at = $9"
            " WHERE id = $1 AND claimed_by = $2 AND status = 'moving'"
            f" RETURNING {_COLUMNS}",
            transfer.id, owner, "moved" if moved else "failed", completed, failed, warning,
            dimse_status, error, now, next_attempt, False,
        )  # fmt: skip
        return Transfer.from_row(row) if row else None

    async def mark_reported(self, transfer: Transfer, now: float) -> None:
        """Note that the ``moved`` event of this outcome is published."""
        await self._db.execute(
            "UPDATE sync_transfers SET reported_at = $1"
            " WHERE id = $2 AND finished_at = $3 AND reported_at IS NULL",
            now, transfer.id, transfer.finished_at,
        )  # fmt: skip

    async def unreported(self, before: float) -> list[Transfer]:
        """Outcomes older than ``before`` whose ``moved`` event was never published."""
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM sync_transfers"
            " WHERE status IN ('moved', 'failed') AND reported_at IS NULL AND finished_at < $1"
            " ORDER BY id",
            before,
        )
        return [Transfer.from_row(row) for row in rows]

    async def run_totals(self, run_id: int, stale_before: float) -> RunTotals:
        """Where the series a cycle requested stand now; a claim not renewed since
        ``stale_before`` counts as stale (its mover stopped), not as pending."""
        rows = await self._db.fetch(
            "SELECT CASE WHEN status = 'moving' AND claimed_at < $2 THEN 'stale'"
            " ELSE status END AS state, count(*) AS series, sum(completed) AS completed,"
            " sum(failed) AS failed, sum(warning) AS warning"
            " FROM sync_transfers WHERE run_id = $1 GROUP BY 1",
            run_id, stale_before,
        )  # fmt: skip
        totals: dict[str, int] = {"pending": 0, "moved": 0, "failed": 0, "stale": 0}
        completed = failed_images = warning = 0
        for row in rows:
            state = row["state"]
            key = state if state in totals else "pending"
            totals[key] += int(row["series"])
            if key in ("moved", "failed"):
                completed += int(row["completed"] or 0)
                failed_images += int(row["failed"] or 0)
                warning += int(row["warning"] or 0)
        return RunTotals(
            totals["pending"], totals["moved"], totals["failed"], completed, failed_images,
            warning, totals["stale"],
        )  # fmt: skip

    async def failed_in_run(self, run_id: int) -> list[Transfer]:
        """The series a cycle requested that failed, with their errors."""
        rows = await self._db.fetch(
            f"SELECT {_COLUMNS} FROM sync_transfers WHERE run_id = $1 AND status = 'failed'"
            " ORDER BY id",
            run_id,
        )
        return [Transfer.from_row(row) for row in rows]

    async def count_by_status(self) -> dict[str, int]:
        """How many series are in each status."""
        rows = await self._db.fetch(
            "SELECT status, count(*) AS n FROM sync_transfers GROUP BY status"
        )
        counts = dict.fromkeys(TRANSFER_STATUSES, 0)
        counts.update({row["status"]: int(row["n"]) for row in rows})
        return counts
