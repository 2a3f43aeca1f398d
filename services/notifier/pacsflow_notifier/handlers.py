"""The event handler: each consumed event becomes outbox rows or incidents, committed at once.

* ``study-complete`` and ``patient-complete``: the message is rendered and its outbox rows
  (one e-mail, one per webhook) are inserted in one transaction, keyed by the event id, so a
  redelivered event inserts nothing. The bus acknowledges the event after the commit.
* ``file-failed``: each failed file is recorded as an incident (keyed by event id and position);
  the aggregator reports them later in one alert.

Delivery happens elsewhere (:mod:`pacsflow_notifier.delivery`): the handler never waits on a
mail server, so an SMTP outage does not back up the bus.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pacsflow.bus import RejectEvent
from pacsflow.events import Event, FileFailed, FileOutcome, PatientComplete, StudyComplete
from pacsflow.store import Database

from pacsflow_notifier.alerts import Incident, Incidents
from pacsflow_notifier.messages import Rendered, Renderer
from pacsflow_notifier.metrics import NotifierMetrics
from pacsflow_notifier.outbox import Outbox
from pacsflow_notifier.targets import Targets

__all__ = ["CONSUMES", "EventHandler"]

log = logging.getLogger(__name__)

#: the event types the notifier consumes
CONSUMES: tuple[str, ...] = ("study-complete", "patient-complete", "file-failed")


def _failure_text(outcome: FileOutcome) -> str:
    if outcome.error:
        return outcome.error
    if outcome.status is not None:
        return f"DIMSE status 0x{outcome.status:04X}"
    return "no answer from the destination"


class EventHandler:
    """Called by the bus for each event the notifier consumes."""

    def __init__(
        self,
        db: Database,
        *,
        outbox: Outbox,
        incidents: Incidents,
        renderer: Renderer,
        targets: Targets,
        metrics: NotifierMetrics,
        queued: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._outbox = outbox
        self._incidents = incidents
        self._renderer = renderer
        self._targets = targets
        self._metrics = metrics
        self._queued = queued
        self._clock = clock

    async def __call__(self, event: Event) -> None:
        """Handle one event; returns once its effect is committed."""
        fields = {"event_id": str(event.id), "correlation_id": event.correlation_id}
        if isinstance(event, StudyComplete):
            payload = event.payload
            rendered = self._renderer.study_complete(payload)
            recipients = self._targets.recipients("study-complete", route=payload.route)
            await self._enqueue(event, rendered, recipients, fields)
        elif isinstance(event, PatientComplete):
            rendered = self._renderer.patient_complete(event.payload)
            recipients = self._targets.recipients("patient-complete")
            await self._enqueue(event, rendered, recipients, fields)
        elif isinstance(event, FileFailed):
            await self._file_failed(event, fields)
        else:
            raise RejectEvent(f"the notifier does not handle {event.type!r} events")

    async def _enqueue(
        self, event: Event, rendered: Rendered, recipients: list[str], fields: dict[str, object]
    ) -> None:
        messages = self._targets.messages(rendered, f"event:{event.id}", recipients)
        if not messages:
            log.info("no recipients for %s: nothing to send", event.type, extra=fields)
            return
        async with self._db.transaction() as tx:
            queued = await self._outbox.enqueue(messages, self._clock(), db=tx)
        if not queued:
            log.info("%s event handled before (a redelivery): nothing new to send", event.type,
                     extra=fields)
            return
        for message in queued:
            self._metrics.queued.labels(message.channel, message.kind).inc()
        log.info(
            "queued %s: %s", event.type, ", ".join(m.channel for m in queued), extra=fields
        )
        self._queued()

    async def _file_failed(self, event: FileFailed, fields: dict[str, object]) -> None:
        if not self._targets.anyone("file-failed"):
            log.debug("nobody is told about failed files: %s not recorded", event.id, extra=fields)
            return
        await self._incidents.record(
            "file-failed",
            (
                Incident(
                    key=f"{event.id}:{index}",
                    group=outcome.destination,
                    error=_failure_text(outcome),
                    item=outcome.path,
                )
                for index, outcome in enumerate(event.payload.files)
            ),
            self._clock(),
        )
