"""Prometheus metrics of the event bus, the same names for both backends.

Labels are the service, the event type, and small closed sets (outcome, cause); never event ids,
UIDs or patients. The metric objects are registered on the registry the bus is given, so each
process (and each test) owns its own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["BusMetrics"]

# Handlers range from a database insert to a C-STORE of a whole series.
_HANDLER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class BusMetrics:
    """The bus's metric objects on one registry."""

    def __init__(self, registry: CollectorRegistry, backend: str) -> None:
        self.backend = backend
        self.published = Counter(
            "pacsflow_bus_events_published_total",
            "Events the bus stored durably (confirmed by the broker or committed to SQLite).",
            ["service", "event_type"],
            registry=registry,
        )
        self.publish_retries = Counter(
            "pacsflow_bus_publish_retries_total",
            "Publish attempts that failed and were retried (broker down or not confirming).",
            registry=registry,
        )
        self.handled = Counter(
            "pacsflow_bus_events_handled_total",
            "Deliveries settled, by outcome: ack, retry (redelivered later) or dead-letter.",
            ["service", "event_type", "outcome"],
            registry=registry,
        )
        self.handler_seconds = Histogram(
            "pacsflow_bus_handler_duration_seconds",
            "Time a handler took for one event, whatever its outcome.",
            ["service", "event_type"],
            buckets=_HANDLER_BUCKETS,
            registry=registry,
        )
        self.dead_letters = Counter(
            "pacsflow_bus_dead_letters_total",
            "Messages this process sent to the dead letters, by cause.",
            ["service", "event_type", "cause"],
            registry=registry,
        )
        self.connected = Gauge(
            "pacsflow_bus_connected",
            "1 while the bus backend is reachable (broker connection open, SQLite file open).",
            ["backend"],
            registry=registry,
        )
        self.reconnects = Counter(
            "pacsflow_bus_reconnects_total",
            "Times the connection to the broker was re-established after a loss.",
            ["backend"],
            registry=registry,
        )
        self.consumer_restores = Counter(
            "pacsflow_bus_consumer_restores_total",
            "Subscriptions the watchdog found without a consumer and subscribed again.",
            ["service"],
            registry=registry,
        )
        self.connected.labels(backend).set(0)
        self.reconnects.labels(backend)

    def set_connected(self, value: bool) -> None:
        """Record whether the backend is reachable."""
        self.connected.labels(self.backend).set(1 if value else 0)

    def reconnected(self) -> None:
        """Count one re-established connection."""
        self.reconnects.labels(self.backend).inc()
