"""A cycle's statistics: what it found, chose and moved, as a table and as a log record.

The figures of the original synchronization tool (remote, local and missing studies, series
chosen, images, transferred, time, images per minute) come first, then pacsflow's own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["CycleReport", "RunStatus"]

RunStatus = Literal["running", "ok", "failed", "incomplete"]


@dataclass
class CycleReport:
    """One cycle, filled in as it goes."""

    source: str
    destination_ae: str
    started_at: float
    run_id: int | None = None
    date_range: str = ""
    window: str = ""
    remote_studies: int = 0
    local_studies: int = 0
    missing_studies: int = 0
    incomplete_studies: int = 0
    series_chosen: int = 0
    #: requested by this cycle (new, retried, or taken over from a stopped mover)
    series_requested: int = 0
    #: already requested or moving (by this or another process): not asked for again
    series_in_progress: int = 0
    #: failed earlier, waiting for their next attempt
    series_waiting: int = 0
    series_moved: int = 0
    series_failed: int = 0
    #: images of the requested series
    images: int = 0
    images_transferred: int = 0
    images_failed: int = 0
    #: requested series still moving when the cycle stopped waiting
    series_pending: int = 0
    finished_at: float | None = None
    error: str | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def status(self) -> RunStatus:
        """ok, failed (an error, or a series failed), incomplete (moves still running)."""
        if self.finished_at is None:
            return "running"
        if self.error is not None or self.series_failed:
            return "failed"
        if self.series_pending:
            return "incomplete"
        return "ok"

    @property
    def ok(self) -> bool:
        """True when the cycle ran and every series it requested was moved."""
        return self.status == "ok"

    @property
    def duration(self) -> float:
        """Seconds from the cycle's start to its end (or 0 while it runs)."""
        return 0.0 if self.finished_at is None else max(self.finished_at - self.started_at, 0.0)

    @property
    def images_per_minute(self) -> float:
        """Images transferred per minute of the cycle."""
        return self.images_transferred * 60.0 / self.duration if self.duration > 0 else 0.0

    def fields(self) -> dict[str, Any]:
        """The statistics as flat fields for a structured log line."""
        values = asdict(self)
        values.pop("failures")
        values.update(
            status=self.status,
            duration_seconds=round(self.duration, 3),
            images_per_minute=round(self.images_per_minute, 1),
        )
        return values

    def table(self) -> str:
        """The statistics as a plain-text table for a terminal."""
        rows: list[tuple[str, object]] = [
            ("remote studies", self.remote_studies),
            ("local studies", self.local_studies),
            ("missing studies", self.missing_studies),
            ("series chosen", self.series_chosen),
            ("images", self.images),
            ("transferred", self.images_transferred),
            ("time", f"{self.duration:.1f} s"),
            ("images per minute", f"{self.images_per_minute:.1f}"),
            ("incomplete studies", self.incomplete_studies),
            ("series requested", self.series_requested),
            ("series in progress", self.series_in_progress),
            ("series waiting to retry", self.series_waiting),
            ("series moved", self.series_moved),
            ("series failed", self.series_failed),
            ("images failed", self.images_failed),
        ]
        if self.series_pending:
            rows.append(("series still moving", self.series_pending))
        title = (
            f"sync {self.source} -> {self.destination_ae}"
            f" (run {self.run_id if self.run_id is not None else '-'}):"
            f" studies of {self.date_range or '-'}, {self.window or 'any time'}"
        )
        width = max(len(name) for name, _ in rows)
        lines = [title]
        lines += [f"  {name:<{width}}  {value:>10}" for name, value in rows]
        lines.append(f"  {'status':<{width}}  {self.status:>10}")
        if self.error:
            lines.append(f"  error: {self.error}")
        lines += [f"  failed: {failure}" for failure in self.failures]
        return "\n".join(lines)
