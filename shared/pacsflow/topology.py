"""Who consumes which events: the durable queues of the whole system.

A topic exchange drops an event that no queue is bound to, so a service that starts after its
producer would never see what was published meanwhile. Every pacsflow process therefore
declares the queues of all services in ``bus.declare_services`` when it starts (declaring is
idempotent), and each service consumes exactly the event types listed here for it.
"""

from __future__ import annotations

from collections.abc import Iterable

from pacsflow.bus.base import EventBus

__all__ = ["CONSUMES", "declare_queues"]

#: service -> the event types it consumes
CONSUMES: dict[str, tuple[str, ...]] = {
    "watcher": ("file-sent",),
    "uploader": ("file-ready",),
    "harvester": (),
    "sync": ("series-missing", "moved"),
    "router-scp": (),
    "notifier": ("study-complete", "patient-complete", "file-failed"),
}


async def declare_queues(bus: EventBus, services: Iterable[str]) -> None:
    """Declare the durable queues of ``services`` so their events are kept until they run."""
    for service in services:
        if CONSUMES.get(service):
            await bus.declare(service, CONSUMES[service])
