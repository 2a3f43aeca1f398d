"""The uploader's Prometheus metrics: labelled by destination and status, never by file."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["UploaderMetrics"]

# C-STORE round trips run from well under a millisecond (small images on a LAN) to seconds.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip
_LAG_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


class UploaderMetrics:
    """Every uploader metric, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.files = Counter(
            "pacsflow_uploader_files_total",
            "Files handled per destination and outcome (sent, warning, failed, unsupported,"
            " invalid: final; retry: will be sent again; verified: found by C-FIND)",
            ["destination", "status"],
            registry=registry,
        )
        self.bytes = Counter(
            "pacsflow_uploader_bytes_total",
            "Bytes of the files handled, per destination and outcome",
            ["destination", "status"],
            registry=registry,
        )
        self.store_seconds = Histogram(
            "pacsflow_uploader_store_seconds",
            "C-STORE request to response, per file",
            ["destination"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "pacsflow_uploader_retries_total",
            "Files put back to be sent again, by reason (failure-status, no-response,"
            " not-sent, interrupted)",
            ["destination", "reason"],
            registry=registry,
        )
        self.associations_open = Gauge(
            "pacsflow_uploader_associations_open",
            "Associations held open to each destination",
            ["destination"],
            registry=registry,
        )
        self.association_failures = Counter(
            "pacsflow_uploader_association_failures_total",
            "Associations that could not be made",
            ["destination"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "pacsflow_uploader_in_flight_files",
            "Files claimed and being sent",
            ["destination"],
            registry=registry,
        )
        self.pending = Gauge(
            "pacsflow_uploader_pending_files",
            "Deliveries waiting to be sent (due or not)",
            ["destination"],
            registry=registry,
        )
        self.queue_lag = Gauge(
            "pacsflow_uploader_queue_lag_seconds",
            "Age of the oldest waiting delivery",
            ["destination"],
            registry=registry,
        )
        self.delivery_seconds = Histogram(
            "pacsflow_uploader_delivery_seconds",
            "From file-ready to the destination's confirmation, per file",
            ["destination"],
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        self.paused = Gauge(
            "pacsflow_uploader_paused",
            "1 while taking new work is paused because the load per core is too high",
            registry=registry,
        )
        self.destination_paused = Gauge(
            "pacsflow_uploader_destination_paused",
            "1 while a failing destination is left alone before the next try",
            ["destination"],
            registry=registry,
        )
        self.events = Counter(
            "pacsflow_uploader_events_total",
            "file-sent and file-failed events published",
            ["type"],
            registry=registry,
        )
