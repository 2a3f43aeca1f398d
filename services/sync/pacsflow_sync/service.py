"""The sync service: keeps a local PACS up to date with a remote one.

Wiring only. Every ``sync.interval_seconds`` a :class:`~pacsflow_sync.cycle.Cycle` compares
the two PACS and requests the missing series; the :class:`~pacsflow_sync.mover.MoverPool`
moves them. The event handler takes ``series-missing`` (records the request if it is new,
wakes the movers) and ``moved`` (wakes cycles waiting for their moves); both ignore events of
other requesters (the harvester's). Without ``sync.remote`` and ``sync.local`` the service only
keeps its queues.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from pacsflow.bus import EventBus
from pacsflow.config import Settings
from pacsflow.dicom import NetworkOptions
from pacsflow.errors import ConfigError
from pacsflow.events import Event, Moved, SeriesMissing, Source
from pacsflow.runtime import ServiceContext
from pacsflow.store import Database

from pacsflow_sync.cycle import Cycle
from pacsflow_sync.metrics import SyncMetrics
from pacsflow_sync.mover import MoverPool
from pacsflow_sync.pacs import Pacs
from pacsflow_sync.runs import Runs
from pacsflow_sync.transfers import SeriesRequest, Transfers

__all__ = ["CONSUMES", "EventHandler", "SyncParts", "build", "configured", "run"]

CONSUMES: tuple[str, ...] = ("series-missing", "moved")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncParts:
    """The pieces of one sync process."""

    cycle: Cycle
    movers: MoverPool
    transfers: Transfers
    metrics: SyncMetrics


def configured(settings: Settings) -> bool:
    """True when the sync section names both PACS."""
    return settings.sync.remote is not None and settings.sync.local is not None


def build(
    settings: Settings,
    db: Database,
    bus: EventBus,
    registry: CollectorRegistry,
    source: Source,
    *,
    clock: Callable[[], float] = time.time,
) -> SyncParts:
    """Resolve the nodes and build the cycle, the movers and their store."""
    sync = settings.sync
    if sync.remote is None or sync.local is None:
        raise ConfigError("sync.remote and sync.local must both name a node (or AET@HOST:PORT)")
    options = NetworkOptions.from_settings(settings.dicom)
    remote = Pacs(settings.node(sync.remote), options, "remote")
    local = Pacs(settings.node(sync.local), options, "local")
    destination_ae = sync.destination_ae or local.node.ae_title
    transfers = Transfers(db)
    metrics = SyncMetrics(registry)
    # Names this process's claims; unique even for two processes on one host.
    owner = f"{settings.instance}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    movers = MoverPool(
        transfers,
        bus,
        remotes={remote.node.ae_title: remote},
        locals_={destination_ae: local},
        source=source,
        metrics=metrics,
        owner=owner,
        workers=sync.movers,
        retry_initial=sync.retry_initial_seconds,
        retry_max=sync.retry_max_seconds,
        claim_timeout=sync.claim_timeout_seconds,
        poll=sync.poll_seconds,
        clock=clock,
    )
    cycle = Cycle(
        sync,
        remote=remote,
        local=local,
        destination_ae=destination_ae,
        transfers=transfers,
        runs=Runs(db),
        bus=bus,
        movers=movers,
        metrics=metrics,
        source=source,
        clock=clock,
    )
    return SyncParts(cycle, movers, transfers, metrics)


class EventHandler:
    """The sync service's consumer of ``series-missing`` and ``moved``."""

    def __init__(
        self, transfers: Transfers, movers: MoverPool, clock: Callable[[], float] = time.time
    ) -> None:
        self._transfers = transfers
        self._movers = movers
        self._clock = clock

    async def __call__(self, event: Event) -> None:
        """Handle one event; returning acknowledges it (after the row is committed)."""
        if isinstance(event, SeriesMissing):
            payload = event.payload
            if payload.requested_by != "sync":
                return
            # Idempotent: a series with a row (requested, moving, moved or failed) keeps it.
            await self._transfers.ensure_requested(
                SeriesRequest(
                    payload.source_ae,
                    payload.destination_ae,
                    payload.study_instance_uid,
                    payload.series_instance_uid,
                    payload.expected_images,
                    payload.reason,
                ),
                now=self._clock(),
            )
            self._movers.wake()
        elif isinstance(event, Moved) and event.payload.requested_by == "sync":
            async with self._movers.finished:
                self._movers.finished.notify_all()


async def _schedule(parts: SyncParts, settings: Settings) -> None:
    interval = settings.sync.interval_seconds
    while True:
        started = time.monotonic()
        report = await parts.cycle.run()
        if settings.sync.print_statistics:
            print(report.table(), flush=True)
        await asyncio.sleep(max(interval - (time.monotonic() - started), 0.0))


async def run(ctx: ServiceContext) -> None:
    """Run cycles and movers until cancelled."""
    if not configured(ctx.settings):
        SyncMetrics(ctx.registry)  # exported (at zero) so dashboards and alerts find them
        await ctx.bus.declare(ctx.name, CONSUMES)
        log.warning(
            "sync is not configured (sync.remote and sync.local): its events are kept in its "
            "queues"
        )
        await asyncio.Event().wait()
    parts = build(ctx.settings, ctx.db, ctx.bus, ctx.registry, ctx.source)
    await ctx.bus.subscribe(ctx.name, CONSUMES, EventHandler(parts.transfers, parts.movers))
    async with asyncio.TaskGroup() as group:
        group.create_task(parts.movers.run(), name="sync-movers")
        group.create_task(_schedule(parts, ctx.settings), name="sync-cycles")
