"""What the receiving threads (or worker processes) report, gathered for the next flush.

The C-STORE path only appends to a list under a lock; the asyncio side drains it every
``flush_seconds`` into metrics, study updates and forward events. A worker process drains
its own collector into a :class:`Batch` and sends it to the service process, which merges
it into its collector, so one flush path serves both set-ups.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

__all__ = ["Batch", "Collector", "Stored"]


@dataclass(frozen=True, slots=True)
class Stored:
    """One instance written to its place."""

    route: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    patient_id: str
    study_description: str
    study_folder: str
    series_folder: str
    path: str
    size: int
    #: epoch seconds when the file was in place
    received_at: float
    #: node names of the route's forward destinations
    forward: tuple[str, ...] = ()


@dataclass(slots=True)
class Batch:
    """Everything reported since the last drain; picklable for worker processes."""

    stored: list[Stored] = field(default_factory=list)
    #: (metric, labels) -> amount; metrics as in :class:`~pacsflow_router.metrics.RouterMetrics`
    counts: dict[tuple[str, tuple[str, ...]], float] = field(default_factory=dict)
    #: (route, seconds) of each stored instance: answer latency
    latencies: list[tuple[str, float]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.stored or self.counts or self.latencies)


class Collector:
    """Thread-safe accumulation of :class:`Batch` contents."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batch = Batch()

    def stored(self, record: Stored, seconds: float) -> None:
        with self._lock:
            batch = self._batch
            batch.stored.append(record)
            batch.latencies.append((record.route, seconds))
            counts = batch.counts
            key = ("instances", (record.route,))
            counts[key] = counts.get(key, 0) + 1
            key = ("bytes", (record.route,))
            counts[key] = counts.get(key, 0) + record.size

    def count(self, metric: str, *labels: str, amount: float = 1) -> None:
        with self._lock:
            counts = self._batch.counts
            counts[metric, labels] = counts.get((metric, labels), 0) + amount

    def merge(self, other: Batch) -> None:
        with self._lock:
            batch = self._batch
            batch.stored.extend(other.stored)
            batch.latencies.extend(other.latencies)
            for key, amount in other.counts.items():
                batch.counts[key] = batch.counts.get(key, 0) + amount

    def drain(self) -> Batch:
        with self._lock:
            batch, self._batch = self._batch, Batch()
        return batch
