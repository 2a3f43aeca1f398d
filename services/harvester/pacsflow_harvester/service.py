"""The harvester service: bulk retrieval from a PACS, rate-limited and resumable.

Wiring only; :class:`~pacsflow_harvester.harvester.Harvester` does the work. The harvester
consumes no events: its work queue is the state store. It publishes ``moved`` (one per series
outcome) and ``patient-complete`` (one per patient archive built).
"""

from __future__ import annotations

import asyncio
import logging

from pacsflow.runtime import ServiceContext

from pacsflow_harvester.harvester import Harvester
from pacsflow_harvester.metrics import HarvesterMetrics

__all__ = ["CONSUMES", "run"]

#: the harvester consumes no events; it is driven from the state store
CONSUMES: tuple[str, ...] = ()

log = logging.getLogger(__name__)


async def run(ctx: ServiceContext) -> None:
    """Harvest until cancelled; without ``harvester.source`` wait idle."""
    if ctx.settings.harvester.source is None:
        # The metrics still exist (at zero), so dashboards and alerts find them.
        HarvesterMetrics(ctx.registry)
        log.warning("harvester.source is not set: the harvester has nothing to do and waits")
        await asyncio.Event().wait()
        return
    harvester = Harvester(
        ctx.settings, db=ctx.db, bus=ctx.bus, registry=ctx.registry, source=ctx.source
    )
    await harvester.run()
