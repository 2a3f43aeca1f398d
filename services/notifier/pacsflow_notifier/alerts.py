"""Aggregated alerts: failed files and dead letters, reported together instead of one by one.

Incidents (one failed file at one destination, one dead letter) are recorded idempotently in
``notifier_incidents``. Once the oldest incident nobody has been told about is
``alert_window_seconds`` old, every unreported incident of its kind goes into ONE alert: counts
per destination (or per service and event type), the most common errors, a few examples. So a
PACS that rejects 500 files within the window causes one mail, and there is at most one alert
of each kind per window.

Reporting is one transaction: mark the incidents, summarise them, insert the alert's outbox
rows. The alert's id comes from its first incident, so two processes reporting at the same
time produce one alert: the second one's insert conflicts and it rolls back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pacsflow.bus import EventBus
from pacsflow.errors import BusError
from pacsflow.store import Database

from pacsflow_notifier.messages import MAX_EXAMPLES, AlertSummary, clean_inline
from pacsflow_notifier.outbox import NewMessage, Outbox

__all__ = ["ALERT_KINDS", "DeadLetterWatch", "Incident", "Incidents", "Reported"]

log = logging.getLogger(__name__)

#: the kinds of incident that are reported in aggregated alerts
ALERT_KINDS = ("file-failed", "dead-letters")

# Errors are grouped by their text: long ones would make every group unique and the mail huge.
_MAX_ERROR = 300
_MAX_GROUPS = 20
_MAX_ERRORS = 5


@dataclass(frozen=True)
class Incident:
    """One thing that went wrong, to be reported in the next alert of its kind."""

    key: str  # unique per kind: recording it again does nothing
    group: str
    error: str
    item: str


@dataclass(frozen=True)
class Reported:
    """An alert that was just queued (or would have been, without recipients)."""

    summary: AlertSummary
    queued: list[NewMessage]


class _AlreadyReported(Exception):
    """Another process reported these incidents first; roll back."""


class Incidents:
    """The incidents table over a :class:`~pacsflow.store.Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(self, kind: str, incidents: Iterable[Incident], now: float) -> None:
        """Record incidents not recorded yet (all in one transaction)."""
        rows = [
            (
                kind,
                incident.key,
                clean_inline(incident.group)[:_MAX_ERROR],
                clean_inline(incident.error)[:_MAX_ERROR],
                clean_inline(incident.item)[:1000],
                float(now),
            )
            for incident in incidents
        ]
        await self._db.executemany(
            "INSERT INTO notifier_incidents (kind, incident_key, group_name, error, item, "
            "seen_at) VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (kind, incident_key) DO NOTHING",
            rows,
        )

    async def oldest_open(self, kind: str) -> tuple[str, float] | None:
        """The key and time of the oldest incident not reported yet."""
        row = await self._db.fetchrow(
            "SELECT incident_key, seen_at FROM notifier_incidents "
            "WHERE kind = $1 AND alert IS NULL ORDER BY seen_at, incident_key LIMIT 1",
            kind,
        )
        return None if row is None else (row["incident_key"], float(row["seen_at"]))

    async def report(
        self,
        kind: str,
        *,
        window: float,
        now: float,
        outbox: Outbox,
        build: Callable[[AlertSummary, str], Sequence[NewMessage]],
    ) -> Reported | None:
        """If the oldest open incident is ``window`` old, report every open one in one alert:
        ``build(summary, source)`` gives its outbox rows, inserted in the same transaction."""
        oldest = await self.oldest_open(kind)
        if oldest is None or now - oldest[1] < window:
            return None
        source = f"{kind}:{oldest[0]}"
        try:
            async with self._db.transaction() as tx:
                await tx.execute(
                    "UPDATE notifier_incidents SET alert = $1 WHERE kind = $2 AND alert IS NULL",
                    source,
                    kind,
                )
                summary = await self._summarise(tx, kind, source)
                if summary is None:
                    raise _AlreadyReported
                messages = build(summary, source)
                queued = await outbox.enqueue(messages, now, db=tx)
                if messages and not queued:
                    raise _AlreadyReported
        except _AlreadyReported:
            return None
        return Reported(summary, queued)

    async def _summarise(self, db: Database, kind: str, alert: str) -> AlertSummary | None:
        totals = await db.fetchrow(
            "SELECT COUNT(*) AS n, MIN(seen_at) AS first_seen, MAX(seen_at) AS last_seen, "
            "COUNT(DISTINCT error) AS errors FROM notifier_incidents WHERE alert = $1",
            alert,
        )
        if totals is None or not totals["n"]:
            return None
        groups = await db.fetch(
            "SELECT group_name, COUNT(*) AS n FROM notifier_incidents WHERE alert = $1 "
            "GROUP BY group_name ORDER BY n DESC, group_name LIMIT $2",
            alert,
            _MAX_GROUPS,
        )
        errors = await db.fetch(
            "SELECT error, COUNT(*) AS n FROM notifier_incidents WHERE alert = $1 "
            "GROUP BY error ORDER BY n DESC, error LIMIT $2",
            alert,
            _MAX_ERRORS,
        )
        examples = await db.fetch(
            "SELECT group_name, item, error FROM notifier_incidents WHERE alert = $1 "
            "ORDER BY seen_at, incident_key LIMIT $2",
            alert,
            MAX_EXAMPLES,
        )
        return AlertSummary(
            kind=kind,
            count=int(totals["n"]),
            first_seen=float(totals["first_seen"]),
            last_seen=float(totals["last_seen"]),
            groups=[(row["group_name"], int(row["n"])) for row in groups],
            errors=[(row["error"], int(row["n"])) for row in errors],
            examples=[(row["group_name"], row["item"], row["error"]) for row in examples],
            more_errors=max(int(totals["errors"]) - len(errors), 0),
        )

    async def prune(self, reported_before: float) -> int:
        """Forget reported incidents seen before ``reported_before``; how many."""
        rows = await self._db.fetch(
            "DELETE FROM notifier_incidents WHERE alert IS NOT NULL AND seen_at < $1 "
            "RETURNING incident_key",
            float(reported_before),
        )
        return len(rows)


class DeadLetterWatch:
    """Records every service's new dead letters as incidents of kind ``dead-letters``."""

    def __init__(self, bus: EventBus, incidents: Incidents, services: Sequence[str]) -> None:
        self._bus = bus
        self._incidents = incidents
        self._services = tuple(services)

    async def check(self, now: float) -> int:
        """Look at every service's dead letters; how many there are in all."""
        total = 0
        for service in self._services:
            try:
                # Counting is one cheap call; reading means fetching every letter, so only
                # when there are some (normally there are none).
                if not await self._bus.dead_letter_count(service):
                    continue
                letters = await self._bus.dead_letters(service)
            except BusError as err:
                log.warning("cannot read the dead letters of %s: %s", service, err)
                continue
            total += len(letters)
            if not letters:
                continue
            # A letter's id is stable while it waits; a replayed one that fails again is new.
            await self._incidents.record(
                "dead-letters",
                (
                    Incident(
                        key=f"{service}:{letter.id}",
                        group=f"{service} {letter.event_type or '(unknown event type)'}",
                        error=letter.reason,
                        item=letter.id,
                    )
                    for letter in letters
                ),
                now,
            )
        return total
