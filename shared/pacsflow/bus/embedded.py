"""The embedded event bus: RabbitMQ's delivery contract in the SQLite state file.

This backend owns the single-process deployment (``pacsflow run``). Its messages live in the
same SQLite file as the state store, in tables of its own (``bus_*``, created here), so a
crash loses nothing and no server is needed. The semantics follow the RabbitMQ backend:

* ``declare`` persists the bindings service -> event types (one queue per pair, named like
  the RabbitMQ queue); ``publish`` copies each event into every bound queue in one
  transaction, so events published before a consumer starts are kept;
* a consumer claims up to ``prefetch`` messages at a time (FIFO per service), runs the handler
  and only then deletes the message (ack), gives it back with a growing delay (retry), or moves
  it to ``bus_dead_letters`` with the reason (dead letter), as decided in ``_delivery.py``;
* every claim counts a delivery and names the claiming bus instance (its *owner*). Claims of an
  owner that stopped without giving them back (a crash, a kill) are returned to their queue
  when the next bus opens the file: at once when the owner's process is gone from this host,
  otherwise once its heartbeat is ``owner_stale_after`` seconds old. Delivery is at least once;
* consumers in this process are woken on publish; other processes' writes (the command line
  replaying dead letters) are found by polling every ``poll_interval`` seconds.

The file is opened in WAL mode with a busy timeout, because the state store writes to it
from another connection; writes use ``BEGIN IMMEDIATE`` so they wait for the lock instead of
failing half-way, and ``synchronous=FULL`` so a published event survives a power cut.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
from prometheus_client import CollectorRegistry

from pacsflow.bus._delivery import (
    BusOptions,
    Dispatcher,
    Verdict,
    dead_letter_queue_name,
    drain_handlers,
    queue_name,
)
from pacsflow.bus.base import DeadLetter, Handler
from pacsflow.bus.metrics import BusMetrics
from pacsflow.config import BusSettings
from pacsflow.errors import BusError
from pacsflow.events import Event, encode_event
from pacsflow.store.sqlite import switch_to_wal

__all__ = ["EmbeddedBus"]

_SCHEMA_VERSION = 1
# Seconds a statement waits for another process's write lock on the file.
_BUSY_TIMEOUT = 30.0

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS bus_meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    # Which service consumes which event type; persisted so events are kept before it starts.
    """CREATE TABLE IF NOT EXISTS bus_bindings (
        service TEXT NOT NULL,
        event_type TEXT NOT NULL,
        queue TEXT NOT NULL,
        PRIMARY KEY (service, event_type)
    )""",
    """CREATE TABLE IF NOT EXISTS bus_messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        service TEXT NOT NULL,
        event_type TEXT NOT NULL,
        message_id TEXT,
        body BLOB NOT NULL,
        published_at REAL NOT NULL,
        available_at REAL NOT NULL,
        deliveries INTEGER NOT NULL DEFAULT 0,
        claimed_by TEXT,
        claimed_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS bus_messages_waiting ON bus_messages (queue, claimed_by, seq)",
    "CREATE INDEX IF NOT EXISTS bus_messages_claims ON bus_messages (claimed_by)",
    """CREATE TABLE IF NOT EXISTS bus_dead_letters (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        service TEXT NOT NULL,
        queue TEXT NOT NULL,
        event_type TEXT,
        message_id TEXT,
        body BLOB NOT NULL,
        reason TEXT NOT NULL,
        deliveries INTEGER NOT NULL,
        time REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS bus_dead_letters_service ON bus_dead_letters (service, seq)",
    # One row per open bus; claims name their owner so a dead owner's claims can be returned.
    """CREATE TABLE IF NOT EXISTS bus_owners (
        owner TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started REAL NOT NULL,
        heartbeat REAL NOT NULL
    )""",
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@dataclass(eq=False)
class _Subscription:
    service: str
    event_types: tuple[str, ...]
    queues: tuple[str, ...]
    dispatcher: Dispatcher
    prefetch: int
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    running: set[asyncio.Task[None]] = field(default_factory=set)
    consumer: asyncio.Task[None] | None = None


class EmbeddedBus:
    """The event bus kept in a SQLite file; see the module docstring for its semantics."""

    backend = "embedded"

    def __init__(
        self,
        path: Path | str,
        settings: BusSettings,
        *,
        registry: CollectorRegistry,
        logger: logging.Logger | None = None,
        options: BusOptions | None = None,
    ) -> None:
        self._path = str(path)
        self._settings = settings
        self._options = options or BusOptions.from_settings(settings)
        self._logger = logger or logging.getLogger("pacsflow.bus")
        self._metrics = BusMetrics(registry, self.backend)
        self._db: aiosqlite.Connection | None = None
        # One connection serves every coroutine: the lock keeps transactions from interleaving.
        self._lock = asyncio.Lock()
        self._owner = uuid.uuid4().hex
        self._subscriptions: list[_Subscription] = []
        self._maintenance: asyncio.Task[None] | None = None
        self._closing = False

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the file, create the bus tables, and return claims a dead process left."""
        if self._db is not None:
            return
        try:
            if self._path != ":memory:":
                Path(self._path).parent.mkdir(parents=True, exist_ok=True)
                # Before the connection that stays: another process opening the same new file
                # at once must not make the switch fail ("database is locked").
                await asyncio.to_thread(switch_to_wal, self._path, _BUSY_TIMEOUT)
            db = await aiosqlite.connect(self._path, isolation_level=None, timeout=_BUSY_TIMEOUT)
        except (sqlite3.Error, OSError) as err:
            raise BusError(f"cannot open the bus file {self._path}: {err}") from err
        self._db = db
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT * 1000)}")
            await db.execute("PRAGMA synchronous = FULL")
            async with self._transaction() as tx:
                for statement in _SCHEMA:
                    await tx.execute(statement)
                await tx.execute(
                    "INSERT OR IGNORE INTO bus_meta (key, value) VALUES ('schema_version', ?)",
                    (str(_SCHEMA_VERSION),),
                )
                now = time.time()
                await tx.execute(
                    "INSERT INTO bus_owners (owner, host, pid, started, heartbeat) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (self._owner, socket.gethostname(), os.getpid(), now, now),
                )
            await self._recover_claims()
        except sqlite3.Error as err:
            await db.close()
            self._db = None
            raise BusError(f"cannot prepare the bus tables in {self._path}: {err}") from err
        self._closing = False
        self._maintenance = asyncio.create_task(self._maintain(), name="pacsflow-bus-maintenance")
        self._metrics.set_connected(True)

    async def close(self) -> None:
        """Stop consuming, wait for running handlers (up to close_timeout), close the file."""
        if self._db is None:
            return
        self._closing = True
        consumers = [sub.consumer for sub in self._subscriptions if sub.consumer is not None]
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        await drain_handlers(
            [task for sub in self._subscriptions for task in sub.running],
            self._options.close_timeout,
            self._logger,
        )
        if self._maintenance is not None:
            self._maintenance.cancel()
            await asyncio.gather(self._maintenance, return_exceptions=True)
            self._maintenance = None
        try:
            async with self._transaction() as tx:
                # What is still claimed was cut short: give it back now, not after a timeout.
                await tx.execute(
                    "UPDATE bus_messages SET claimed_by = NULL, claimed_at = NULL "
                    "WHERE claimed_by = ?",
                    (self._owner,),
                )
                await tx.execute("DELETE FROM bus_owners WHERE owner = ?", (self._owner,))
        except sqlite3.Error as err:
            self._logger.warning("closing the bus: could not return claimed messages: %s", err)
        finally:
            db, self._db = self._db, None
            await db.close()
            self._subscriptions.clear()
            self._metrics.set_connected(False)

    async def ready(self) -> bool:
        """True when the file answers and every subscription's consumer is running."""
        if self._db is None or self._closing:
            return False
        if self._maintenance is None or self._maintenance.done():
            return False
        if any(sub.consumer is None or sub.consumer.done() for sub in self._subscriptions):
            return False
        try:
            async with self._lock:
                await self._conn().execute("SELECT 1")
        except sqlite3.Error:
            return False
        return True

    # --- publishing and queues -------------------------------------------------------------

    async def publish(self, *events: Event) -> None:
        """Copy each event into every queue bound to its type, all in one transaction."""
        if not events:
            return
        now = time.time()
        rows = [(str(event.id), encode_event(event), now, now, event.type) for event in events]
        try:
            async with self._transaction() as tx:
                await tx.executemany(
                    "INSERT INTO bus_messages "
                    "(queue, service, event_type, message_id, body, published_at, available_at) "
                    "SELECT queue, service, event_type, ?, ?, ?, ? FROM bus_bindings "
                    "WHERE event_type = ?",
                    rows,
                )
        except sqlite3.Error as err:
            raise BusError(f"could not publish {len(events)} event(s): {err}") from err
        for event in events:
            self._metrics.published.labels(event.source.service, event.type).inc()
        self._wake({event.type for event in events})

    async def declare(self, service: str, event_types: Sequence[str]) -> None:
        """Persist the service's bindings, so its queues keep events from now on."""
        prefix = self._settings.queue_prefix
        try:
            async with self._transaction() as tx:
                await tx.executemany(
                    "INSERT OR IGNORE INTO bus_bindings (service, event_type, queue) "
                    "VALUES (?, ?, ?)",
                    [(service, t, queue_name(prefix, service, t)) for t in event_types],
                )
        except sqlite3.Error as err:
            raise BusError(f"could not declare the queues of {service}: {err}") from err

    async def subscribe(self, service: str, event_types: Sequence[str], handler: Handler) -> None:
        """Declare the service's queues and start handling their messages."""
        if self._db is None:
            raise BusError("the bus is not started")
        types = tuple(dict.fromkeys(event_types))
        await self.declare(service, types)
        prefix = self._settings.queue_prefix
        sub = _Subscription(
            service=service,
            event_types=types,
            queues=tuple(queue_name(prefix, service, t) for t in types),
            dispatcher=Dispatcher(
                service,
                handler,
                delivery_limit=self._settings.delivery_limit,
                options=self._options,
                metrics=self._metrics,
                logger=self._logger,
            ),
            prefetch=self._settings.prefetch,
        )
        sub.consumer = asyncio.create_task(self._consume(sub), name=f"pacsflow-bus-{service}")
        self._subscriptions.append(sub)

    async def queue_depths(self) -> dict[str, int]:
        """Messages waiting (not being handled) per queue, dead-letter queues included."""
        prefix = self._settings.queue_prefix
        bindings, waiting, dead = await self._read(
            "the queue depths",
            ("SELECT service, queue FROM bus_bindings", ()),
            ("SELECT queue, COUNT(*) FROM bus_messages WHERE claimed_by IS NULL GROUP BY queue",
             ()),
            ("SELECT service, COUNT(*) FROM bus_dead_letters GROUP BY service", ()),
        )
        depths: dict[str, int] = {}
        for service, queue in bindings:
            depths[queue] = 0
            depths[dead_letter_queue_name(prefix, service)] = 0
        for queue, count in waiting:
            depths[queue] = count
        for service, count in dead:
            depths[dead_letter_queue_name(prefix, service)] = count
        return depths

    # --- dead letters ----------------------------------------------------------------------

    async def _read(
        self, what: str, *queries: tuple[str, tuple[object, ...]]
    ) -> list[list[Any]]:
        """Rows of each query, read together; a locked or damaged bus file is a BusError."""
        try:
            async with self._lock:
                db = self._conn()
                return [list(await db.execute_fetchall(sql, args)) for sql, args in queries]
        except sqlite3.Error as err:
            raise BusError(f"could not read {what}: {err}") from err

    async def dead_letter_count(self, service: str) -> int:
        (rows,) = await self._read(
            f"the dead letters of {service}",
            ("SELECT COUNT(*) FROM bus_dead_letters WHERE service = ?", (service,)),
        )
        return int(rows[0][0])

    async def dead_letters(self, service: str) -> list[DeadLetter]:
        """The service's dead letters, oldest first."""
        (rows,) = await self._read(
            f"the dead letters of {service}",
            ("SELECT id, service, queue, event_type, body, reason, deliveries, time "
             "FROM bus_dead_letters WHERE service = ? ORDER BY seq", (service,)),
        )
        return [
            DeadLetter(
                id=row[0],
                service=row[1],
                queue=row[2],
                event_type=row[3],
                body=bytes(row[4]),
                reason=row[5],
                deliveries=row[6],
                time=datetime.fromtimestamp(row[7], UTC),
            )
            for row in rows
        ]

    async def replay_dead_letters(self, service: str, ids: Sequence[str] | None = None) -> int:
        """Put dead letters back into the queue they came from, with a fresh delivery count."""
        where, args = self._dead_letter_filter(service, ids)
        now = time.time()
        try:
            async with self._transaction() as tx:
                cursor = await tx.execute(
                    "INSERT INTO bus_messages "
                    "(queue, service, event_type, message_id, body, published_at, available_at) "
                    "SELECT queue, service, COALESCE(event_type, ''), message_id, body, ?, ? "
                    f"FROM bus_dead_letters WHERE {where} ORDER BY seq",
                    (now, now, *args),
                )
                count = cursor.rowcount
                await tx.execute(f"DELETE FROM bus_dead_letters WHERE {where}", args)
        except sqlite3.Error as err:
            raise BusError(f"could not replay the dead letters of {service}: {err}") from err
        if count:
            self._logger.info("replayed %d dead letter(s) of %s", count, service)
            self._wake(None)
        return count

    async def purge_dead_letters(self, service: str, ids: Sequence[str] | None = None) -> int:
        """Delete dead letters; returns how many."""
        where, args = self._dead_letter_filter(service, ids)
        try:
            async with self._transaction() as tx:
                cursor = await tx.execute(f"DELETE FROM bus_dead_letters WHERE {where}", args)
                count = cursor.rowcount
        except sqlite3.Error as err:
            raise BusError(f"could not purge the dead letters of {service}: {err}") from err
        if count:
            self._logger.info("purged %d dead letter(s) of %s", count, service)
        return count

    @staticmethod
    def _dead_letter_filter(
        service: str, ids: Sequence[str] | None
    ) -> tuple[str, tuple[Any, ...]]:
        if ids is None:
            return "service = ?", (service,)
        marks = ", ".join("?" for _ in ids) or "NULL"
        return f"service = ? AND id IN ({marks})", (service, *ids)

    # --- consuming -------------------------------------------------------------------------

    async def _consume(self, sub: _Subscription) -> None:
        """Claim messages while there are free slots; sleep until woken or the next poll."""
        while True:
            sub.wakeup.clear()
            free = sub.prefetch - len(sub.running)
            if free <= 0:
                await sub.wakeup.wait()  # a handler finishing sets it
                continue
            try:
                claimed, next_at = await self._claim(sub, free)
            except sqlite3.Error as err:
                self._logger.warning(
                    "bus consumer of %s could not read its queues: %s", sub.service, err
                )
                await asyncio.sleep(self._options.poll_interval)
                continue
            for row in claimed:
                task = asyncio.create_task(self._deliver(sub, row))
                sub.running.add(task)
                task.add_done_callback(functools.partial(self._on_delivered, sub))
            if len(claimed) == free:
                continue
            timeout = self._options.poll_interval
            if next_at is not None:
                timeout = min(timeout, max(next_at - time.time(), 0.001))
            with suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await sub.wakeup.wait()

    def _on_delivered(self, sub: _Subscription, task: asyncio.Task[None]) -> None:
        sub.running.discard(task)
        sub.wakeup.set()
        if not task.cancelled() and task.exception() is not None:
            self._logger.error(
                "bus delivery for %s failed unexpectedly", sub.service, exc_info=task.exception()
            )

    async def _claim(
        self, sub: _Subscription, limit: int
    ) -> tuple[list[tuple[Any, ...]], float | None]:
        marks = ", ".join("?" for _ in sub.queues)
        now = time.time()
        async with self._lock:
            db = self._conn()
            # One statement, so two processes can never claim the same message.
            rows = list(await db.execute_fetchall(
                "UPDATE bus_messages SET claimed_by = ?, claimed_at = ?, "
                "deliveries = deliveries + 1 WHERE seq IN ("
                f"SELECT seq FROM bus_messages WHERE queue IN ({marks}) "
                "AND claimed_by IS NULL AND available_at <= ? ORDER BY seq LIMIT ?) "
                "RETURNING seq, queue, event_type, body, deliveries",
                (self._owner, now, *sub.queues, now, limit),
            ))
            next_at = None
            if len(rows) < limit:
                later = list(await db.execute_fetchall(
                    f"SELECT MIN(available_at) FROM bus_messages WHERE queue IN ({marks}) "
                    "AND claimed_by IS NULL",
                    sub.queues,
                ))
                next_at = later[0][0] if later else None
        return sorted((tuple(row) for row in rows), key=lambda row: row[0]), next_at

    async def _deliver(self, sub: _Subscription, row: tuple[Any, ...]) -> None:
        seq, queue, event_type, body, deliveries = row
        verdict = await sub.dispatcher.handle(
            bytes(body), queue=queue, event_type=event_type, deliveries=deliveries
        )
        # Settling is retried: a claim left behind would hold the message until a restart.
        delay = 0.05
        while True:
            try:
                await self._settle(sub, seq, queue, event_type, deliveries, verdict)
                return
            except sqlite3.Error as err:
                self._logger.warning(
                    "could not settle a message of %s (%s), trying again: %s",
                    queue, verdict.action, err,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _settle(
        self,
        sub: _Subscription,
        seq: int,
        queue: str,
        event_type: str,
        deliveries: int,
        verdict: Verdict,
    ) -> None:
        if verdict.action == "ack":
            async with self._lock:
                await self._conn().execute(
                    "DELETE FROM bus_messages WHERE seq = ? AND claimed_by = ?", (seq, self._owner)
                )
        elif verdict.action == "retry":
            async with self._lock:
                await self._conn().execute(
                    "UPDATE bus_messages SET claimed_by = NULL, claimed_at = NULL, "
                    "available_at = ? WHERE seq = ? AND claimed_by = ?",
                    (time.time() + verdict.delay, seq, self._owner),
                )
        else:
            async with self._transaction() as tx:
                cursor = await tx.execute(
                    "DELETE FROM bus_messages WHERE seq = ? AND claimed_by = ? "
                    "RETURNING message_id, body",
                    (seq, self._owner),
                )
                removed = list(await cursor.fetchall())
                await cursor.close()
                if removed:
                    await tx.execute(
                        "INSERT INTO bus_dead_letters (id, service, queue, event_type, "
                        "message_id, body, reason, deliveries, time) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            uuid.uuid4().hex,
                            sub.service,
                            queue,
                            event_type,
                            removed[0][0],
                            removed[0][1],
                            verdict.reason,
                            deliveries,
                            time.time(),
                        ),
                    )

    # --- claims of dead owners -------------------------------------------------------------

    async def _maintain(self) -> None:
        """Heartbeat, and return the claims of bus instances that died."""
        while True:
            await asyncio.sleep(self._options.heartbeat_interval)
            try:
                await self._heartbeat()
                await self._recover_claims()
            except sqlite3.Error as err:
                self._logger.warning("bus heartbeat failed: %s", err)
            # A poll for messages other processes wrote, even if no wake-up came.
            self._wake(None)

    async def _heartbeat(self) -> None:
        now = time.time()
        async with self._transaction() as tx:
            cursor = await tx.execute(
                "UPDATE bus_owners SET heartbeat = ? WHERE owner = ?", (now, self._owner)
            )
            if cursor.rowcount == 0:
                # Another process took us for dead (a long pause); our claims may be gone too.
                self._logger.warning("this bus instance was taken for dead; registering again")
                await tx.execute(
                    "INSERT INTO bus_owners (owner, host, pid, started, heartbeat) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (self._owner, socket.gethostname(), os.getpid(), now, now),
                )

    async def _recover_claims(self) -> None:
        now = time.time()
        host = socket.gethostname()
        async with self._transaction() as tx:
            owners = list(
                await tx.execute_fetchall("SELECT owner, host, pid, heartbeat FROM bus_owners")
            )
            dead = [
                owner
                for owner, owner_host, pid, heartbeat in owners
                if owner != self._owner
                and (
                    heartbeat < now - self._options.owner_stale_after
                    or (owner_host == host and not _pid_alive(pid))
                )
            ]
            if dead:
                await tx.executemany(
                    "DELETE FROM bus_owners WHERE owner = ?", [(owner,) for owner in dead]
                )
            cursor = await tx.execute(
                "UPDATE bus_messages SET claimed_by = NULL, claimed_at = NULL "
                "WHERE claimed_by IS NOT NULL "
                "AND claimed_by NOT IN (SELECT owner FROM bus_owners)"
            )
            released = cursor.rowcount
        if released:
            self._logger.warning(
                "returned %d message(s) claimed by a bus instance that stopped without "
                "settling them; they will be delivered again",
                released,
            )
            self._wake(None)

    # --- helpers ---------------------------------------------------------------------------

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise BusError("the bus is not started")
        return self._db

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            db = self._conn()
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.commit()
            except BaseException:
                # A step whose task was cancelled (a service stopping) still runs in the
                # connection's thread; the rollback queued behind it undoes what it began,
                # so a BEGIN that ends there never leaves the file's write lock held.
                await db.rollback()
                raise

    def _wake(self, event_types: Iterable[str] | None) -> None:
        wanted = None if event_types is None else set(event_types)
        for sub in self._subscriptions:
            if wanted is None or wanted.intersection(sub.event_types):
                sub.wakeup.set()
