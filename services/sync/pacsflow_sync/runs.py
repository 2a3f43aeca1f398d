"""The sync service's cycles in the state store: one ``sync_runs`` row per cycle, with the
statistics it reported."""

from __future__ import annotations

from pacsflow.store import Database, Row

from pacsflow_sync.report import CycleReport

__all__ = ["Runs"]

_STATS = (
    "remote_studies", "local_studies", "missing_studies", "incomplete_studies",
    "series_chosen", "series_requested", "series_in_progress", "series_waiting",
    "series_moved", "series_failed", "images", "images_transferred", "images_failed",
)  # fmt: skip


class Runs:
    """The ``sync_runs`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def start(self, instance: str, report: CycleReport) -> int:
        """Record a cycle that has begun; its id."""
        run_id = await self._db.fetchval(
            "INSERT INTO sync_runs (instance, source_ae, destination_ae, status, started_at)"
            " VALUES ($1, $2, $3, 'running', $4) RETURNING id",
            instance, report.source, report.destination_ae, report.started_at,
        )  # fmt: skip
        return int(run_id)

    async def finish(self, report: CycleReport) -> None:
        """Record a cycle's statistics and outcome."""
        if report.run_id is None:
            return
        assignments = ", ".join(f"{name} = ${index}" for index, name in enumerate(_STATS, 5))
        await self._db.execute(
            "UPDATE sync_runs SET status = $2, finished_at = $3, error = $4,"
            f" {assignments} WHERE id = $1",
            report.run_id, report.status, report.finished_at, report.error,
            *(getattr(report, name) for name in _STATS),
        )  # fmt: skip

    async def recent(self, limit: int = 20) -> list[Row]:
        """The latest cycles, newest first."""
        return await self._db.fetch(
            "SELECT * FROM sync_runs ORDER BY started_at DESC, id DESC LIMIT $1", limit
        )
