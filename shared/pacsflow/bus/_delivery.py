"""One delivery, the same way on every backend: decode, run the handler, decide how to settle.

This module owns the handling half of the bus contract (``base.py``):

* the message is decoded first; bytes that are not a known event (bad JSON, unknown type or
  version, a type that does not belong on the queue) are dead-lettered at once with the reason;
* the handler runs under a time limit (``BusOptions.handler_timeout``): RabbitMQ closes the
  channel of a consumer that holds a message unacknowledged past its consumer timeout (30 min
  by default), so a handler still running at the limit is cancelled and the message retried;
* :class:`~pacsflow.bus.base.RejectEvent` dead-letters at once; any other exception retries
  after a short delay that doubles with each delivery, until the delivery limit, when the
  message is dead-lettered with the last error as its reason;
* a message already delivered more often than the limit without ever being settled (the
  process died while handling it, again and again) is dead-lettered without running the
  handler, so one poison message cannot crash a service forever.

The backends only carry the :class:`Verdict` out (ack, requeue later, or move to the dead
letters) and only after the handler has returned, so nothing is acknowledged early.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pacsflow.bus.base import Handler, RejectEvent
from pacsflow.bus.metrics import BusMetrics
from pacsflow.config import BusSettings
from pacsflow.errors import EventError
from pacsflow.events import Event, decode_event
from pacsflow.logs import log_context

__all__ = [
    "drain_handlers",
    "BusOptions",
    "Dispatcher",
    "Verdict",
    "dead_letter_queue_name",
    "queue_name",
]

Action = Literal["ack", "retry", "dead-letter"]
Cause = Literal["rejected", "undecodable", "delivery-limit"]


@dataclass(frozen=True)
class BusOptions:
    """Timings of the bus that are not part of the YAML configuration (yet)."""

    #: a handler still running after this many seconds is cancelled and its message retried;
    #: well under RabbitMQ's consumer timeout (30 min), so the broker never closes the channel
    handler_timeout: float = 600.0
    #: publish retries (broker restarting, confirms missing) until this deadline, then BusError
    publish_timeout: float = 60.0
    #: the delay before a failed message is delivered again: retry_delay * 2**(deliveries - 1)
    retry_delay: float = 0.5
    retry_delay_max: float = 30.0
    #: close() waits this long for running handlers, then cancels them (their messages return)
    close_timeout: float = 30.0
    #: RabbitMQ only
    connect_timeout: float = 10.0
    reconnect_interval: float = 1.0
    watchdog_interval: float = 5.0
    #: embedded only: how often consumers look for messages other processes wrote
    poll_interval: float = 1.0
    heartbeat_interval: float = 5.0
    #: claims of a process whose heartbeat is older than this are given back
    owner_stale_after: float = 30.0

    @classmethod
    def from_settings(cls, settings: BusSettings) -> BusOptions:
        """Options with any field the bus settings also define taken from the settings."""
        names = {field.name for field in dataclasses.fields(cls)}
        values = {name: getattr(settings, name) for name in names if hasattr(settings, name)}
        return cls(**values)

    def retry_delay_for(self, deliveries: int) -> float:
        """How long a message waits before its next delivery after ``deliveries`` failed."""
        exponent = min(max(deliveries - 1, 0), 30)
        return min(self.retry_delay * 2.0**exponent, self.retry_delay_max)


def queue_name(prefix: str, service: str, event_type: str) -> str:
    """The durable queue of one service for one event type."""
    return f"{prefix}.{service}.{event_type}"


def dead_letter_queue_name(prefix: str, service: str) -> str:
    """The queue that keeps one service's dead letters."""
    return f"{prefix}.{service}.dead-letters"


@dataclass(frozen=True)
class Verdict:
    """What to do with a delivery once its handler has finished."""

    action: Action
    delay: float = 0.0
    reason: str = ""
    cause: Cause | None = None


class Dispatcher:
    """Runs one subscription's handler for single deliveries and records the outcome."""

    def __init__(
        self,
        service: str,
        handler: Handler,
        *,
        delivery_limit: int,
        options: BusOptions,
        metrics: BusMetrics,
        logger: logging.Logger,
    ) -> None:
        self.service = service
        self._handler = handler
        self._limit = delivery_limit
        self._options = options
        self._metrics = metrics
        self._logger = logger

    async def handle(
        self, body: bytes, *, queue: str, event_type: str, deliveries: int
    ) -> Verdict:
        """Decode ``body`` and run the handler; ``deliveries`` counts this one (1 = first)."""
        # Every line logged while handling, by the bus or the handler, names the event.
        with log_context(service=self.service, queue=queue, event_type=event_type):
            return await self._handle(body, queue, event_type, deliveries)

    async def _handle(self, body: bytes, queue: str, event_type: str, deliveries: int) -> Verdict:
        log_fields: dict[str, Any] = {"deliveries": deliveries}
        try:
            event = decode_event(body)
            if event.type != event_type:
                raise EventError(f"a {event.type!r} event arrived on the queue for {event_type!r}")
        except EventError as err:
            reason = f"undecodable: {err}"
            self._logger.error(
                "dead-lettering an undecodable message on %s: %s", queue, err, extra=log_fields
            )
            return self._verdict_dead_letter(event_type, reason, "undecodable")

        with log_context(event_id=str(event.id), correlation_id=event.correlation_id):
            return await self._run(event, event_type, deliveries, log_fields)

    async def _run(
        self, event: Event, event_type: str, deliveries: int, log_fields: dict[str, Any]
    ) -> Verdict:
        if deliveries > self._limit:
            reason = (
                f"delivered {deliveries} times without a result (the process stopped while "
                f"handling it); the delivery limit is {self._limit}"
            )
            self._logger.error("dead-lettering %s event: %s", event.type, reason, extra=log_fields)
            return self._verdict_dead_letter(event_type, reason, "delivery-limit")

        started = time.monotonic()
        scope = asyncio.timeout(self._options.handler_timeout)
        try:
            async with scope:
                await self._handler(event)
        except RejectEvent as err:
            reason = f"rejected by the handler: {err}"
            self._logger.error("dead-lettering %s event: %s", event.type, reason, extra=log_fields)
            return self._verdict_dead_letter(event_type, reason, "rejected")
        except Exception as err:
            # Anything else a handler raises is worth another try: the delivery's reject path.
            if isinstance(err, TimeoutError) and scope.expired():
                error = (
                    f"the handler ran longer than its limit of {self._options.handler_timeout:g} s "
                    "and was cancelled; long work belongs in the state store"
                )
            else:
                error = f"{type(err).__name__}: {err}"
            return self._verdict_failed(event, error, deliveries, log_fields, err)
        finally:
            self._metrics.handler_seconds.labels(self.service, event_type).observe(
                time.monotonic() - started
            )
        self._metrics.handled.labels(self.service, event_type, "ack").inc()
        return Verdict("ack")

    def _verdict_failed(
        self,
        event: Event,
        error: str,
        deliveries: int,
        log_fields: Mapping[str, Any],
        err: BaseException,
    ) -> Verdict:
        if deliveries >= self._limit:
            reason = f"failed {deliveries} times (the delivery limit); last error: {error}"
            self._logger.error(
                "dead-lettering %s event: %s", event.type, reason, extra=dict(log_fields),
                exc_info=err,
            )
            return self._verdict_dead_letter(event.type, reason, "delivery-limit")
        delay = self._options.retry_delay_for(deliveries)
        self._logger.warning(
            "handler failed for %s event (delivery %d of at most %d), retrying in %.2f s: %s",
            event.type, deliveries, self._limit, delay, error, extra=dict(log_fields),
            exc_info=err,
        )
        self._metrics.handled.labels(self.service, event.type, "retry").inc()
        return Verdict("retry", delay=delay, reason=error)

    def _verdict_dead_letter(self, event_type: str, reason: str, cause: Cause) -> Verdict:
        self._metrics.handled.labels(self.service, event_type, "dead-letter").inc()
        self._metrics.dead_letters.labels(self.service, event_type, cause).inc()
        return Verdict("dead-letter", reason=reason, cause=cause)


async def drain_handlers(
    running: Collection[asyncio.Task[None]], timeout: float, logger: logging.Logger
) -> None:
    """On close: let running handlers finish for up to ``timeout`` seconds, then cancel the
    rest (their messages are not acknowledged, so they are delivered again)."""
    if not running:
        return
    _, pending = await asyncio.wait(running, timeout=timeout)
    if pending:
        logger.warning(
            "closing the bus: %d handler(s) still running after %.1f s are cancelled; "
            "their messages will be delivered again",
            len(pending),
            timeout,
        )
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
