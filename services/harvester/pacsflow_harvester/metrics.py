"""The harvester's Prometheus metrics.

Labels name DIMSE types, stages, states and reasons, never UIDs or patients. Requests per
minute is ``rate(pacsflow_harvester_requests_total[1m]) * 60`` across processes, and
``pacsflow_harvester_requests_last_minute`` for this process as the harvester itself counts.
The state gauges describe the whole harvest (every process), read from the state store.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["REQUEST_TYPES", "HarvesterMetrics"]

REQUEST_TYPES = ("find", "move", "get")


class HarvesterMetrics:
    """Every metric of the harvester service, registered once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "pacsflow_harvester_requests_total",
            "DIMSE requests sent to the source PACS, by type (find, move, get)",
            ["type"],
            registry=registry,
        )
        self.request_errors = Counter(
            "pacsflow_harvester_request_errors_total",
            "Requests that failed, by type and reason (unreachable, aborted, status)",
            ["type", "reason"],
            registry=registry,
        )
        self.last_minute = Gauge(
            "pacsflow_harvester_requests_last_minute",
            "Requests this process started in the last 60 seconds, by type",
            ["type"],
            registry=registry,
        )
        self.rate_wait = Counter(
            "pacsflow_harvester_rate_wait_seconds_total",
            "Time spent waiting for the shared request budget",
            registry=registry,
        )
        self.instances = Counter(
            "pacsflow_harvester_retrieved_instances_total",
            "Instances that arrived at the destination",
            ["method"],
            registry=registry,
        )
        self.bytes = Counter(
            "pacsflow_harvester_retrieved_bytes_total",
            "Bytes of the instances that arrived (their files)",
            ["method"],
            registry=registry,
        )
        self.refetched = Counter(
            "pacsflow_harvester_refetched_instances_total",
            "Instances requested again because a retrieve did not deliver them",
            registry=registry,
        )
        self.silent_losses = Counter(
            "pacsflow_harvester_silent_losses_total",
            "Retrieves that reported success but left instances missing",
            registry=registry,
        )
        self.retries = Counter(
            "pacsflow_harvester_retries_total",
            "Work put back for another attempt, by stage (scan, patient, study, series) and reason",
            ["stage", "reason"],
            registry=registry,
        )
        self.failed = Counter(
            "pacsflow_harvester_failed_total",
            "Work marked failed after its last attempt, by stage",
            ["stage"],
            registry=registry,
        )
        self.series_completed = Counter(
            "pacsflow_harvester_series_completed_total",
            "Series verified complete at the destination",
            registry=registry,
        )
        self.archives = Counter(
            "pacsflow_harvester_archives_total",
            "Patient archives written (first builds and rebuilds)",
            ["kind"],
            registry=registry,
        )
        self.series = Gauge(
            "pacsflow_harvester_series",
            "Series of the harvest by state",
            ["state"],
            registry=registry,
        )
        self.studies = Gauge(
            "pacsflow_harvester_studies",
            "Studies of the harvest by state",
            ["state"],
            registry=registry,
        )
        self.patients = Gauge(
            "pacsflow_harvester_patients",
            "Patients of the harvest by state",
            ["state"],
            registry=registry,
        )
        self.paused = Gauge(
            "pacsflow_harvester_paused",
            "1 while a pause window (or being outside the work windows) holds requests back",
            registry=registry,
        )
        self.unreachable = Gauge(
            "pacsflow_harvester_pacs_unreachable",
            "1 while the source PACS cannot be reached and requests wait",
            registry=registry,
        )
        self._recent: dict[str, deque[float]] = {kind: deque() for kind in REQUEST_TYPES}
        for kind in REQUEST_TYPES:
            self.requests.labels(kind)
            self.last_minute.labels(kind).set(0)

    def request_started(self, kind: str, now: float | None = None) -> None:
        """Count one request and keep the last minute's tally."""
        now = time.monotonic() if now is None else now
        self.requests.labels(kind).inc()
        recent = self._recent.setdefault(kind, deque())
        recent.append(now)
        self.refresh_last_minute(now)

    def refresh_last_minute(self, now: float | None = None) -> None:
        """Drop requests older than a minute from the per-type tallies."""
        now = time.monotonic() if now is None else now
        for kind, recent in self._recent.items():
            while recent and recent[0] <= now - 60.0:
                recent.popleft()
            self.last_minute.labels(kind).set(len(recent))

    def set_states(self, gauge: Gauge, counts: dict[str, int], states: tuple[str, ...]) -> None:
        """Set a by-state gauge; states with no rows read 0."""
        for state in states:
            gauge.labels(state).set(counts.get(state, 0))
