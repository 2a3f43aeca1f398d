"""``pacsflow sync --once``: one cycle, its moves driven in this process, then the table.

The cycle is the service's own: the same requests in the state store and the same events, so
a sync service running beside it (or after it) sees what this run did. Failed series are tried
again at once, whatever their backoff: an operator asked for a cycle now. The exit code is 0
when every requested series was moved (or none was missing), 1 otherwise.
"""

from __future__ import annotations

import sys
from contextlib import AsyncExitStack
from typing import TextIO

from prometheus_client import CollectorRegistry

from pacsflow.bus import create_bus
from pacsflow.config import Settings
from pacsflow.events import Source
from pacsflow.store import open_database, upgrade

from pacsflow_sync.report import CycleReport
from pacsflow_sync.service import build

__all__ = ["run_once"]


async def run_once(
    settings: Settings, *, out: TextIO | None = None, registry: CollectorRegistry | None = None
) -> CycleReport:
    """Run one cycle to its end and print its statistics; the report."""
    registry = registry or CollectorRegistry()
    async with AsyncExitStack() as stack:
        db = await open_database(settings.state)
        stack.push_async_callback(db.close)
        await upgrade(db)
        bus = create_bus(settings, registry)
        await bus.start()
        stack.push_async_callback(bus.close)
        source = Source(service="sync", instance=settings.instance)
        parts = build(settings, db, bus, registry, source)
        await parts.movers.report_pending()
        report = await parts.cycle.run(drive=True, retry_failed=True)
    print(report.table(), file=out or sys.stdout, flush=True)
    return report
