"""The router's Prometheus metrics, and applying a drained :class:`Batch` to them.

Labels name routes (called AE titles), outcomes and reasons, never UIDs or patients.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pacsflow_router.collector import Batch

__all__ = ["RouterMetrics"]


class RouterMetrics:
    """Every metric of the router-scp service, registered once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.associations = Counter(
            "pacsflow_router_associations_total",
            "Associations by outcome (accepted, rejected, released, aborted) and reason",
            ["outcome", "reason"],
            registry=registry,
        )
        self.active = Gauge(
            "pacsflow_router_active_associations", "Associations open now", registry=registry
        )
        self.instances = Counter(
            "pacsflow_router_instances_total", "Instances stored", ["route"], registry=registry
        )
        self.received_bytes = Counter(
            "pacsflow_router_received_bytes_total",
            "Data set bytes stored",
            ["route"],
            registry=registry,
        )
        self.failures = Counter(
            "pacsflow_router_store_failures_total",
            "Instances refused or not written, by reason"
            " (disk-full, permission, io-error, invalid, too-large)",
            ["route", "reason"],
            registry=registry,
        )
        self.store_seconds = Histogram(
            "pacsflow_router_store_seconds",
            "From a C-STORE's first PDU to its file in place",
            ["route"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=registry,
        )
        self.studies_open = Gauge(
            "pacsflow_router_studies_open",
            "Studies receiving or waiting to be reported complete",
            registry=registry,
        )
        self.studies_completed = Counter(
            "pacsflow_router_studies_completed_total",
            "study-complete events published, first or after re-opening",
            ["route", "completion"],
            registry=registry,
        )
        self.forwarded = Counter(
            "pacsflow_router_forwarded_files_total",
            "Files announced to the uploader (file-ready) for forward routes",
            ["route"],
            registry=registry,
        )
        self.flush_failures = Counter(
            "pacsflow_router_flush_failures_total",
            "Failed writes of study updates or forward events (retried)",
            ["target"],
            registry=registry,
        )
        self.sweep_failures = Counter(
            "pacsflow_router_sweep_failures_total",
            "Completion sweeps that failed (retried), by what failed",
            ["target"],
            registry=registry,
        )
        self.routes = Gauge("pacsflow_router_routes", "Routes in force", registry=registry)
        self.route_reloads = Counter(
            "pacsflow_router_route_reloads_total",
            "Reloads of the routes file by result",
            ["result"],
            registry=registry,
        )

    def apply(self, batch: Batch) -> None:
        """Count what a drained batch reports."""
        for (metric, labels), amount in batch.counts.items():
            if metric == "instances":
                self.instances.labels(*labels).inc(amount)
            elif metric == "bytes":
                self.received_bytes.labels(*labels).inc(amount)
            elif metric == "associations":
                self.associations.labels(*labels).inc(amount)
            elif metric == "failures":
                self.failures.labels(*labels).inc(amount)
        observers: dict[str, Any] = {}
        for route, seconds in batch.latencies:
            observer = observers.get(route)
            if observer is None:
                observer = observers[route] = self.store_seconds.labels(route)
            observer.observe(seconds)
