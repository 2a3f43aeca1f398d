"""Running services: build the shared parts once, start each service, stop cleanly.

A service is a package with ``async def run(ctx: ServiceContext) -> None`` that runs until it
is cancelled. :func:`run_services` opens the state store (and applies migrations), the event
bus and the health endpoint, runs the chosen services side by side in one process, and on
SIGTERM or SIGINT cancels them and closes everything in reverse order.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, Info

import pacsflow
from pacsflow.bus import EventBus, create_bus
from pacsflow.config import SERVICES, Settings
from pacsflow.errors import PacsflowError
from pacsflow.events import Source
from pacsflow.heartbeat import Heartbeat
from pacsflow.http import HealthServer
from pacsflow.logs import log_context
from pacsflow.store import Database, open_database
from pacsflow.store.migrate import upgrade
from pacsflow.topology import declare_queues

__all__ = ["ServiceContext", "run_services", "service_entrypoint", "SERVICE_MODULES"]

log = logging.getLogger(__name__)

#: service name (as on the command line) -> module with its ``run`` coroutine
SERVICE_MODULES: dict[str, str] = {
    "watcher": "pacsflow_watcher.service",
    "uploader": "pacsflow_uploader.service",
    "harvester": "pacsflow_harvester.service",
    "sync": "pacsflow_sync.service",
    "router-scp": "pacsflow_router.service",
    "notifier": "pacsflow_notifier.service",
}


@dataclass
class ServiceContext:
    """What a service gets to work with; tests build one with their own parts."""

    name: str
    settings: Settings
    bus: EventBus
    db: Database
    registry: CollectorRegistry
    health: HealthServer
    #: the other services running in this process (``pacsflow run``)
    companions: tuple[str, ...] = ()

    @property
    def source(self) -> Source:
        """The ``source`` of the events this service emits."""
        return Source(service=self.name, instance=self.settings.instance)


ServiceMain = Callable[[ServiceContext], Awaitable[None]]


def service_entrypoint(name: str) -> ServiceMain:
    """The ``run`` coroutine of a service by name."""
    if name not in SERVICE_MODULES:
        raise ValueError(f"unknown service {name!r}; known: {', '.join(SERVICES)}")
    module = importlib.import_module(SERVICE_MODULES[name])
    main: ServiceMain = module.run
    return main


async def _run_one(ctx: ServiceContext, main: ServiceMain, up: Gauge) -> None:
    with log_context(service=ctx.name):
        log.info("service %s starting", ctx.name)
        up.labels(service=ctx.name).set(1)
        try:
            await main(ctx)
        finally:
            up.labels(service=ctx.name).set(0)
            log.info("service %s stopped", ctx.name)


async def run_services(
    settings: Settings,
    names: Sequence[str],
    *,
    stop: asyncio.Event | None = None,
    registry: CollectorRegistry | None = None,
    started: Callable[[HealthServer], None] | None = None,
) -> int:
    """Run the named services until ``stop`` is set or a signal arrives; the exit code."""
    mains = {name: service_entrypoint(name) for name in names}
    registry = registry or CollectorRegistry()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError):
            pass  # not the main thread (tests): the caller sets ``stop``
    Info("pacsflow_build", "pacsflow version", registry=registry).info(
        {"version": pacsflow.__version__}
    )
    up = Gauge("pacsflow_service_up", "1 while a service runs", ["service"], registry=registry)

    async with AsyncExitStack() as stack:
        db = await open_database(settings.state)
        stack.push_async_callback(db.close)
        applied = await upgrade(db)
        if applied:
            log.info("state store migrated: %s", ", ".join(map(str, applied)))

        bus = create_bus(settings, registry)
        await bus.start()
        stack.push_async_callback(bus.close)
        await declare_queues(bus, settings.bus.declare_services)

        health = HealthServer(registry, settings.http.host, settings.http.port)
        health.add_check("bus", bus.ready)
        health.add_check("state", db.ping)
        await health.start()
        stack.push_async_callback(health.close)
        if started is not None:
            started(health)

        tasks = {
            asyncio.create_task(
                _run_one(
                    ServiceContext(name, settings, bus, db, registry, health,
                                   companions=tuple(other for other in mains if other != name)),
                    main,
                    up,
                ),
                name=name,
            ): name
            for name, main in mains.items()
        }
        # Rows in the state store that `pacsflow status` reads, wherever this process runs.
        heartbeat = Heartbeat(db, names, instance=settings.instance,
                              http_port=health.bound_port, readiness=health.readiness)
        beats = asyncio.create_task(
            heartbeat.run(lambda: {name: not task.done() for task, name in tasks.items()}),
            name="heartbeat",
        )
        stopper = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait({stopper, *tasks}, return_when=asyncio.FIRST_COMPLETED)
        exit_code = 0
        stop_reasons = dict.fromkeys(names, "asked to stop")
        for task in done:
            if task is stopper:
                continue
            stop_reasons[tasks[task]] = (
                f"failed: {task.exception()}" if not task.cancelled() and task.exception()
                else "ended on its own"
            )
            # A service that returns or crashes on its own takes the process down, so a
            # supervisor (compose, Kubernetes) restarts it rather than leaving it half-alive.
            if task.cancelled():
                exit_code = 1
            elif (err := task.exception()) is not None:
                log.error("service %s failed: %s", tasks[task], err, exc_info=err)
                exit_code = 1
            else:
                log.error("service %s returned unexpectedly", tasks[task])
                exit_code = 1
        stopper.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        beats.cancel()
        await asyncio.gather(beats, return_exceptions=True)
        try:
            await heartbeat.stopped(stop_reasons)
        except PacsflowError as err:
            log.warning("could not record the stop in the state store: %s", err)
        log.info("stopped")
    return exit_code
