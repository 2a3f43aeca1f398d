"""The in-memory event bus: the embedded bus on a private in-memory SQLite database.

For tests of services that need a bus but no file: the same code and the same semantics as
:class:`~pacsflow.bus.embedded.EmbeddedBus` (it passes the same contract suite), except that
everything is gone when it closes.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from pacsflow.bus._delivery import BusOptions
from pacsflow.bus.embedded import EmbeddedBus
from pacsflow.config import BusSettings

__all__ = ["MemoryBus"]


class MemoryBus(EmbeddedBus):
    """An embedded bus whose messages live only as long as the bus is open."""

    backend = "memory"

    def __init__(
        self,
        settings: BusSettings | None = None,
        *,
        registry: CollectorRegistry | None = None,
        logger: logging.Logger | None = None,
        options: BusOptions | None = None,
    ) -> None:
        super().__init__(
            ":memory:",
            settings or BusSettings(),
            registry=registry if registry is not None else CollectorRegistry(),
            logger=logger,
            options=options,
        )
