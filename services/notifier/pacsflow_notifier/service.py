"""The notifier service: e-mail (and webhooks) on study completion and on failures, exactly once.

Wiring only: the event handler (:mod:`.handlers`) turns ``study-complete``,
``patient-complete`` and ``file-failed`` events into outbox rows and incidents; one delivery
loop per channel (:mod:`.delivery`) sends the outbox; the maintenance loop (:mod:`.maintenance`)
reports aggregated alerts (failed files, dead letters) and keeps the metrics current.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid

from pacsflow.config import SERVICES
from pacsflow.runtime import ServiceContext

from pacsflow_notifier.alerts import DeadLetterWatch, Incidents
from pacsflow_notifier.channels import build_channels
from pacsflow_notifier.delivery import Backoff, DeliveryLoop
from pacsflow_notifier.handlers import CONSUMES, EventHandler
from pacsflow_notifier.maintenance import Maintenance
from pacsflow_notifier.messages import Renderer, check_templates
from pacsflow_notifier.metrics import NotifierMetrics
from pacsflow_notifier.outbox import Outbox
from pacsflow_notifier.targets import Targets

__all__ = ["CONSUMES", "run"]

log = logging.getLogger(__name__)


async def run(ctx: ServiceContext) -> None:
    """Consume events and deliver notifications until cancelled."""
    settings = ctx.settings.notifier
    check_templates(settings)
    channels = build_channels(settings)
    metrics = NotifierMetrics(ctx.registry, channels)
    outbox = Outbox(ctx.db)
    incidents = Incidents(ctx.db)
    renderer = Renderer(settings, ctx.settings.instance)
    targets = Targets(ctx.settings)
    # Names this process's leases on outbox rows; unique even for two processes on one host.
    owner = f"{ctx.settings.instance}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    loops = [
        DeliveryLoop(
            channel,
            outbox,
            metrics,
            owner=owner,
            backoff=Backoff(settings.retry_initial_seconds, settings.retry_max_seconds),
            failing_after=settings.failing_after_attempts,
            poll=settings.poll_seconds,
        )
        for channel in channels.values()
    ]

    def wake() -> None:
        for loop in loops:
            loop.wake()

    maintenance = Maintenance(
        settings,
        outbox=outbox,
        incidents=incidents,
        dead_letters=DeadLetterWatch(ctx.bus, incidents, SERVICES),
        renderer=renderer,
        targets=targets,
        metrics=metrics,
        queued=wake,
    )
    handler = EventHandler(
        ctx.db,
        outbox=outbox,
        incidents=incidents,
        renderer=renderer,
        targets=targets,
        metrics=metrics,
        queued=wake,
    )
    smtp = settings.smtp
    if smtp.host and smtp.username and not (smtp.tls or smtp.starttls):
        log.warning(
            "notifier.smtp logs in without TLS: the password crosses the network in clear; "
            "set smtp.starttls or smtp.tls"
        )
    log.info(
        "notifier: e-mail %s, %d webhook(s)",
        f"by smtp {smtp.host}" if smtp.host else f"to {settings.mail_folder}",
        len(settings.webhooks),
    )
    # A loop that fails ends the group, and with it the service: the process exits and its
    # supervisor restarts it, rather than leaving the notifier half-alive.
    async with asyncio.TaskGroup() as group:
        for loop in loops:
            group.create_task(loop.run(), name=f"notifier-{loop.channel.name}")
        group.create_task(maintenance.run(), name="notifier-maintenance")
        await ctx.bus.subscribe(ctx.name, CONSUMES, handler)
