"""The uploader service: file-ready events to C-STORE at one or more PACS (see uploader.py)."""

from __future__ import annotations

from pacsflow.dicom.options import NetworkOptions
from pacsflow.runtime import ServiceContext

from pacsflow_uploader.deliveries import DeliveryQueue, owner_id
from pacsflow_uploader.uploader import Uploader

CONSUMES: tuple[str, ...] = ("file-ready",)


async def run(ctx: ServiceContext) -> None:
    """Run until cancelled."""
    settings = ctx.settings
    uploader = Uploader(
        settings.uploader,
        settings.nodes,
        NetworkOptions.from_settings(settings.dicom),
        queue=DeliveryQueue(ctx.db, owner=owner_id(settings.instance)),
        bus=ctx.bus,
        source=ctx.source,
        registry=ctx.registry,
        logs=settings.logging,
    )
    await uploader.run()
