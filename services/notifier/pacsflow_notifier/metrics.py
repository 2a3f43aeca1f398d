"""Prometheus metrics of the notifier: messages queued, delivery attempts, what is pending.

Labels are the channel (``email``, ``webhook``), the kind of message and the attempt's status;
never recipients, UIDs or patients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge

from pacsflow.config import NOTIFICATION_KINDS

from pacsflow_notifier.outbox import ChannelStats

__all__ = ["NotifierMetrics"]


class NotifierMetrics:
    """The notifier's metric objects on one registry."""

    def __init__(self, registry: CollectorRegistry, channels: Iterable[str]) -> None:
        self.channels = tuple(channels)
        self.queued = Counter(
            "pacsflow_notifier_notifications_queued_total",
            "Messages put into the outbox (a redelivered event adds none).",
            ["channel", "kind"],
            registry=registry,
        )
        self.attempts = Counter(
            "pacsflow_notifier_delivery_attempts_total",
            "Delivery attempts by outcome: sent (once per message) or failed (retried later).",
            ["channel", "status"],
            registry=registry,
        )
        self.pending = Gauge(
            "pacsflow_notifier_notifications_pending",
            "Messages in the outbox that are not delivered yet.",
            ["channel"],
            registry=registry,
        )
        self.failing = Gauge(
            "pacsflow_notifier_notifications_failing",
            "Pending messages whose delivery failed notifier.failing_after_attempts times or more.",
            ["channel"],
            registry=registry,
        )
        self.oldest = Gauge(
            "pacsflow_notifier_oldest_pending_seconds",
            "Age of the oldest message not delivered yet (0 when none is pending).",
            ["channel"],
            registry=registry,
        )
        self.incidents = Counter(
            "pacsflow_notifier_incidents_reported_total",
            "Failed files and dead letters reported in aggregated alerts.",
            ["kind"],
            registry=registry,
        )
        # Every series exists from the start, so rates and alerts see zeros, not gaps.
        for channel in self.channels:
            for status in ("sent", "failed"):
                self.attempts.labels(channel, status)
            for kind in NOTIFICATION_KINDS:
                self.queued.labels(channel, kind)
            self.pending.labels(channel).set(0)
            self.failing.labels(channel).set(0)
            self.oldest.labels(channel).set(0)
        for kind in ("file-failed", "dead-letters"):
            self.incidents.labels(kind)

    def refresh(self, stats: Mapping[str, ChannelStats], now: float) -> None:
        """Set the pending gauges from the outbox's counts."""
        for channel in self.channels:
            entry = stats.get(channel, ChannelStats())
            self.pending.labels(channel).set(entry.pending)
            self.failing.labels(channel).set(entry.failing)
            age = 0.0 if entry.oldest_created_at is None else max(now - entry.oldest_created_at, 0)
            self.oldest.labels(channel).set(age)
