"""The router: receivers, the flush loop, the completion sweep and route reloading, wired.

:class:`Router` takes its dependencies (settings, state store, bus, metrics registry, event
source) so tests run it on SQLite and the memory bus or on the real servers alike.

Receiving runs in threads of this process (``router.processes: 1``) or in a pool of worker
processes (with ``processes: 1`` too when other services share this process). Either way the
receivers only write files and report to a :class:`Collector`; this process drains it every
``flush_seconds`` into metrics, study updates (one transaction per flush) and ``file-ready``
events of forward routes, and sweeps for quiet studies every ``sweep_seconds``. What a flush
could not write stays pending and is tried again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pacsflow.bus import EventBus
from pacsflow.config import Route, Settings
from pacsflow.dicom.engine import AsyncStoreServer
from pacsflow.errors import BusError, ConfigError, StoreError
from pacsflow.events import FileReady, FileReadyPayload, ReadyFile, Source
from pacsflow.store import Database
from prometheus_client import CollectorRegistry

from pacsflow_router.collector import Collector, Stored
from pacsflow_router.completion import Completer
from pacsflow_router.metrics import RouterMetrics
from pacsflow_router.routes import RouteTable, load_routes_file, routes_from_settings
from pacsflow_router.scp import AssociationSlots, Limits, StoreServer
from pacsflow_router.scp.server import listen_socket
from pacsflow_router.studies import StudyStore, StudyUpdates
from pacsflow_router.workers import ReceiverConfig, WorkerPool, build_server

__all__ = ["Router"]

log = logging.getLogger(__name__)

# Reported studies older than retention_days are deleted this often (seconds).
_PRUNE_EVERY = 3600.0


class Router:
    """One router-scp instance: listening, storing, reporting studies."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database,
        bus: EventBus,
        registry: CollectorRegistry,
        source: Source,
        clock: Callable[[], float] = time.time,
        shares_process: bool = False,
    ) -> None:
        self.settings = settings
        self.config = settings.router
        self.shares_process = shares_process
        self.bus = bus
        self.source = source
        self.clock = clock
        self.metrics = RouterMetrics(registry)
        self.collector = Collector()
        self.store = StudyStore(db)
        self.updates = StudyUpdates()
        self.forwards: list[Stored] = []
        self.completer = Completer(
            self.store,
            bus,
            source,
            self.metrics,
            quiet_seconds=self.config.study_quiet_seconds,
            claim_timeout=self.config.claim_timeout_seconds,
            owner=f"{settings.instance}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
            clock=clock,
        )
        self.table: RouteTable | None = None
        self._listener: socket.socket | None = None
        self._server: StoreServer | AsyncStoreServer | None = None
        self._pool: WorkerPool | None = None
        self._slots: AssociationSlots | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._routes_mtime: float | None = None
        self._reload_requested = asyncio.Event()
        self._sighup = False
        self._pruned_at = 0.0

    # --- life cycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the router listens on."""
        if self._listener is None:
            raise RuntimeError("the router is not started")
        return int(self._listener.getsockname()[1])

    def _receiver_config(self, routes: dict[str, Route]) -> ReceiverConfig:
        config = self.config
        return ReceiverConfig(
            routes=routes,
            allowed_calling_aes=tuple(config.allowed_calling_aes),
            allowed_addresses=tuple(config.allowed_addresses),
            limits=Limits(
                max_pdu=config.max_pdu,
                max_associations=config.max_associations,
                request_timeout=config.request_timeout_seconds,
                idle_timeout=config.idle_timeout_seconds,
                pdu_timeout=config.pdu_timeout_seconds,
                max_instance_bytes=config.max_instance_bytes,
                operations_window=config.operations_window,
            ),
            tls=self.settings.dicom.tls,
            fsync=config.fsync,
            extra_sop_classes=tuple(config.extra_sop_classes),
            flush_seconds=config.flush_seconds,
            logging=self.settings.logging,
            engine=self.settings.dicom.engine or "asyncio",
        )

    async def start(self) -> None:
        """Bind the port and start receiving, flushing, sweeping and watching routes."""
        routes = routes_from_settings(self.config, self.settings.nodes)
        self._remember_mtime()
        receiver = self._receiver_config(routes)
        self._listener = listen_socket(self.config.host, self.config.port)
        processes = self.config.processes or os.cpu_count() or 1
        # Beside other services (pacsflow run) even one receiver is a process of its own:
        # in threads here it would share one GIL with the watcher and the uploader.
        if processes == 1 and not self.shares_process:
            self._slots = AssociationSlots(self.config.max_associations)
            self._server, self.table = build_server(
                receiver, self._listener, self.collector, self._slots
            )
            self._server.start()
        else:
            self.table = RouteTable(
                routes,
                allowed_calling_aes=receiver.allowed_calling_aes,
                allowed_addresses=receiver.allowed_addresses,
            )
            self._pool = await asyncio.to_thread(
                WorkerPool(receiver, self._listener, processes, self.collector).start
            )
            self._slots = self._pool.slots
        self.metrics.routes.set(len(routes))
        log.info(
            "router-scp listening on %s:%d (%d process%s), routes: %s",
            self.config.host, self.port, processes, "" if processes == 1 else "es",
            ", ".join(self.table.titles),
        )  # fmt: skip
        self._install_sighup()
        self._tasks = [
            asyncio.create_task(
                self._every(self.config.flush_seconds, self.flush), name="router-flush"
            ),
            asyncio.create_task(
                self._every(self.config.sweep_seconds, self.sweep), name="router-sweep"
            ),
            asyncio.create_task(self._watch_routes(), name="router-routes"),
        ]

    async def stop(self, grace: float = 5.0) -> None:
        """Stop receiving (open associations get ``grace`` seconds), then flush what is left."""
        self._remove_sighup()
        if self._server is not None:
            await asyncio.to_thread(self._server.stop, grace)
            self._server = None
        if self._pool is not None:
            await asyncio.to_thread(self._pool.stop, grace)
            self._pool = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.flush()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def run(self) -> None:
        """Start, then run until cancelled or a loop fails; stop cleanly on the way out."""
        await self.start()
        try:
            done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a failed loop takes the service down, so it is restarted
            raise RuntimeError("a router loop ended on its own")
        finally:
            # Not shielded: the runtime waits for this task, and the final flush must finish
            # before it closes the store and the bus.
            await self.stop()

    async def _every(self, seconds: float, work: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(seconds)
            result = work()
            if asyncio.iscoroutine(result):
                await result

    # --- flushing ---------------------------------------------------------------------------

    async def flush(self) -> None:
        """Drain the receivers' reports into metrics, the study table and forward events."""
        batch = self.collector.drain()
        self.metrics.apply(batch)
        if self._slots is not None:
            self.metrics.active.set(self._slots.in_use)
        self.updates.add(batch.stored)
        self.forwards.extend(record for record in batch.stored if record.forward)
        if len(self.updates):
            deltas = self.updates.take()
            try:
                await self.store.record(deltas)
            except StoreError as err:
                self.updates.put_back(deltas)
                self.metrics.flush_failures.labels("store").inc()
                log.error("could not record %d study updates (kept, retried): %s", len(deltas), err)
        if self.forwards:
            await self._forward()

    async def _forward(self) -> None:
        groups: dict[tuple[str, tuple[str, ...]], list[Stored]] = {}
        for record in self.forwards:
            groups.setdefault((record.route, record.forward), []).append(record)
        size = self.config.forward_batch_size
        events = []
        for (route, destinations), records in groups.items():
            for start in range(0, len(records), size):
                chunk = records[start : start + size]
                events.append(
                    FileReady(
                        source=self.source,
                        correlation_id=chunk[0].study_instance_uid or None,
                        payload=FileReadyPayload(
                            files=[
                                ReadyFile(
                                    path=r.path,
                                    size=r.size,
                                    sop_instance_uid=r.sop_instance_uid,
                                    series_instance_uid=r.series_instance_uid,
                                    study_instance_uid=r.study_instance_uid,
                                    sop_class_uid=r.sop_class_uid,
                                    transfer_syntax_uid=r.transfer_syntax_uid,
                                )
                                for r in chunk
                            ],
                            destinations=list(destinations),
                            batch_key=f"router-scp:{route}:{uuid.uuid4().hex}",
                        ),
                    )
                )
        try:
            await self.bus.publish(*events)
        except BusError as err:
            self.metrics.flush_failures.labels("bus").inc()
            log.error(
                "could not announce %d forwarded files (kept, retried): %s", len(self.forwards), err
            )
            return
        for record in self.forwards:
            self.metrics.forwarded.labels(record.route).inc()
        self.forwards = []

    async def sweep(self) -> None:
        """One completion sweep; store, bus and file errors are logged and retried next time."""
        try:
            await self.completer.sweep()
            now = self.clock()
            if now - self._pruned_at >= _PRUNE_EVERY:
                self._pruned_at = now
                pruned = await self.store.prune(now - self.config.retention_days * 86400)
                if pruned:
                    log.info(
                        "forgot %d studies reported more than %g days ago",
                        pruned,
                        self.config.retention_days,
                    )
        except StoreError as err:
            self._sweep_failed("store", err)
        except BusError as err:
            self._sweep_failed("bus", err)
        except OSError as err:
            # A storage folder that cannot be read for now (a share, permissions).
            self._sweep_failed("storage", err)
        if self._pool is not None and self._pool.alive() < self._pool.count:
            # A worker died (killed, out of memory): the service must restart, not limp on.
            raise RuntimeError("a router worker process died")

    def _sweep_failed(self, target: str, err: Exception) -> None:
        log.error("completion sweep failed (retried): %s", err)
        self.metrics.sweep_failures.labels(target).inc()

    # --- routes -----------------------------------------------------------------------------

    def _remember_mtime(self) -> None:
        path = self.config.routes_file
        if path is None:
            return
        with contextlib.suppress(OSError):
            self._routes_mtime = Path(path).stat().st_mtime

    def reload_routes(self) -> bool:
        """Load the routes file again; on error keep the routes in force. True if reloaded."""
        path = self.config.routes_file
        if path is None or self.table is None:
            return False
        self._remember_mtime()
        try:
            routes = load_routes_file(path, self.settings.nodes)
        except ConfigError as err:
            self.metrics.route_reloads.labels("error").inc()
            log.error("routes not reloaded, the routes in force stay: %s", err)
            return False
        self.table.replace(routes)
        if self._pool is not None:
            self._pool.send_routes(routes)
        self.metrics.routes.set(len(routes))
        self.metrics.route_reloads.labels("ok").inc()
        log.info("routes reloaded from %s: %s", path, ", ".join(sorted(routes)))
        return True

    def _install_sighup(self) -> None:
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_requested.set)
            self._sighup = True
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread: the file's modification time is still watched

    def _remove_sighup(self) -> None:
        if self._sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False

    async def _watch_routes(self) -> None:
        path = self.config.routes_file
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.routes_poll_seconds):
                    await self._reload_requested.wait()
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self.reload_routes()
                continue
            if path is None:
                continue
            try:
                mtime: float | None = Path(path).stat().st_mtime
            except OSError:
                mtime = None
            if mtime is not None and mtime != self._routes_mtime:
                self.reload_routes()
