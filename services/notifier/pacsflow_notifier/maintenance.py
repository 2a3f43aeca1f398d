"""The notifier's periodic work: alerts that are due, new dead letters, metrics, clean-up.

Every tick (a tenth of the alert window, at most ``poll_seconds``) it reports the incidents
whose window has passed; every ``dead_letter_check_seconds`` it looks at every service's dead
letters; it keeps the pending gauges current and, once an hour, forgets messages and incidents
older than ``retention_days``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from pacsflow.config import NotifierSettings
from pacsflow.errors import StoreError

from pacsflow_notifier.alerts import ALERT_KINDS, DeadLetterWatch, Incidents
from pacsflow_notifier.messages import AlertSummary, Renderer
from pacsflow_notifier.metrics import NotifierMetrics
from pacsflow_notifier.outbox import NewMessage, Outbox
from pacsflow_notifier.targets import Targets

__all__ = ["Maintenance"]

log = logging.getLogger(__name__)

_PRUNE_INTERVAL = 3600.0


class Maintenance:
    """Runs the periodic work until cancelled."""

    def __init__(
        self,
        settings: NotifierSettings,
        *,
        outbox: Outbox,
        incidents: Incidents,
        dead_letters: DeadLetterWatch,
        renderer: Renderer,
        targets: Targets,
        metrics: NotifierMetrics,
        queued: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._outbox = outbox
        self._incidents = incidents
        self._dead_letters = dead_letters
        self._renderer = renderer
        self._targets = targets
        self._metrics = metrics
        self._queued = queued
        self._clock = clock
        self.interval = min(settings.alert_window_seconds / 10, settings.poll_seconds)
        self._next_dead_letter_check = 0.0
        self._next_prune = 0.0

    async def run(self) -> None:
        """Tick until cancelled; a state store error only delays the work."""
        while True:
            try:
                await self.tick()
            except StoreError as err:
                log.warning("notifier maintenance: state store error: %s", err)
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        """One round of the periodic work."""
        now = self._clock()
        if now >= self._next_dead_letter_check:
            self._next_dead_letter_check = now + self._settings.dead_letter_check_seconds
            await self._dead_letters.check(now)
        for kind in ALERT_KINDS:
            await self._report(kind, now)
        if now >= self._next_prune:
            self._next_prune = now + _PRUNE_INTERVAL
            before = now - self._settings.retention_days * 86400
            sent = await self._outbox.prune(before)
            reported = await self._incidents.prune(before)
            if sent or reported:
                log.info("forgot %d sent message(s) and %d reported incident(s)", sent, reported)
        self._metrics.refresh(
            await self._outbox.stats(self._settings.failing_after_attempts), self._clock()
        )

    def _build(self, summary: AlertSummary, source: str) -> Sequence[NewMessage]:
        rendered = self._renderer.alert(summary)
        return self._targets.messages(rendered, source, self._targets.recipients(summary.kind))

    async def _report(self, kind: str, now: float) -> None:
        reported = await self._incidents.report(
            kind,
            window=self._settings.alert_window_seconds,
            now=now,
            outbox=self._outbox,
            build=self._build,
        )
        if reported is None:
            return
        self._metrics.incidents.labels(kind).inc(reported.summary.count)
        for message in reported.queued:
            self._metrics.queued.labels(message.channel, message.kind).inc()
        if reported.queued:
            log.warning(
                "alert queued: %d %s incident(s) in one message", reported.summary.count, kind
            )
            self._queued()
        else:
            log.warning(
                "%d %s incident(s), but nobody to tell (notifier.recipients, webhooks)",
                reported.summary.count, kind,
            )
