"""Helpers for the router tests: a router on SQLite and a bus, DCMTK senders, expected paths."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pacsflow.bus import EventBus, MemoryBus
from pacsflow.config import Settings, load_settings
from pacsflow.dicom import read_part10
from pacsflow.events import Event, FileReady, Source, StudyComplete
from pacsflow.store import Database, SqliteDatabase, upgrade
from pacsflow_router.paths import instance_path
from pacsflow_router.router import Router
from prometheus_client import CollectorRegistry

from tests.conftest import require_tool

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def router_settings(tmp_path: Path, routes: dict[str, Any], **router: Any) -> Settings:
    """Settings for a router on a free port with short times, SQLite state under tmp_path."""
    values: dict[str, Any] = {
        "port": 0,
        "host": "127.0.0.1",
        "routes": routes,
        "study_quiet_seconds": 1.0,
        "sweep_seconds": 0.2,
        "flush_seconds": 0.1,
        "routes_poll_seconds": 0.1,
        **router,
    }
    nodes = {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}
    return load_settings(
        None,
        state={"backend": "sqlite", "path": str(tmp_path / "state.db")},
        nodes=nodes,
        uploader={"destinations": ["pacs"]},
        router=values,
    )


@dataclass
class Harness:
    """A started router with the events it published."""

    router: Router
    db: Database
    bus: EventBus
    registry: CollectorRegistry
    events: list[Event] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.router.port

    def completions(self) -> list[StudyComplete]:
        return [e for e in self.events if isinstance(e, StudyComplete)]

    def file_ready(self) -> list[FileReady]:
        return [e for e in self.events if isinstance(e, FileReady)]

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def wait_completions(self, count: int, timeout: float = 20.0) -> list[StudyComplete]:
        async with asyncio.timeout(timeout):
            while len(self.completions()) < count:
                await asyncio.sleep(0.05)
        return self.completions()


@contextlib.asynccontextmanager
async def running_router(
    settings: Settings, *, bus: EventBus | None = None, db: Database | None = None
) -> AsyncIterator[Harness]:
    """A router on SQLite (or ``db``) and the memory bus (or ``bus``), stopped on exit."""
    own_db = db is None
    if db is None:
        db = await SqliteDatabase.open(settings.state.path)
    own_bus = bus is None
    bus = bus or MemoryBus()
    registry = CollectorRegistry()
    try:
        await upgrade(db)
        if own_bus:
            await bus.start()
        router = Router(
            settings,
            db=db,
            bus=bus,
            registry=registry,
            source=Source(service="router-scp", instance="test"),
        )
        harness = Harness(router, db, bus, registry)

        async def collect(event: Event) -> None:
            harness.events.append(event)

        await bus.subscribe("routertest", ["study-complete", "file-ready"], collect)
        await router.start()
        try:
            yield harness
        finally:
            await router.stop()
    finally:
        if own_bus:
            await bus.close()
        if own_db:
            await db.close()


async def storescu(
    port: int, called: str, *paths: Path, calling: str = "STORESCU", options: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Send files or folders with DCMTK storescu (one association); never raises on failure."""
    process = await asyncio.create_subprocess_exec(
        require_tool("storescu"), "-aet", calling, "-aec", called, "+sd", "-nh", *options,
        "127.0.0.1", str(port), *map(str, paths),
        env=DCMTK_ENV, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    return subprocess.CompletedProcess(
        list(map(str, paths)), process.returncode or 0, out.decode(), err.decode()
    )


def expected_path(root: Path, source: Path) -> Path:
    """Where the router files ``source`` under a route at ``root``."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    return instance_path(
        root,
        str(ds.get("PatientID", "")),
        str(ds.get("StudyDate", "")),
        str(ds.get("StudyTime", "")),
        str(ds.get("SeriesInstanceUID", "")),
        str(ds.SOPInstanceUID),
    ).file


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file (what must arrive unchanged)."""
    return path.read_bytes()[read_part10(path).dataset_offset :]


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def copy_tree(files: Sequence[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.copy(path, folder / path.name)
    return folder


def associate_rq(called: str, calling: str = "RAWPEER", max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ for CT Image Storage and Verification, encoded by pynetdicom."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    contexts = [
        build_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"]),
        build_context("1.2.840.10008.1.1"),
    ]
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    primitive.user_information = [maximum]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return bytes(request.encode())
