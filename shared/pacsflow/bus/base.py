"""The event bus port: one interface, two backends (RabbitMQ and embedded SQLite).

Delivery is at least once. A handler that returns has its message acknowledged; one that
raises has it redelivered until the delivery limit, then dead-lettered; one that raises
:class:`RejectEvent` has it dead-lettered at once. Messages that cannot be decoded (unknown
type or version) are dead-lettered with a clear log line, never crashed on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from pacsflow.errors import PacsflowError
from pacsflow.events import Event

__all__ = ["DeadLetter", "EventBus", "Handler", "RejectEvent"]

Handler = Callable[[Event], Awaitable[None]]


class RejectEvent(PacsflowError):
    """Raised by a handler for an event that can never succeed: dead-letter it now."""


@dataclass(frozen=True)
class DeadLetter:
    """A message that could not be handled, kept for an operator to inspect or replay."""

    id: str
    service: str
    queue: str
    event_type: str | None
    body: bytes
    reason: str
    deliveries: int
    time: datetime | None


class EventBus(Protocol):
    """What services use to publish and consume events."""

    async def start(self) -> None:
        """Connect and declare the exchange; raise BusError when unreachable."""

    async def close(self) -> None:
        """Stop consuming, wait for running handlers, disconnect."""

    async def publish(self, *events: Event) -> None:
        """Publish; returns only once the bus has durably stored every event."""

    async def declare(self, service: str, event_types: Sequence[str]) -> None:
        """Create the service's durable queues so events are kept before it consumes."""

    async def subscribe(self, service: str, event_types: Sequence[str], handler: Handler) -> None:
        """Declare the service's queues and call ``handler`` for each event, at most
        ``prefetch`` at a time. Returns once consuming has started."""

    async def ready(self) -> bool:
        """True when the bus is reachable and every subscription is consuming."""

    async def queue_depths(self) -> dict[str, int]:
        """Messages waiting per queue, dead-letter queues included."""

    async def dead_letter_count(self, service: str) -> int:
        """How many dead letters the service has (without reading them)."""

    async def dead_letters(self, service: str) -> list[DeadLetter]:
        """The service's dead letters, oldest first (they stay in place)."""

    async def replay_dead_letters(self, service: str, ids: Sequence[str] | None = None) -> int:
        """Send dead letters (all, or those ids) back to the queue they came from."""

    async def purge_dead_letters(self, service: str, ids: Sequence[str] | None = None) -> int:
        """Delete dead letters (all, or those ids); returns how many."""
