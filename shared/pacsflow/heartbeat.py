"""Service heartbeats in the state store: how ``pacsflow status`` knows what runs.

Every process that runs services (``pacsflow run``, or one service per container) writes one
row per service to ``service_heartbeats`` every :data:`HEARTBEAT_SECONDS`: its instance, host,
process id, health port, the results of its readiness checks, and the time. A clean stop
writes ``stopped_at`` and why. The state store is the one place every deployment shares (one
SQLite file, or PostgreSQL reached by every container and pod), so the command line sees every
process wherever it runs, without reaching their health ports.

A service is *running* while its newest beat is younger than :data:`STALE_AFTER_SECONDS`;
*stopped* once it wrote ``stopped_at``, or when its process is gone from this host (a kill);
*not responding* when its beats stopped without either (a crash or a hang elsewhere).

The table is created here, idempotently, like the embedded bus's tables: it holds no data
worth migrating, and a store that never ran a service simply has none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pacsflow.errors import StoreError
from pacsflow.store.base import Database

__all__ = [
    "HEARTBEAT_SECONDS",
    "STALE_AFTER_SECONDS",
    "Heartbeat",
    "ServiceBeat",
    "read_heartbeats",
]

log = logging.getLogger(__name__)

#: how often a running process writes its services' rows
HEARTBEAT_SECONDS = 10.0
#: a row not written for this long no longer counts as running
STALE_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS
# Rows of instances silent this long are dropped (replaced pods, renamed hosts); of those that
# stopped cleanly, sooner: a rolling update leaves one behind per replaced process.
_FORGET_AFTER_SECONDS = 7 * 86400.0
_FORGET_STOPPED_AFTER_SECONDS = 86400.0

_CREATE = """
CREATE TABLE IF NOT EXISTS service_heartbeats (
    service TEXT NOT NULL,
    instance TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    http_port INTEGER,
    started_at DOUBLE PRECISION NOT NULL,
    beat_at DOUBLE PRECISION NOT NULL,
    ready TEXT,
    stopped_at DOUBLE PRECISION,
    stop_reason TEXT,
    PRIMARY KEY (service, instance)
)
"""

ServiceState = Literal["running", "not ready", "stopped", "not responding"]


async def _ensure_table(db: Database) -> None:
    try:
        await db.execute(_CREATE)
    except StoreError:
        # Two PostgreSQL processes creating it at once: one loses on the catalogue's unique
        # index; the table is there either way.
        await db.execute(_CREATE)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@dataclass(frozen=True, slots=True)
class ServiceBeat:
    """The newest heartbeat row of one service in one instance, and what it means now."""

    service: str
    instance: str
    host: str
    pid: int
    http_port: int | None
    started_at: float
    beat_at: float
    ready: dict[str, bool]
    stopped_at: float | None
    stop_reason: str | None
    state: ServiceState

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {
            "service": self.service, "instance": self.instance, "host": self.host,
            "pid": self.pid, "http_port": self.http_port, "state": self.state,
            "started_at": self.started_at, "beat_at": self.beat_at, "ready": self.ready,
            "stopped_at": self.stopped_at, "stop_reason": self.stop_reason,
        }  # fmt: skip


def _state(row: Mapping[str, Any], ready: dict[str, bool], now: float) -> ServiceState:
    if row["stopped_at"] is not None:
        return "stopped"
    if row["host"] == socket.gethostname() and not _pid_alive(int(row["pid"])):
        return "stopped"
    if row["beat_at"] < now - STALE_AFTER_SECONDS:
        return "not responding"
    return "running" if all(ready.values()) else "not ready"


async def read_heartbeats(
    db: Database, *, clock: Callable[[], float] = time.time
) -> list[ServiceBeat]:
    """Every service's rows, by service and instance; empty when no service ever ran."""
    try:
        rows = await db.fetch(
            "SELECT service, instance, host, pid, http_port, started_at, beat_at, ready,"
            " stopped_at, stop_reason FROM service_heartbeats ORDER BY service, instance"
        )
    except StoreError:
        if await _table_missing(db):
            return []
        raise
    now = clock()
    beats = []
    for row in rows:
        try:
            ready = {str(k): bool(v) for k, v in json.loads(row["ready"] or "{}").items()}
        except (ValueError, AttributeError):
            ready = {}
        beats.append(
            ServiceBeat(
                service=row["service"], instance=row["instance"], host=row["host"],
                pid=int(row["pid"]), http_port=row["http_port"],
                started_at=float(row["started_at"]), beat_at=float(row["beat_at"]),
                ready=ready, stopped_at=row["stopped_at"], stop_reason=row["stop_reason"],
                state=_state(row, ready, now),
            )
        )  # fmt: skip
    return beats


async def _table_missing(db: Database) -> bool:
    if db.dialect == "sqlite":
        found = await db.fetchval(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = $1",
            "service_heartbeats",
        )
    else:
        found = await db.fetchval("SELECT count(*) FROM pg_tables WHERE tablename = $1",
                                  "service_heartbeats")
    return not found


class Heartbeat:
    """Writes the heartbeat rows of the services one process runs."""

    def __init__(
        self,
        db: Database,
        services: Iterable[str],
        *,
        instance: str,
        http_port: int | None,
        readiness: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.time,
        interval: float = HEARTBEAT_SECONDS,
    ) -> None:
        self._db = db
        self.services = list(services)
        self._instance = instance
        self._http_port = http_port
        self._readiness = readiness
        self._clock = clock
        self._interval = interval
        self._started_at = clock()
        self._host = socket.gethostname()

    async def beat(self, running: Mapping[str, bool] | None = None) -> None:
        """Write one row per service still running (all when ``running`` is None)."""
        ready: dict[str, bool] = {}
        if self._readiness is not None:
            ready = dict(await self._readiness())
        now = self._clock()
        names = [s for s in self.services if running is None or running.get(s, False)]
        await self._db.executemany(
            "INSERT INTO service_heartbeats (service, instance, host, pid, http_port,"
            " started_at, beat_at, ready, stopped_at, stop_reason)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL)"
            " ON CONFLICT (service, instance) DO UPDATE SET host = excluded.host,"
            " pid = excluded.pid, http_port = excluded.http_port,"
            " started_at = excluded.started_at, beat_at = excluded.beat_at,"
            " ready = excluded.ready, stopped_at = NULL, stop_reason = NULL",
            [
                (name, self._instance, self._host, os.getpid(), self._http_port,
                 self._started_at, now, json.dumps(ready))
                for name in names
            ],
        )  # fmt: skip

    async def stopped(self, reasons: Mapping[str, str]) -> None:
        """Record that these services (name -> why) stopped in this process."""
        now = self._clock()
        await self._db.executemany(
            "UPDATE service_heartbeats SET stopped_at = $3, stop_reason = $4"
            " WHERE service = $1 AND instance = $2 AND pid = $5",
            [(name, self._instance, now, why, os.getpid()) for name, why in reasons.items()],
        )

    async def prepare(self) -> None:
        """Create the table where needed; drop rows of instances long gone."""
        await _ensure_table(self._db)
        now = self._clock()
        await self._db.execute(
            "DELETE FROM service_heartbeats WHERE beat_at < $1 OR stopped_at < $2",
            now - _FORGET_AFTER_SECONDS, now - _FORGET_STOPPED_AFTER_SECONDS,
        )

    async def run(self, running: Callable[[], Mapping[str, bool]]) -> None:
        """Beat every interval until cancelled; ``running`` says which services still run."""
        prepared = False
        while True:
            try:
                if not prepared:
                    await self.prepare()
                    prepared = True
                await self.beat(running())
            except StoreError as err:
                log.warning("could not write the heartbeat: %s", err)
            await asyncio.sleep(self._interval)
