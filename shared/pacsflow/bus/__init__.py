"""The event bus: the port (``base.py``) and its backends, chosen by ``bus.backend``.

* ``embedded`` (default): :class:`EmbeddedBus`, messages in the SQLite state file;
* ``rabbitmq``: :class:`RabbitBus`, quorum queues on RabbitMQ;
* :class:`MemoryBus` (tests): the embedded bus on an in-memory database.

All of them pass the same contract tests (``tests/bus/contract.py``).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from pacsflow.bus._delivery import BusOptions, dead_letter_queue_name, queue_name
from pacsflow.bus.base import DeadLetter, EventBus, Handler, RejectEvent
from pacsflow.bus.embedded import EmbeddedBus
from pacsflow.bus.memory import MemoryBus
from pacsflow.bus.metrics import BusMetrics
from pacsflow.bus.rabbit import RabbitBus
from pacsflow.config import Settings

__all__ = [
    "BusMetrics",
    "BusOptions",
    "DeadLetter",
    "EmbeddedBus",
    "EventBus",
    "Handler",
    "MemoryBus",
    "RabbitBus",
    "RejectEvent",
    "create_bus",
    "dead_letter_queue_name",
    "queue_name",
]


def create_bus(
    settings: Settings,
    registry: CollectorRegistry,
    *,
    logger: logging.Logger | None = None,
    options: BusOptions | None = None,
) -> EventBus:
    """The bus backend the settings ask for (not started yet)."""
    if settings.bus.backend == "rabbitmq":
        return RabbitBus(settings.bus, registry=registry, logger=logger, options=options)
    return EmbeddedBus(
        settings.state.path, settings.bus, registry=registry, logger=logger, options=options
    )
