"""Helpers of the sync tests: the acceptance studies, a counting TCP proxy, Orthanc restarts,
and the sync service's parts on a memory bus."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry
from pydicom.uid import generate_uid

from pacsflow.bus import MemoryBus
from pacsflow.config import DicomSettings, Node, Settings, StateSettings, SyncSettings
from pacsflow.events import Event, Source

from pacsflow_sync.service import SyncParts, build

from tests.dicom.synthetic import ct_dataset
from tests.peers import OrthancProcess, _environment, _tool, wait_for_port

REMOTE_AE = "PFREMOTE"
LOCAL_AE = "PFLOCAL"
SYNC_AE = "PFSYNC"


# --- the acceptance studies ------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """One written study: its UID, and per series (in series-number order) UID and files."""

    name: str
    uid: str
    series: tuple[tuple[str, tuple[Path, ...]], ...]

    def series_uid(self, images: int) -> str:
        """The UID of the study's series with this many images."""
        (uid,) = [uid for uid, paths in self.series if len(paths) == images]
        return uid

    def paths(self) -> list[Path]:
        return [path for _, paths in self.series for path in paths]


# name: (age, images per series); the local PACS starts with "present" only.
STUDIES: dict[str, tuple[timedelta, tuple[int, ...]]] = {
    "recent": (timedelta(hours=1), (3, 5, 8)),
    "earlier": (timedelta(hours=2), (2, 6)),
    "old": (timedelta(hours=13), (4,)),
    "present": (timedelta(minutes=30), (3, 4)),
    "last-week": (timedelta(days=7), (2,)),
}


@dataclass(frozen=True)
class Scenario:
    """Remote: four studies of the last 13 hours and one of last week; local: one of them."""

    studies: dict[str, Study]

    @classmethod
    def write(cls, folder: Path, now: datetime | None = None) -> Scenario:
        now = now or datetime.now()
        studies = {}
        for name, (age, counts) in STUDIES.items():
            when = now - age
            study_uid = generate_uid()
            series = []
            for number, count in enumerate(counts, start=1):
                series_uid = generate_uid()
                paths = []
                for image in range(1, count + 1):
                    ds = ct_dataset(study_uid, series_uid, generate_uid(), image, 16, 16)
                    ds.StudyDate, ds.StudyTime = f"{when:%Y%m%d}", f"{when:%H%M%S}"
                    ds.SeriesNumber = number
                    ds.PatientID = f"PF-{name}"
                    path = folder / name / f"s{number}" / f"{image:03d}.dcm"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    ds.save_as(path, enforce_file_format=True)
                    paths.append(path)
                series.append((series_uid, tuple(paths)))
            studies[name] = Study(name, study_uid, tuple(series))
        return cls(studies)

    def remote_paths(self) -> list[Path]:
        return [path for study in self.studies.values() for path in study.paths()]

    def local_paths(self) -> list[Path]:
        return self.studies["present"].paths()

    def series(self, name: str, *images: int) -> dict[str, int]:
        """Series of one study by image count: UID -> images."""
        study = self.studies[name]
        return {study.series_uid(count): count for count in images}

    def initially_local(self) -> dict[str, int]:
        return self.series("present", 3, 4)


def local_series(pacs: OrthancProcess) -> dict[str, int]:
    """Every series the Orthanc holds: Series Instance UID -> instances."""
    found = {}
    for item in pacs.rest("GET", "/series?expand"):
        found[item["MainDicomTags"]["SeriesInstanceUID"]] = len(item["Instances"])
    return found


def reset_local(pacs: OrthancProcess, scenario: Scenario) -> None:
    """Back to the start: only the "present" study, complete."""
    keep = scenario.studies["present"].uid
    for item in pacs.rest("GET", "/studies?expand"):
        if item["MainDicomTags"]["StudyInstanceUID"] != keep:
            pacs.rest("DELETE", f"/studies/{item['ID']}")
    pacs.upload(scenario.local_paths())


def delete_series(pacs: OrthancProcess, series_uid: str) -> None:
    """Remove one series from an Orthanc."""
    for item in pacs.rest("GET", "/series?expand"):
        if item["MainDicomTags"]["SeriesInstanceUID"] == series_uid:
            pacs.rest("DELETE", f"/series/{item['ID']}")


def restart_on_same_ports(pacs: OrthancProcess) -> None:
    """Start a stopped Orthanc again with its configuration, storage and ports."""
    with open(pacs.log_path, "ab") as log:
        pacs.process = subprocess.Popen(
            [_tool("Orthanc"), str(pacs.folder / "orthanc.json")],
            stdout=log, stderr=subprocess.STDOUT, env=_environment(), cwd=pacs.folder,
        )  # fmt: skip
    wait_for_port(pacs.http_port, pacs.process, timeout=30)
    wait_for_port(pacs.dicom_port, pacs.process, timeout=30)


# --- the counting proxy ------------------------------------------------------------------------


class CountingProxy:
    """Forwards 127.0.0.1:<port> to a local port in threads, counting connections.

    With ``refusing`` set, connections are accepted and closed at once: the target looks down
    to whoever connects through the proxy, and up to everyone else.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing = False
        self.connections = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="counting-proxy", daemon=True)

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def reset(self) -> None:
        with self._lock:
            self.connections = self.refused = 0

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.refusing:
                with self._lock:
                    self.refused += 1
                client.close()
                continue
            with self._lock:
                self.connections += 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


# --- the service's parts -------------------------------------------------------------------------


def node_of(pacs: OrthancProcess) -> Node:
    return Node(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.dicom_port)


def make_settings(
    remote: OrthancProcess, local: OrthancProcess, state: StateSettings, **sync: Any
) -> Settings:
    """Settings of a sync between the two Orthancs; ``sync`` overrides the sync section."""
    options: dict[str, Any] = {"remote": "remote", "local": "local", "poll_seconds": 0.2}
    options.update(sync)
    return Settings(
        instance="sync-test",
        state=state,
        dicom=DicomSettings(
            ae_title=SYNC_AE,
            connect_timeout=5,
            acse_timeout=10,
            dimse_timeout=30,
            network_timeout=60,
        ),
        # The default router node stays: other sections name it.
        nodes={**Settings().nodes, "remote": node_of(remote), "local": node_of(local)},
        sync=SyncSettings(**options),
    )


@dataclass
class Harness:
    """The sync parts of one "process", its bus and what was published on it."""

    parts: SyncParts
    bus: MemoryBus
    registry: CollectorRegistry
    events: list[Event] = field(default_factory=list)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def published(self, event_type: str) -> list[Event]:
        return [event for event in self.events if event.type == event_type]


@contextlib.asynccontextmanager
async def harness(
    settings: Settings, db: Any, *, clock: Callable[[], float] = time.time
) -> AsyncIterator[Harness]:
    """The sync's cycle and movers on a memory bus, with an observer of its events."""
    registry = CollectorRegistry()
    bus = MemoryBus(registry=registry)
    await bus.start()
    parts = build(
        settings, db, bus, registry, Source(service="sync", instance=settings.instance),
        clock=clock,
    )  # fmt: skip
    result = Harness(parts, bus, registry)

    async def observe(event: Event) -> None:
        result.events.append(event)

    await bus.subscribe("observer", ["series-missing", "moved"], observe)
    try:
        yield result
    finally:
        await bus.close()


async def eventually(
    predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05
) -> None:
    """Wait until ``predicate()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate}")
        await asyncio.sleep(interval)


def uids(items: Iterable[Any]) -> set[str]:
    """The series UIDs of events or transfer rows."""
    result = set()
    for item in items:
        payload = getattr(item, "payload", item)
        result.add(payload.series_instance_uid)
    return result
