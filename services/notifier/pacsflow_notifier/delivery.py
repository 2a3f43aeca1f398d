"""The delivery loop: sends the outbox's due messages of one channel, oldest first.

One loop per channel (e-mail, webhooks), so a mail server that hangs does not hold up the
webhooks. Each message is claimed with a lease, sent, and marked sent; a failed attempt is
retried after a delay that doubles from ``retry_initial_seconds`` up to ``retry_max_seconds``
and then stays there: a message is never dropped. From ``failing_after_attempts`` failures on
it is logged as an error and counted as failing. When a server that could not be reached
answers again, every message waiting for it is tried at once, not after its backoff.

The loop sleeps until the next message is due, until woken (a message was queued in this
process), or for ``poll_seconds`` (messages queued by other processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pacsflow.errors import StoreError

from pacsflow_notifier.channels import Channel, DeliveryError
from pacsflow_notifier.metrics import NotifierMetrics
from pacsflow_notifier.outbox import Outbox, OutboxMessage

__all__ = ["Backoff", "DeliveryLoop"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class Backoff:
    """Delay before the next attempt: doubling from ``initial``, capped at ``maximum``."""

    initial: float
    maximum: float

    def delay(self, attempts: int) -> float:
        """The wait after ``attempts`` failed attempts (1 = the first failed)."""
        exponent = min(max(attempts - 1, 0), 40)
        return min(self.initial * 2.0**exponent, self.maximum)


class DeliveryLoop:
    """Delivers one channel's outbox rows until cancelled."""

    def __init__(
        self,
        channel: Channel,
        outbox: Outbox,
        metrics: NotifierMetrics,
        *,
        owner: str,
        backoff: Backoff,
        failing_after: int,
        poll: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.channel = channel
        self._outbox = outbox
        self._metrics = metrics
        self._owner = owner
        self._backoff = backoff
        self._failing_after = failing_after
        self._poll = poll
        self._clock = clock
        self._wakeup = asyncio.Event()
        # Set when the server could not be reached; the next success clears it.
        self._unreachable = False

    def wake(self) -> None:
        """Look for due messages now."""
        self._wakeup.set()

    async def run(self) -> None:
        """Deliver due messages, then wait for the next; until cancelled."""
        while True:
            self._wakeup.clear()
            try:
                await self.deliver_due()
                next_due = await self._outbox.next_due(self.channel.name)
            except StoreError as err:
                log.warning("notifier %s delivery: state store error: %s", self.channel.name, err)
                next_due = None
            timeout = self._poll
            if next_due is not None:
                timeout = min(timeout, max(next_due - self._clock(), 0.0))
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wakeup.wait()

    async def deliver_due(self) -> int:
        """Send every message that is due now; how many attempts were made."""
        count = 0
        while True:
            message = await self._outbox.claim(
                self.channel.name, self._owner, self._clock(), self.channel.lease
            )
            if message is None:
                return count
            count += 1
            attempt = asyncio.create_task(self._attempt(message))
            try:
                await asyncio.shield(attempt)
            except asyncio.CancelledError:
                # Stopping: let the attempt in flight finish and record its outcome, or the
                # next start would send the message a second time.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    async with asyncio.timeout(self.channel.lease):
                        await attempt
                raise

    async def _attempt(self, message: OutboxMessage) -> None:
        try:
            await self.channel.send(message)
        except DeliveryError as err:
            await self._failed(message, err)
            return
        await self._settle(lambda: self._outbox.mark_sent(message.id, self._clock()))
        self._metrics.attempts.labels(self.channel.name, "sent").inc()
        log.info(
            "sent %s %s (%s), attempt %d",
            message.kind, message.id, self.channel.describe(message), message.attempts + 1,
            extra={"outbox_id": message.id, "channel": self.channel.name},
        )
        if self._unreachable:
            self._unreachable = False
            moved = await self._settle(
                lambda: self._outbox.expedite(self.channel.name, self._clock())
            )
            if moved:
                log.info(
                    "%s answers again: %d waiting message(s) are due now", self.channel.name, moved
                )

    async def _failed(self, message: OutboxMessage, err: DeliveryError) -> None:
        attempts = message.attempts + 1
        delay = self._backoff.delay(attempts)
        self._unreachable = self._unreachable or err.unreachable
        await self._settle(
            lambda: self._outbox.mark_failed(
                message.id, self._owner, attempts, self._clock() + delay, str(err)
            )
        )
        self._metrics.attempts.labels(self.channel.name, "failed").inc()
        failing = attempts >= self._failing_after
        log.log(
            logging.ERROR if failing else logging.WARNING,
            "%s %s could not be delivered (attempt %d%s), next try in %.0f s: %s",
            message.kind, message.id, attempts, ", failing" if failing else "", delay, err,
            extra={"outbox_id": message.id, "channel": self.channel.name, "attempts": attempts},
        )

    async def _settle(self, write: Callable[[], Awaitable[_T]]) -> _T:
        """Record an outcome, retrying while the state store is away: a sent message that is
        not marked sent would be sent again."""
        delay = 0.1
        while True:
            try:
                return await write()
            except StoreError as err:
                log.warning("cannot record a delivery outcome, retrying: %s", err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
