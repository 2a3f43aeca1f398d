"""The harvester service: bulk retrieval from a PACS, rate-limited and resumable.

The service is wired but does not handle events yet: it declares the durable queues it will
consume so that events published meanwhile are kept, then idles until it is stopped.
"""

from __future__ import annotations

import asyncio
import logging

from pacsflow.runtime import ServiceContext

CONSUMES: tuple[str, ...] = ("moved",)

log = logging.getLogger(__name__)


async def run(ctx: ServiceContext) -> None:
    """Run until cancelled."""
    if CONSUMES:
        await ctx.bus.declare(ctx.name, CONSUMES)
    log.warning("the harvester service has no event handling yet; its events are kept in its queues")
    await asyncio.Event().wait()
