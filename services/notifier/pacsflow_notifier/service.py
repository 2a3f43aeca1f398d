"""The notifier service: e-mail on study completion and on failures, exactly once.

The service is wired but does not handle events yet: it declares the durable queues it will
consume so that events published meanwhile are kept, then idles until it is stopped.
"""

from __future__ import annotations

import asyncio
import logging

from pacsflow.runtime import ServiceContext

CONSUMES: tuple[str, ...] = ("study-complete", "patient-complete", "file-failed")

log = logging.getLogger(__name__)


async def run(ctx: ServiceContext) -> None:
    """Run until cancelled."""
    if CONSUMES:
        await ctx.bus.declare(ctx.name, CONSUMES)
    log.warning("the notifier service has no event handling yet; its events are kept in its queues")
    await asyncio.Event().wait()
