"""Several receiving processes: a pre-fork pool sharing one listening socket.

One Python process receives at most about one core's worth of C-STOREs (the GIL). Each
process runs its own SCP: with the asyncio engine, one event loop per process. With
``router.processes`` above 1 the service process binds the port and starts that many worker
processes (spawned, not forked: the service process runs threads) that accept on the same
socket; the kernel hands each connection to one of them. The association limit is shared
through a counter in shared memory.

Workers only receive: each reports what it stored, as :class:`~.collector.Batch` es every
``flush_seconds``, through a pipe to the service process, which owns the state store, the bus
and the metrics. Route reloads go the other way, down the same pipe.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import socket
import threading
from dataclasses import dataclass
from typing import Any

from pacsflow.config import LoggingSettings, Route, TlsSettings
from pacsflow.dicom.files import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacsflow.dicom.transport import server_ssl_context

from pacsflow_router.collector import Batch, Collector
from pacsflow_router.receiver import TRANSFER_SYNTAXES, RouterHandler, SopClassFilter
from pacsflow_router.routes import RouteTable
from pacsflow.dicom.engine import AsyncStoreServer

from pacsflow_router.scp import AssociationSlots, Limits, StoreServer

__all__ = ["ReceiverConfig", "WorkerPool", "build_server"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceiverConfig:
    """Everything a receiving process needs (picklable)."""

    routes: dict[str, Route]
    allowed_calling_aes: tuple[str, ...]
    allowed_addresses: tuple[str, ...]
    limits: Limits
    tls: TlsSettings
    fsync: bool
    extra_sop_classes: tuple[str, ...]
    flush_seconds: float
    logging: LoggingSettings
    #: dicom.engine: asyncio (one event loop per process) or lean (a thread per association)
    engine: str = "asyncio"


def build_server(
    config: ReceiverConfig,
    listener: socket.socket,
    collector: Collector,
    slots: AssociationSlots,
) -> tuple[StoreServer | AsyncStoreServer, RouteTable]:
    """The SCP server for one process (of ``config.engine``), and the route table it uses."""
    table = RouteTable(
        config.routes,
        allowed_calling_aes=config.allowed_calling_aes,
        allowed_addresses=config.allowed_addresses,
    )
    server_class = AsyncStoreServer if config.engine == "asyncio" else StoreServer
    server = server_class(
        RouterHandler(table, collector, fsync=config.fsync),
        listener,
        limits=config.limits,
        slots=slots,
        accepts_sop_class=SopClassFilter(config.extra_sop_classes),
        transfer_syntaxes=TRANSFER_SYNTAXES,
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version=IMPLEMENTATION_VERSION_NAME,
        ssl_context=server_ssl_context(config.tls) if config.tls.enabled else None,
    )
    return server, table


def _worker_main(
    index: int,
    config: ReceiverConfig,
    listener: socket.socket,
    conn: multiprocessing.connection.Connection,
    shared: Any,
) -> None:
    """A worker process: receive until told to stop (or the service process is gone)."""
    from pacsflow.logs import configure_logging

    configure_logging(config.logging)
    collector = Collector()
    server, table = build_server(
        config, listener, collector, AssociationSlots(config.limits.max_associations, shared)
    )
    send_lock = threading.Lock()
    stopping = threading.Event()

    def ship() -> None:
        batch = collector.drain()
        if batch:
            with send_lock:
                conn.send(("batch", batch))

    def shipper() -> None:
        while not stopping.wait(config.flush_seconds):
            try:
                ship()
            except (OSError, EOFError):
                return  # the service process is gone; the main loop sees it too

    server.start()
    thread = threading.Thread(target=shipper, name="router-worker-ship", daemon=True)
    thread.start()
    grace = 5.0
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                log.error("router worker %d: the service process is gone; stopping", index)
                break
            kind = message[0]
            if kind == "routes":
                table.replace(message[1])
            elif kind == "stop":
                grace = float(message[1])
                break
    finally:
        server.stop(grace)
        stopping.set()
        thread.join()
        try:
            ship()
            with send_lock:
                conn.send(("stopped", index))
        except (OSError, EOFError):
            pass


class WorkerPool:
    """The worker processes of one router, and the threads that read their reports."""

    def __init__(
        self,
        config: ReceiverConfig,
        listener: socket.socket,
        processes: int,
        collector: Collector,
    ) -> None:
        self.config = config
        self.listener = listener
        self.count = processes
        self.collector = collector
        self._context = multiprocessing.get_context("spawn")
        self.shared = self._context.Value("i", 0)
        self.slots = AssociationSlots(config.limits.max_associations, self.shared)
        self._workers: list[
            tuple[Any, multiprocessing.connection.Connection, threading.Thread]
        ] = []
        # Route reloads (event loop thread) and stop (a worker thread) must not interleave.
        self._send_lock = threading.Lock()

    def start(self) -> WorkerPool:
        for index in range(self.count):
            parent, child = self._context.Pipe(duplex=True)
            process = self._context.Process(
                target=_worker_main,
                args=(index, self.config, self.listener, child, self.shared),
                name=f"pacsflow-router-{index}",
                daemon=True,
            )
            process.start()
            child.close()
            reader = threading.Thread(
                target=self._read, args=(index, parent), name=f"router-worker-{index}", daemon=True
            )
            reader.start()
            self._workers.append((process, parent, reader))
        return self

    def _read(self, index: int, conn: multiprocessing.connection.Connection) -> None:
        while True:
            try:
                kind, value = conn.recv()
            except (EOFError, OSError):
                return
            if kind == "batch" and isinstance(value, Batch):
                self.collector.merge(value)
            elif kind == "stopped":
                return  # its last batch came before this

    def alive(self) -> int:
        return sum(1 for process, _conn, _reader in self._workers if process.is_alive())

    def _send(self, message: tuple[str, Any]) -> None:
        with self._send_lock:
            for _process, conn, _reader in self._workers:
                try:
                    conn.send(message)
                except (OSError, EOFError):
                    pass  # a dead worker; alive() tells

    def send_routes(self, routes: dict[str, Route]) -> None:
        """Put new routes in force in every worker."""
        self._send(("routes", routes))

    def stop(self, grace: float = 5.0) -> None:
        """Stop every worker (they finish open associations for ``grace`` seconds)."""
        self._send(("stop", grace))
        for process, conn, reader in self._workers:
            # The last batch arrives before "stopped"; the reader ends after it.
            reader.join(timeout=grace + 10)
            process.join(timeout=5)
            if process.is_alive():
                log.error("router worker %s did not stop; terminating it", process.pid)
                process.terminate()
                process.join(timeout=5)
            conn.close()
        self._workers = []
