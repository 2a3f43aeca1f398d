"""Prometheus metrics of the sync service: cycles, missing studies, series moved, throughput.

Labels are statuses only; never UIDs, patients or AE titles.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pacsflow_sync.report import CycleReport

__all__ = ["SyncMetrics"]


class SyncMetrics:
    """The sync service's metric objects on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.cycles = Counter(
            "pacsflow_sync_cycles_total",
            "Sync cycles by outcome: ok, failed (an error, or a series failed), incomplete.",
            ["status"],
            registry=registry,
        )
        self.cycle_seconds = Histogram(
            "pacsflow_sync_cycle_duration_seconds",
            "Duration of a sync cycle, from the first C-FIND to the end of its moves.",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
            registry=registry,
        )
        self.missing_studies = Gauge(
            "pacsflow_sync_missing_studies",
            "Studies the last cycle found on the remote PACS and not on the local one.",
            registry=registry,
        )
        self.incomplete_studies = Gauge(
            "pacsflow_sync_incomplete_studies",
            "Studies the last cycle found with fewer instances locally (include_incomplete).",
            registry=registry,
        )
        self.images_per_minute = Gauge(
            "pacsflow_sync_images_per_minute",
            "Images transferred per minute in the last cycle.",
            registry=registry,
        )
        self.last_cycle = Gauge(
            "pacsflow_sync_last_cycle_timestamp_seconds",
            "When the last sync cycle ended (Unix time).",
            registry=registry,
        )
        self.series = Counter(
            "pacsflow_sync_series_moved_total",
            "Series C-MOVEs by outcome: success, partial (some images failed) or failed.",
            ["status"],
            registry=registry,
        )
        self.images = Counter(
            "pacsflow_sync_images_moved_total",
            "C-MOVE sub-operations by outcome: completed, warning or failed.",
            ["status"],
            registry=registry,
        )
        for status in ("ok", "failed", "incomplete"):
            self.cycles.labels(status)
        for status in ("success", "partial", "failed"):
            self.series.labels(status)
        for status in ("completed", "warning", "failed"):
            self.images.labels(status)

    def cycle_done(self, report: CycleReport) -> None:
        """Count a finished cycle."""
        self.cycles.labels(report.status).inc()
        self.cycle_seconds.observe(report.duration)
        self.last_cycle.set(report.finished_at or 0)
        if report.error is None:
            self.missing_studies.set(report.missing_studies)
            self.incomplete_studies.set(report.incomplete_studies)
            self.images_per_minute.set(report.images_per_minute)

    def move_done(self, status: str, completed: int, warning: int, failed: int) -> None:
        """Count one series' C-MOVE."""
        self.series.labels(status).inc()
        self.images.labels("completed").inc(completed)
        self.images.labels("warning").inc(warning)
        self.images.labels("failed").inc(failed)
