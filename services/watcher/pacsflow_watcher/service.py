"""The watcher service: import folders to validated, debounced ``file-ready`` events."""

from __future__ import annotations

from pacsflow.runtime import ServiceContext
from pacsflow.store.ledger import Ledger
from pacsflow_watcher.watcher import Watcher


async def run(ctx: ServiceContext) -> None:
    """Run until cancelled."""
    watcher = Watcher(
        ctx.settings.watcher,
        ledger=Ledger(ctx.db),
        bus=ctx.bus,
        source=ctx.source,
        registry=ctx.registry,
    )
    await watcher.run()
