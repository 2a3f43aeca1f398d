"""Helpers for the harvester tests: a cohort of synthetic patients, a DIMSE-counting proxy in
front of the PACS, settings, and running a harvester in this process or as a child process.

The proxy is how requests are counted *at the PACS side of the wire*, independently of the
harvester's own bookkeeping: it parses the PDUs the harvester sends (PS3.8 9.3), reassembles
each command set (PS3.7 6.3: always Implicit VR Little Endian) and records every request's
Command Field with the time it passed, and for C-MOVE / C-GET the identifier's level, series
and SOP Instance UIDs. It can also cut the connection at a chosen request, which is how a
network reset during a retrieve is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Self

import yaml
from pacsflow.bus import EventBus, MemoryBus
from pacsflow.config import Settings, load_settings
from pacsflow.events import Event, Source
from pacsflow.store import Database, SqliteDatabase, upgrade
from pacsflow_harvester.harvester import Harvester
from pacsflow_harvester.state import HarvestState
from prometheus_client import CollectorRegistry
from pydicom.filereader import read_dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid

from tests.dicom.synthetic import ct_dataset

COMMANDS = {0x0001: "C-STORE", 0x0010: "C-GET", 0x0020: "C-FIND", 0x0021: "C-MOVE",
            0x0030: "C-ECHO", 0x0FFF: "C-CANCEL"}  # fmt: skip


# --- the cohort ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesSpec:
    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    study_date: str
    sop_uids: tuple[str, ...]


@dataclass
class Cohort:
    """Patients x studies x series of tiny CT/MR images, written as files."""

    series: list[SeriesSpec]
    files: list[Path]

    def of_patients(self, patient_ids: Iterable[str]) -> list[SeriesSpec]:
        wanted = set(patient_ids)
        return [item for item in self.series if item.patient_id in wanted]


def write_cohort(
    folder: Path,
    patients: int = 5,
    studies: int = 2,
    series: int = 3,
    instances: int = 4,
    prefix: str = "PAT",
) -> Cohort:
    """``patients`` x ``studies`` x ``series`` x ``instances`` files of 8 x 8 pixels.

    Patient n is ``PAT00n``; study k is dated 2023-01-0k; the last series of each study is MR,
    the others CT.
    """
    folder.mkdir(parents=True, exist_ok=True)
    specs: list[SeriesSpec] = []
    files: list[Path] = []
    for p in range(1, patients + 1):
        patient_id = f"{prefix}{p:03d}"
        for s in range(1, studies + 1):
            study_uid = generate_uid()
            study_date = f"2023010{s}"
            for r in range(1, series + 1):
                series_uid = generate_uid()
                modality = "MR" if r == series else "CT"
                uids = []
                for number in range(1, instances + 1):
                    uid = generate_uid()
                    ds = ct_dataset(study_uid, series_uid, uid, number, rows=8, columns=8)
                    ds.PatientID = patient_id
                    ds.PatientName = f"Cohort^{patient_id}"
                    ds.StudyDate = study_date
                    ds.StudyTime = f"0{s}0000"
                    ds.Modality = modality
                    ds.SeriesNumber = r
                    path = folder / f"{patient_id}_{s}_{r}_{number}.dcm"
                    dcmwrite(path, ds, enforce_file_format=True)
                    files.append(path)
                    uids.append(uid)
                specs.append(
                    SeriesSpec(patient_id, study_uid, series_uid, modality, study_date, tuple(uids))
                )
    return Cohort(specs, files)


def files_on_disk(root: Path) -> dict[str, Path]:
    """SOP Instance UID (file stem) -> path of every .dcm below ``root``."""
    return {path.stem: path for path in root.rglob("*.dcm") if not path.name.startswith(".")}


def series_on_disk(root: Path) -> dict[str, set[str]]:
    """Series folder name -> the SOP Instance UIDs in it."""
    found: dict[str, set[str]] = {}
    for path in root.rglob("*.dcm"):
        if not path.name.startswith("."):
            found.setdefault(path.parent.name, set()).add(path.stem)
    return found


# --- the counting proxy -------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One DIMSE request that passed the proxy towards the PACS."""

    time: float
    command: str
    level: str | None = None
    series_uid: str | None = None
    sop_uids: tuple[str, ...] = ()


def _command_field(command: bytes) -> int | None:
    # PS3.7 6.3.1: the command set is Implicit VR Little Endian, group 0000 only.
    offset = 0
    while offset + 8 <= len(command):
        group, element, length = struct.unpack_from("<HHI", command, offset)
        value = command[offset + 8 : offset + 8 + length]
        if (group, element) == (0x0000, 0x0100):
            return int(struct.unpack("<H", value[:2])[0])
        offset += 8 + length
    return None


def _identifier(data: bytes) -> dict[str, Any]:
    # The identifier is encoded in the context's transfer syntax: explicit VR shows a VR
    # in bytes 4-5 of the first element.
    explicit = data[4:6].isalpha() and data[4:6].isupper()
    try:
        ds = read_dataset(BytesIO(data), is_implicit_VR=not explicit, is_little_endian=True)
    except (ValueError, KeyError, EOFError, OverflowError):
        return {}  # an identifier this helper cannot read is just not described
    uids = ds.get("SOPInstanceUID", "")
    if isinstance(uids, str):
        uids = [uids] if uids else []
    return {
        "level": str(ds.get("QueryRetrieveLevel", "")) or None,
        "series_uid": str(ds.get("SeriesInstanceUID", "")) or None,
        "sop_uids": tuple(str(uid) for uid in uids),
    }


class _Parser:
    """Reassembles PDUs and command sets of one client -> server stream."""

    def __init__(self, proxy: DimseProxy, connection: _Connection) -> None:
        self.proxy = proxy
        self.connection = connection
        self.buffer = bytearray()
        self.command = bytearray()
        self.data = bytearray()
        self.pending: tuple[float, str] | None = None

    def feed(self, chunk: bytes) -> list[str]:
        """Feed bytes; returns the requests whose command set completed."""
        self.buffer += chunk
        seen: list[str] = []
        while len(self.buffer) >= 6:
            pdu_type = self.buffer[0]
            length = struct.unpack(">I", self.buffer[2:6])[0]
            if len(self.buffer) < 6 + length:
                break
            pdu = bytes(self.buffer[6 : 6 + length])
            del self.buffer[: 6 + length]
            if pdu_type == 0x04:
                seen.extend(self._p_data(pdu))
        return seen

    def flush(self) -> None:
        """The connection ends: a retrieve whose identifier never came is still a request."""
        if self.pending is not None:
            when, name = self.pending
            self.pending = None
            self.proxy._record(Request(when, name))

    def _p_data(self, pdu: bytes) -> list[str]:
        seen = []
        offset = 0
        while offset + 6 <= len(pdu):
            item_length = struct.unpack(">I", pdu[offset : offset + 4])[0]
            header = pdu[offset + 5]
            value = pdu[offset + 6 : offset + 4 + item_length]
            offset += 4 + item_length
            if header & 0x01:
                self.command += value
                if header & 0x02:
                    field_ = _command_field(bytes(self.command))
                    self.command.clear()
                    if field_ is not None and not field_ & 0x8000:
                        name = COMMANDS.get(field_, f"0x{field_:04X}")
                        seen.append(name)
                        if name in ("C-MOVE", "C-GET"):
                            self.pending = (time.monotonic(), name)
                            self.data.clear()
                        else:
                            self.proxy._record(Request(time.monotonic(), name))
            elif self.pending is not None:
                self.data += value
                if header & 0x02:
                    when, name = self.pending
                    self.pending = None
                    self.proxy._record(Request(when, name, **_identifier(bytes(self.data))))
        return seen


@dataclass
class _Connection:
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


class DimseProxy:
    """A TCP proxy on 127.0.0.1 in its own thread that records DIMSE requests.

    ``target_port`` may be changed at any time (a restarted PACS on a new port); new
    connections go there. ``cut`` names commands at which the connection is dropped: with
    ``forward_cut`` False the request never reaches the PACS (a reset as it is sent),
    otherwise after ``cut_delay`` seconds (a reset in the middle of a retrieve).
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.requests: list[Request] = []
        self.cut: set[str] = set()
        self.forward_cut = False
        self.cut_delay = 0.0
        self.cuts = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dimse-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def snapshot(self, command: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if command is None or r.command == command]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", 0)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> DimseProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._open):
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        connection = _Connection([writer, up_writer])
        self._open.update(connection.writers)
        parser = _Parser(self, connection)
        await asyncio.gather(
            self._upstream(reader, up_writer, parser, connection),
            self._pipe(up_reader, writer),
            return_exceptions=True,
        )
        for item in connection.writers:
            self._open.discard(item)
            item.transport.abort()

    def _drop(self, connection: _Connection, parser: _Parser) -> None:
        self.cuts += 1
        parser.flush()
        for item in connection.writers:
            item.transport.abort()

    async def _upstream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        parser: _Parser,
        connection: _Connection,
    ) -> None:
        while data := await reader.read(65536):
            seen = parser.feed(data)
            if self.cut and any(name in self.cut for name in seen):
                if not self.forward_cut:
                    self._drop(connection, parser)
                    return
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(self.cut_delay)
                self._drop(connection, parser)
                return
            writer.write(data)
            await writer.drain()
        writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()


def max_in_window(times: list[float], window: float) -> int:
    """The most requests that fall into any half-open window of ``window`` seconds."""
    ordered = sorted(times)
    best = 0
    start = 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - window:
            start += 1
        best = max(best, end - start + 1)
    return best


# --- settings and running -----------------------------------------------------------------


def harvest_settings(
    tmp_path: Path,
    pacs_port: int,
    *,
    router_port: int = 0,
    storage: Path | None = None,
    state: dict[str, Any] | None = None,
    **harvester: Any,
) -> Settings:
    """Settings for a harvester of the PACS at ``pacs_port`` with short timings."""
    storage = storage or tmp_path / "storage"
    values: dict[str, Any] = {
        "source": "pacs",
        "requests_per_minute": 6000,
        "rate_margin_seconds": 0.5,
        "workers": 2,
        "retry_initial_seconds": 0.3,
        "retry_max_seconds": 2.0,
        "lease_seconds": 30,
        "poll_seconds": 0.3,
        "archive_folder": str(tmp_path / "archive"),
        "criteria": {"patient_id_pattern": "PAT00[135]"},
        **harvester,
    }
    return load_settings(
        None,
        instance="harvest-test",
        state=state or {"backend": "sqlite", "path": str(tmp_path / "harvest.db")},
        http={"host": "127.0.0.1", "port": 0},
        logging={"level": "INFO", "format": "text"},
        dicom={"ae_title": "HARVESTER", "connect_timeout": 3, "acse_timeout": 5,
               "dimse_timeout": 10, "network_timeout": 20},
        nodes={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}},
        uploader={"destinations": ["pacs"]},
        router={
            "ae_title": "PACSFLOW", "host": "127.0.0.1", "port": router_port,
            "routes": {"PACSFLOW": {"path": str(storage)}},
            "study_quiet_seconds": 30, "flush_seconds": 0.1, "sweep_seconds": 1,
        },
        harvester=values,
    )  # fmt: skip


@dataclass
class Running:
    """A harvester running as a task of this process, with what it published."""

    harvester: Harvester
    db: Database
    bus: EventBus
    registry: CollectorRegistry
    events: list[Event] = field(default_factory=list)

    @property
    def state(self) -> HarvestState:
        return self.harvester.state

    def of_type(self, kind: str) -> list[Event]:
        return [event for event in self.events if event.type == kind]

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def running_harvester(
    settings: Settings,
    *,
    db: Database | None = None,
    bus: EventBus | None = None,
    **parts: Any,
) -> AsyncIterator[Running]:
    """A harvester on SQLite (or ``db``) and the memory bus (or ``bus``), until the block ends."""
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
        harvester = Harvester(
            settings, db=db, bus=bus, registry=registry,
            source=Source(service="harvester", instance="test"), **parts,
        )  # fmt: skip
        running = Running(harvester, db, bus, registry)

        async def collect(event: Event) -> None:
            running.events.append(event)

        await bus.subscribe("harvesttest", ["moved", "patient-complete"], collect)
        task = asyncio.create_task(harvester.run())
        try:
            yield running
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        if own_bus:
            await bus.close()
        if own_db:
            await db.close()


async def harvest_done(state: HarvestState) -> bool:
    """True when nothing is left to query, retrieve or archive."""
    counts = await state.counts()
    busy = sum(counts["patients"].get(s, 0) for s in ("pending", "listing"))
    busy += sum(counts["studies"].get(s, 0) for s in ("pending", "listing"))
    busy += sum(counts["series"].get(s, 0) for s in ("pending", "retrieving"))
    scan = await state.db.fetchval("SELECT status FROM harvest_scans WHERE name = 'patients'")
    if busy or scan in (None, "pending", "running"):
        return False
    waiting = await state.db.fetchval(
        "SELECT count(*) FROM harvest_patients WHERE status = 'listed'"
        " AND (version > archive_version OR published_version < archive_version)"
        " AND NOT EXISTS (SELECT 1 FROM harvest_series r WHERE r.patient_id ="
        " harvest_patients.patient_id AND r.status = 'failed')"
    )
    return not waiting


async def wait_until(
    check: Callable[[], Any], timeout: float, message: str = "condition", interval: float = 0.1
) -> None:
    """Poll ``check`` (sync or async) until it is true; fail with ``message`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        await asyncio.sleep(interval)


# --- a harvester as a child process -------------------------------------------------------


def write_config(path: Path, settings: Settings) -> Path:
    """The settings as a YAML file a ``pacsflow`` process reads."""
    data = settings.model_dump(mode="json")
    data["bus"]["url"] = "amqp://guest:guest@127.0.0.1:5672/"
    data["state"]["dsn"] = settings.state.dsn.get_secret_value()
    path.write_text(yaml.safe_dump(data))
    return path


class HarvesterProcess:
    """``pacsflow harvester -c CONFIG`` as a child process, its output in a log file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> HarvesterProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacsflow", "harvester", "-c", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"},
            )  # fmt: skip
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to release anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@contextlib.contextmanager
def harvester_processes(configs: list[Path], folder: Path) -> Iterator[list[HarvesterProcess]]:
    processes = [
        HarvesterProcess(config, folder / f"harvester{index}.log").start()
        for index, config in enumerate(configs)
    ]
    try:
        yield processes
    finally:
        for process in processes:
            process.stop()
