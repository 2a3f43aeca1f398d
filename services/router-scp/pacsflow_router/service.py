"""The router-scp service: a C-STORE SCP that files instances by route and reports complete studies.

Wiring only; :class:`~pacsflow_router.router.Router` does the work.
"""

from __future__ import annotations

from pacsflow.runtime import ServiceContext

from pacsflow_router.router import Router

__all__ = ["CONSUMES", "run"]

#: the router consumes no events; it produces study-complete and file-ready
CONSUMES: tuple[str, ...] = ()


async def run(ctx: ServiceContext) -> None:
    """Receive and report until cancelled."""
    router = Router(ctx.settings, db=ctx.db, bus=ctx.bus, registry=ctx.registry, source=ctx.source,
                    shares_process=bool(ctx.companions))
    await router.run()
