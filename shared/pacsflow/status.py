"""What ``pacsflow status`` reports: one picture of the whole installation.

Everything comes from the two places every deployment shares, so the answer is the same from
any machine or container: the state store (service heartbeats, the file ledger, router
studies, harvest and sync progress) and the event bus (queue depths and dead letters).
:func:`collect_status` returns plain data (the ``--json`` output); :func:`problems` names
what is not all good, one line each.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

from pacsflow.bus._delivery import dead_letter_queue_name
from pacsflow.bus.base import EventBus
from pacsflow.config import SERVICES, Settings
from pacsflow.errors import BusError, StoreError
from pacsflow.heartbeat import read_heartbeats
from pacsflow.store.base import Database
from pacsflow.store.ledger import Ledger

__all__ = ["collect_status", "problems", "service_summary"]

# Worst first: a service's state is that of its best instance (one running replica is enough).
_STATE_ORDER = ("running", "not ready", "not responding", "stopped", "never started")


def service_summary(instances: list[dict[str, Any]]) -> str:
    """The state of a service from its instances' states: its best instance's."""
    if not instances:
        return "never started"
    return min((i["state"] for i in instances), key=_STATE_ORDER.index)


async def _probe_process(settings: Settings) -> dict[str, Any]:
    """Ask this host's health port (``http.port``) for ``/readyz``."""
    host = "127.0.0.1" if settings.http.host in ("0.0.0.0", "::", "") else settings.http.host
    try:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation (Ctrl-C
        # ending ``status --watch``) that comes as the connection attempt ends.
        async with asyncio.timeout(3.0):
            reader, writer = await asyncio.open_connection(host, settings.http.port)
        try:
            writer.write(f"GET /readyz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                         .encode())
            await writer.drain()
            async with asyncio.timeout(6.0):
                data = await reader.read()
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        code = int(head.split()[1])
        return {"port": settings.http.port, "reachable": True, "ready": code == 200,
                "checks": json.loads(body)}
    except (OSError, TimeoutError, ValueError, IndexError):
        return {"port": settings.http.port, "reachable": False, "ready": False, "checks": {}}


async def _optional(query: Callable[[], Any]) -> Any:
    """The query's result, or None where its tables do not exist (that service never ran)."""
    try:
        return await query()
    except StoreError:
        return None


async def _studies(db: Database) -> dict[str, int]:
    rows = await db.fetch("SELECT status, count(*) AS n FROM router_studies GROUP BY status")
    counts = {"open": 0, "claimed": 0, "notified": 0}
    counts.update({row["status"]: int(row["n"]) for row in rows})
    return counts


async def _sync(db: Database) -> dict[str, Any]:
    transfers = await db.fetch("SELECT status, count(*) AS n FROM sync_transfers GROUP BY status")
    last = await db.fetchrow(
        "SELECT id, status, started_at, finished_at, missing_studies, series_requested,"
        " series_moved, series_failed, images_transferred, error"
        " FROM sync_runs ORDER BY started_at DESC, id DESC LIMIT 1"
    )
    return {
        "transfers": {row["status"]: int(row["n"]) for row in transfers},
        "last_run": dict(last) if last else None,
    }


async def _harvest(db: Database) -> dict[str, Any]:
    rows = await db.fetch("SELECT status, count(*) AS n FROM harvest_series GROUP BY status")
    series = {row["status"]: int(row["n"]) for row in rows}
    patients = await db.fetch("SELECT status, count(*) AS n FROM harvest_patients GROUP BY status")
    return {
        "series": series,
        "series_wanted": sum(n for status, n in series.items() if status != "excluded"),
        "series_complete": series.get("complete", 0),
        "patients": {row["status"]: int(row["n"]) for row in patients},
    }


def _dead_letter_counts(depths: dict[str, int], prefix: str) -> dict[str, int]:
    # A service without a dead-letter queue consumes nothing: it has none.
    return {s: depths.get(dead_letter_queue_name(prefix, s), 0) for s in SERVICES}


async def collect_status(
    settings: Settings, db: Database, bus: EventBus, *, clock: Callable[[], float] = time.time
) -> dict[str, Any]:
    """The installation's state as plain data."""
    beats = await read_heartbeats(db, clock=clock)
    services: dict[str, dict[str, Any]] = {}
    for name in SERVICES:
        instances = [b.as_dict() for b in beats if b.service == name]
        services[name] = {"state": service_summary(instances), "instances": instances}
    for beat in beats:
        if beat.service not in services:  # a service this version no longer knows
            services[beat.service] = {"state": beat.state, "instances": [beat.as_dict()]}

    counts = await _optional(lambda: Ledger(db).count_by_status())
    files = None if counts is None else {
        "pending": counts["ready"] + counts["sending"],
        # Archived files were sent to every destination first.
        "sent": counts["sent"] + counts["archived"],
        "failed": counts["failed"],
        "invalid": counts["invalid"],
        "duplicate": counts["duplicate"],
    }
    try:
        depths = await bus.queue_depths()
        dead = _dead_letter_counts(depths, settings.bus.queue_prefix)
        bus_error = None
    except BusError as err:
        depths, dead, bus_error = {}, {}, str(err)
    dl_queues = {dead_letter_queue_name(settings.bus.queue_prefix, s) for s in SERVICES}
    waiting: dict[str, int] = {}
    for queue, depth in depths.items():
        if queue in dl_queues:
            continue
        service = next((s for s in SERVICES
                        if queue.startswith(f"{settings.bus.queue_prefix}.{s}.")), None)
        if service is not None:
            waiting[service] = waiting.get(service, 0) + depth
    return {
        "time": clock(),
        "bus": settings.bus.backend,
        "state": settings.state.backend,
        "process": await _probe_process(settings),
        "services": services,
        "files": files,
        "ledger": counts,
        "queues": depths,
        "waiting": waiting,
        "dead_letters": dead,
        "bus_error": bus_error,
        "studies": await _optional(lambda: _studies(db)),
        "harvest": await _optional(lambda: _harvest(db)),
        "sync": await _optional(lambda: _sync(db)),
    }


def problems(report: dict[str, Any]) -> list[str]:
    """What is not all good, one line each: services down, dead letters, an unreachable bus."""
    found = []
    for name, service in report["services"].items():
        state = service["state"]
        if state in ("never started", "running"):
            continue
        reasons = {i["stop_reason"] for i in service["instances"] if i["stop_reason"]}
        why = f" ({'; '.join(sorted(reasons))})" if reasons and state == "stopped" else ""
        found.append(f"{name} {state}{why}")
    dead = {s: n for s, n in report["dead_letters"].items() if n}
    if dead:
        found.append(f"{sum(dead.values())} dead letter(s): "
                     + ", ".join(f"{s} {n}" for s, n in dead.items()))
    if report["files"] is None:
        found.append("the state store has no tables yet: run `pacsflow db upgrade` "
                     "(services do at start)")
    if report.get("bus_error"):
        found.append(f"event bus: {report['bus_error']}")
    return found
