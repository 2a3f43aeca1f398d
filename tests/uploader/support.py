"""Helpers for the uploader's tests: restartable storescp peers, receivers' counts, and the
uploader run in-process on a real state store and bus."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from pacsflow.bus import EventBus
from pacsflow.config import Node, UploaderSettings
from pacsflow.dicom import NetworkOptions, read_part10
from pacsflow.errors import InvalidDicom
from pacsflow.events import Event, FileReady, FileReadyPayload, ReadyFile, Source
from pacsflow.store import Database
from pacsflow_uploader.deliveries import DeliveryQueue, owner_id
from pacsflow_uploader.uploader import Uploader
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.conftest import require_tool
from tests.peers import StoreSCPProcess, free_port, wait_for_port

WATCHER = Source(service="watcher", instance="test")

#: short timeouts, so a lost answer fails a test quickly
OPTIONS = NetworkOptions(
    ae_title="PFTEST", connect_timeout=3, acse_timeout=10, dimse_timeout=10, network_timeout=30
)

# A storescp profile that accepts MR images only: every other SOP class is refused.
MR_ONLY_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[MROnly]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = MRImageStorage\\Uncompressed

[[Profiles]]
[MROnly]
PresentationContexts = MROnly
"""


class Storescp(StoreSCPProcess):
    """DCMTK storescp in a process group of its own, restartable on the same port.

    ``+uf`` (unique file names) keeps every copy it receives, so a file sent twice shows
    up twice; with ``fork`` each association gets a child process (several associations at
    once), and :meth:`stop` ends the children with the parent.
    """

    def __init__(
        self,
        folder: Path,
        ae_title: str = "STORESCP",
        *,
        fork: bool = True,
        profile: str | None = None,
        extra_args: Iterable[str] = (),
    ) -> None:
        super().__init__(folder, ae_title=ae_title)
        self.extra_args = ["+uf", *(["--fork"] if fork else []), *extra_args]
        self.profile = profile

    def start(self) -> Self:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        if self.profile is not None:
            config = self.folder.parent / f"{self.folder.name}.storescp.cfg"
            config.write_text(self.profile)
            syntaxes = ["-xf", str(config), "MROnly"]
        else:
            syntaxes = ["+xa"]
        env = dict(os.environ, TCP_NODELAY="1")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [require_tool("storescp"), *syntaxes, "-aet", self.ae_title, "-od",
                 str(self.folder), *self.extra_args, str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        wait_for_port(self.port, self.process)
        return self

    def stop(self) -> None:
        """End the process group this object started (storescp and its children)."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def uids(self) -> Counter[str]:
        """SOP Instance UID -> how many copies arrived (files being written are skipped)."""
        found: Counter[str] = Counter()
        for path in self.folder.iterdir():
            try:
                found[read_part10(path).sop_instance_uid] += 1
            except InvalidDicom:
                pass
        return found


def ready_files(paths: Iterable[Path]) -> list[ReadyFile]:
    """What the watcher says about valid files in its file-ready events."""
    files = []
    for path in paths:
        part10 = read_part10(path)
        files.append(
            ReadyFile(
                path=str(path), size=part10.size, sop_instance_uid=part10.sop_instance_uid,
                series_instance_uid=part10.series_instance_uid or "",
                study_instance_uid=part10.study_instance_uid or "",
                sop_class_uid=part10.sop_class_uid,
                transfer_syntax_uid=part10.transfer_syntax_uid,
            )
        )  # fmt: skip
    return files


def write_instances(folder: Path, sop_classes: Sequence[str]) -> list[Path]:
    """One small file per SOP class (Explicit VR Little Endian), in one series."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for number, sop_class in enumerate(sop_classes, start=1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality = "PFTEST", "Test^Classes", "OT"
        ds.InstanceNumber = number
        path = folder / f"i{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A metric's value (0 when it was never set)."""
    return registry.get_sample_value(name, labels) or 0.0


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str
) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class UploaderRig:
    """The uploader run in-process on a real store and bus, with what it published."""

    db: Database
    bus: EventBus
    settings: UploaderSettings
    nodes: Mapping[str, Node]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    load: Callable[[], float] = lambda: 0.0
    queue_class: type[DeliveryQueue] = DeliveryQueue
    events: list[Event] = field(default_factory=list)
    uploader: Uploader | None = None
    task: asyncio.Task[None] | None = None

    async def collect(self) -> None:
        """Record every file-sent / file-failed (as the watcher and notifier would get them)."""

        async def keep(event: Event) -> None:
            self.events.append(event)

        await self.bus.subscribe("watcher", ["file-sent", "file-failed"], keep)
        await self.bus.declare("uploader", ["file-ready"])

    async def start(self) -> Uploader:
        self.registry = CollectorRegistry()
        self.uploader = Uploader(
            self.settings, self.nodes, OPTIONS,
            queue=self.queue_class(self.db, owner=owner_id("test")),
            bus=self.bus, source=Source(service="uploader", instance="test"),
            registry=self.registry, load=self.load, load_check_seconds=0.1,
        )  # fmt: skip
        self.task = asyncio.create_task(self.uploader.run())
        return self.uploader

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            results = await asyncio.gather(self.task, return_exceptions=True)
            self.task = None
            error = results[0]
            if isinstance(error, BaseException) and not isinstance(error, asyncio.CancelledError):
                raise error

    async def announce(
        self, paths: Sequence[Path], destinations: Sequence[str] = (), batch_key: str = "batch",
        per_event: int = 200,
    ) -> None:
        files = ready_files(paths)
        await self.bus.publish(*[
            FileReady(source=WATCHER, correlation_id=batch_key, payload=FileReadyPayload(
                files=files[start:start + per_event], destinations=list(destinations),
                batch_key=batch_key))
            for start in range(0, len(files), per_event)
        ])  # fmt: skip

    def reported(self, kind: str, destination: str | None = None) -> list[str]:
        """Paths in file-sent / file-failed events (one entry per report)."""
        return [
            f.path for e in self.events if e.type == kind for f in e.payload.files  # type: ignore[union-attr]
            if destination is None or f.destination == destination
        ]  # fmt: skip

    async def deliveries(self, destination: str) -> dict[str, int]:
        """Deliveries to ``destination`` per status."""
        rows = await self.db.fetch(
            "SELECT status, count(*) AS n FROM ledger_deliveries WHERE destination = $1"
            " GROUP BY status",
            destination,
        )
        return {row["status"]: int(row["n"]) for row in rows}

    async def settled(self, destination: str, count: int) -> bool:
        statuses = await self.deliveries(destination)
        done = sum(n for status, n in statuses.items() if status not in ("pending", "sending"))
        return done >= count
