"""The measured paths of ``python -m bench``: one coroutine each, run on one data set.

Every path starts what it needs (peers, pacsflow processes) before its clock, measures one
transfer of the whole data set, stops everything, then checks what arrived (every file, and
data sets byte for byte). :data:`PATHS` describes each: what the clock measures, and which
path is its reference. The services run as the deployments run them (``pacsflow watcher``,
``pacsflow router-scp``, ``pacsflow run``); the uploader-only and send-only paths run the
uploader's own classes inside the benchmark process, as ``bench/uploader.py`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pacsflow.bus import MemoryBus
from pacsflow.config import Node, UploaderSettings
from pacsflow.dicom import NetworkOptions, read_part10
from pacsflow.events import Event, FileReady, FileReadyPayload, ReadyFile, Source
from pacsflow.store import SqliteDatabase, upgrade
from prometheus_client import CollectorRegistry

from bench.support import (
    ENV,
    ArrivalError,
    ProcessFigures,
    ProcessMonitor,
    filing_milestones,
    free_port,
    record_as_the_watcher,
    run_tool,
    stop_process,
    tool,
    verify_arrival,
    wait_for_files,
    wait_for_port,
    wait_until_ready,
    warm_memory,
)

__all__ = ["PATHS", "BenchData", "PathSpec", "RunResult", "Setup", "Target"]

ROUTER_AE = "PACSFLOW"
SCP_AE = "STORESCP"
CALLING_AE = "PFBENCH"


@dataclass(frozen=True)
class Setup:
    """Options shared by every path of a run."""

    associations: int = 1
    sender_processes: int = 1
    router_processes: int = 1
    #: C-STOREs pacsflow may have outstanding per association to its own router-scp
    operations_window: int = 8
    timeout: float = 600.0
    rabbit_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    pg_admin_dsn: str = "postgresql://postgres@127.0.0.1:5432/test"
    #: where py-spy profiles go, when a run is profiled
    profile_folder: Path | None = None


@dataclass
class BenchData:
    """One generated data set and what the paths need of it."""

    name: str
    folder: Path
    paths: list[Path]
    total_bytes: int
    #: SOP Instance UID -> source file
    sources: dict[str, Path]
    study_uid: str
    ready_files: list[ReadyFile]
    #: set by the runner when Orthanc paths run: the loaded Orthanc and its C-MOVE targets
    orthanc: Any = None
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.paths)

    @classmethod
    def load(cls, name: str, folder: Path) -> BenchData:
        paths = sorted(folder.iterdir())
        ready: list[ReadyFile] = []
        for path in paths:
            part10 = read_part10(path)
            ready.append(ReadyFile(
                path=str(path), size=part10.size, sop_instance_uid=part10.sop_instance_uid,
                series_instance_uid=part10.series_instance_uid or "",
                study_instance_uid=part10.study_instance_uid or "",
                sop_class_uid=part10.sop_class_uid, transfer_syntax_uid=part10.transfer_syntax_uid,
            ))  # fmt: skip
        return cls(
            name=name, folder=folder, paths=paths,
            total_bytes=sum(path.stat().st_size for path in paths),
            sources={f.sop_instance_uid: Path(f.path) for f in ready},
            study_uid=ready[0].study_instance_uid, ready_files=ready,
        )  # fmt: skip


@dataclass
class RunResult:
    seconds: float
    processes: dict[str, ProcessFigures]
    verified: dict[str, object]
    profiles: list[str] = field(default_factory=list)
    #: seconds from the clock's start to points on the way (end to end: first file, half)
    milestones: dict[str, float] = field(default_factory=dict)


@dataclass
class Target:
    """Where one run happens: its folder, its monitor, the shared options."""

    work: Path
    monitor: ProcessMonitor
    setup: Setup
    profile: bool = False
    profiles: list[str] = field(default_factory=list)

    def start_window(self, data: BenchData) -> None:
        """Warm twice the data set's size of memory (what receivers write into), then count."""
        warm_memory(2 * data.total_bytes)
        self.monitor.start_window()


RunPath = Callable[[Target, BenchData], Awaitable[RunResult]]


@dataclass(frozen=True)
class PathSpec:
    key: str
    label: str
    clock: str
    reference: str
    run: RunPath
    orthanc: bool = False


# --- processes --------------------------------------------------------------------------------


class _Child:
    """A peer or pacsflow process, measured under ``label`` while it runs."""

    def __init__(self, target: Target, label: str, command: list[str],
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.target = target
        self.label = label
        self.command = command
        self.env = env or ENV
        self.log = target.work / f"{label.replace(' ', '-').replace('/', '-')}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.profiler: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as output:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=output,
                                            stderr=subprocess.STDOUT)  # fmt: skip
        self.target.monitor.add(self.label, self.process.pid)
        return self.process

    def start_profile(self) -> None:
        """py-spy on this process (and its sender subprocesses) until it stops."""
        assert self.process is not None
        folder = self.target.setup.profile_folder
        assert folder is not None
        base = folder / f"{self.target.work.name}-{self.label.replace(' ', '-')}"
        with open(f"{base}.py-spy.log", "ab") as output:
            self.profiler = subprocess.Popen(
                [tool("py-spy"), "record", "--subprocesses", "--rate", "200", "--format", "raw",
                 "-o", f"{base}.txt", "--pid", str(self.process.pid)],
                stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.target.profiles.append(f"{base}.txt")

    def stop(self) -> ProcessFigures | None:
        if self.process is None:
            return None
        figures = stop_process(self.process)
        if self.profiler is not None:
            # py-spy writes its file once the profiled process is gone.
            try:
                self.profiler.wait(30)
            except subprocess.TimeoutExpired:
                self.profiler.terminate()
                self.profiler.wait(10)
        return figures


def _storescp(target: Target, out: Path, port: int) -> _Child:
    out.mkdir(parents=True, exist_ok=True)
    return _Child(target, "storescp", [tool("storescp"), "+xa", "-aet", SCP_AE, "-od", str(out),
                                       str(port)])  # fmt: skip


def _pacsflow(target: Target, label: str, arguments: list[str], config: Path,
              http_port: int, extra_env: dict[str, str] | None = None,
              module: str = "pacsflow") -> _Child:  # fmt: skip
    env = {**os.environ, "PACSFLOW_HTTP__PORT": str(http_port), **(extra_env or {})}
    env.pop("PACSFLOW_CONFIG", None)
    return _Child(target, label, [sys.executable, "-m", module, *arguments, "-c", str(config)],
                  env)  # fmt: skip


def _base_config(target: Target, router_port: int, out: Path) -> dict[str, Any]:
    setup = target.setup
    return {
        "instance": "bench",
        "logging": {"level": "WARNING", "format": "text"},
        "http": {"host": "127.0.0.1"},
        "state": {"backend": "sqlite", "path": str(target.work / "state.db")},
        "bus": {"backend": "embedded", "declare_services": ["watcher", "uploader", "router-scp"]},
        "dicom": {"ae_title": CALLING_AE},
        "nodes": {"router": {"ae_title": ROUTER_AE, "host": "127.0.0.1", "port": router_port,
                             "operations_window": setup.operations_window}},
        "router": {
            "ae_title": ROUTER_AE, "host": "127.0.0.1", "port": router_port,
            "processes": setup.router_processes,
            "routes": {ROUTER_AE: {"path": str(out)}},
            # No study completes during a run: the notifier is not part of these paths.
            "study_quiet_seconds": 3600,
        },
        "uploader": {
            "destinations": ["router"], "associations": setup.associations,
            "processes": setup.sender_processes,
            # Other work on this machine must not pause the measured runs.
            "max_load_per_core": 1000.0,
        },
        "watcher": {
            "import_folders": [str(target.work / "inbox")],
            "archive_folder": str(target.work / "archive"),
            "quarantine_folder": str(target.work / "quarantine"),
            # The unit appears complete in one rename: nothing to wait for.
            "debounce_seconds": 0,
        },
    }  # fmt: skip


def _write_config(target: Target, name: str, config: dict[str, Any]) -> Path:
    path = target.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def _start_router(target: Target, router_port: int, out: Path) -> _Child:
    config = _write_config(target, "router", _base_config(target, router_port, out))
    router = _pacsflow(target, "router-scp", ["router-scp"], config, free_port())
    process = router.start()
    await asyncio.to_thread(wait_for_port, router_port, process)
    return router


async def _settle(seconds: float = 0.5) -> None:
    # Start-up work (imports, sender processes loading) is done before a clock starts.
    await asyncio.sleep(seconds)


# --- the reference and the uploader ---------------------------------------------------------


def _filed_run(out: Path, data: BenchData, figures: dict[str, ProcessFigures],
               started_wall: float, **clocks: float) -> RunResult:  # fmt: skip
    """A run into pacsflow's router, clocked until its last file was filed: every file
    verified, and where the time went (until the first, the middle and the last file was
    filed), with the other ``clocks`` kept as milestones."""
    verified = verify_arrival(out, data.count, data.sources)
    filed = filing_milestones(out, started_wall)
    return RunResult(filed["last_filed_seconds"], figures, verified, milestones={**filed, **clocks})


async def dcmtk_reference(target: Target, data: BenchData) -> RunResult:
    out, port = target.work / "storescp-out", free_port()
    scp = _storescp(target, out, port)
    process = scp.start()
    try:
        await asyncio.to_thread(wait_for_port, port, process)
        target.start_window(data)
        seconds, _ = await run_tool(
            [tool("storescu"), "-aet", CALLING_AE, "-aec", SCP_AE, "+sd", "127.0.0.1", str(port),
             str(data.folder)], target.work / "storescu.log", monitor=target.monitor,
            label="storescu",
        )  # fmt: skip
        figures = target.monitor.end_window()
    finally:
        scp.stop()
    return RunResult(seconds, figures, verify_arrival(out, data.count, data.sources))


async def uploader_to_storescp(target: Target, data: BenchData) -> RunResult:
    from pacsflow_uploader.deliveries import DeliveryQueue, owner_id
    from pacsflow_uploader.uploader import Uploader

    setup = target.setup
    out, port = target.work / "storescp-out", free_port()
    # More than one association at a time needs storescp's forking mode.
    scp = _storescp(target, out, port)
    if setup.associations > 1:
        scp.command.insert(1, "--fork")
    db = await SqliteDatabase.open(target.work / "state.db")
    await upgrade(db)
    # Recorded as the watcher records them before it announces them (not timed).
    await record_as_the_watcher(db, data.ready_files)
    bus = MemoryBus()
    await bus.start()
    sent = 0
    done = asyncio.Event()

    async def count(event: Event) -> None:
        nonlocal sent
        sent += len(event.payload.files)  # type: ignore[union-attr]
        if sent >= data.count:
            done.set()

    await bus.subscribe("watcher", ["file-sent"], count)
    process = scp.start()
    target.monitor.add("uploader (bench process)", os.getpid())
    task: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(wait_for_port, port, process)
        service = Uploader(
            UploaderSettings(destinations=["pacs"], associations=setup.associations,
                             processes=setup.sender_processes),
            {"pacs": Node(ae_title=SCP_AE, host="127.0.0.1", port=port)},
            NetworkOptions(ae_title=CALLING_AE),
            queue=DeliveryQueue(db, owner=owner_id("bench")), bus=bus,
            source=Source(service="uploader", instance="bench"), registry=CollectorRegistry(),
            load=lambda: 0.0,
        )  # fmt: skip
        task = asyncio.create_task(service.run())
        while setup.sender_processes and not service.pool.process_ids():
            await asyncio.sleep(0.05)
        await service.pool.wait_ready()
        await _settle()
        source = Source(service="watcher", instance="bench")
        target.start_window(data)
        started = time.perf_counter()
        await bus.publish(*[
            FileReady(source=source, correlation_id="bench", payload=FileReadyPayload(
                files=data.ready_files[i:i + 200], batch_key="bench"))
            for i in range(0, data.count, 200)
        ])  # fmt: skip
        await asyncio.wait_for(done.wait(), setup.timeout)
        seconds = time.perf_counter() - started
        figures = target.monitor.end_window()
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await bus.close()
        await db.close()
        scp.stop()
    return RunResult(seconds, figures, verify_arrival(out, data.count, data.sources))


# --- into the router --------------------------------------------------------------------------


async def storescu_to_router(target: Target, data: BenchData) -> RunResult:
    out, port = target.work / "router-out", free_port()
    router = await _start_router(target, port, out)
    try:
        await _settle()
        if target.profile:
            router.start_profile()
            await _settle(1.0)
        target.start_window(data)
        seconds, _ = await run_tool(
            [tool("storescu"), "-aet", CALLING_AE, "-aec", ROUTER_AE, "+sd", "127.0.0.1", str(port),
             str(data.folder)], target.work / "storescu.log", monitor=target.monitor,
            label="storescu",
        )  # fmt: skip
        figures = target.monitor.end_window()
    finally:
        router.stop()
    return RunResult(seconds, figures, verify_arrival(out, data.count, data.sources))


async def send_to_router(target: Target, data: BenchData) -> RunResult:
    """The bare transfer: the uploader's sender pool, no ledger, no events, no watcher."""
    from pacsflow_uploader.pool import SenderPool
    from pacsflow_uploader.send import send_files

    setup = target.setup
    out, port = target.work / "router-out", free_port()
    options = NetworkOptions(ae_title=CALLING_AE)
    router = await _start_router(target, port, out)
    pool = SenderPool(options, processes=setup.sender_processes)
    target.monitor.add("pacsflow send (bench process)", os.getpid())
    try:
        await pool.start()
        await pool.wait_ready()
        await _settle()
        target.start_window(data)
        started, started_wall = time.perf_counter(), time.time()
        (summary,) = await send_files(
            [str(path) for path in data.paths],
            [("router", Node(ae_title=ROUTER_AE, host="127.0.0.1", port=port,
                             operations_window=setup.operations_window))], options,
            associations=setup.associations, processes=setup.sender_processes, pool=pool,
            # As many associations as the uploader opens, however short the run.
            extra_after=0.0,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        figures = target.monitor.end_window()
    finally:
        await pool.close()
        router.stop()
    if summary.sent != data.count:
        raise ArrivalError(f"send: {summary.line()}")
    return _filed_run(out, data, figures, started_wall, last_response_seconds=seconds)


# --- end to end -----------------------------------------------------------------------------


async def _create_database(admin_dsn: str) -> str:
    import asyncpg

    name = f"pacsflow_bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return f"{admin_dsn.rsplit('/', 1)[0]}/{name}"


async def _drop_database(admin_dsn: str, dsn: str) -> None:
    import asyncpg

    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dsn.rsplit("/", 1)[1]}" WITH (FORCE)')
    finally:
        await admin.close()


async def _delete_rabbit_namespace(url: str, prefix: str) -> None:
    import aio_pika
    from pacsflow.bus import queue_name
    from pacsflow.config import SERVICES
    from pacsflow.events import EVENT_TYPES

    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        for service in SERVICES:
            for event_type in EVENT_TYPES:
                await channel.queue_delete(queue_name(prefix, service, event_type))
            await channel.queue_delete(f"{prefix}.{service}.dead-letters")
        await channel.exchange_delete(f"{prefix}.events")
        await channel.exchange_delete(f"{prefix}.events.dead-letters")
    finally:
        await connection.close()


def _stage(data: BenchData, staging: Path) -> None:
    """Hard links of the data set: the watcher moves them away, the sources stay."""
    staging.mkdir(parents=True)
    for path in data.paths:
        os.link(path, staging / path.name)


class Pipeline:
    """watcher → uploader → router-scp as separate processes (RabbitMQ + PostgreSQL) or in one
    ``pacsflow run`` (embedded bus and SQLite state). Usable by the memory soak too."""

    def __init__(self, target: Target, mode: str,
                 overrides: dict[str, dict[str, Any]] | None = None,
                 services: tuple[str, ...] = ("router-scp", "uploader", "watcher"),
                 modules: dict[str, str] | None = None) -> None:  # fmt: skip
        self.target = target
        self.mode = mode
        self.overrides = overrides or {}
        self.services = services
        # The module a service runs from, when not ``pacsflow`` (see bench.volatile_queue).
        self.modules = modules or {}
        self.config: dict[str, Any] = {}
        self.out = target.work / "router-out"
        self.inbox = target.work / "inbox"
        self.router_port = free_port()
        self.children: list[_Child] = []
        self.dsn: str | None = None
        self.prefix = f"pfbench{uuid.uuid4().hex[:10]}"

    async def start(self) -> None:
        setup = self.target.setup
        self.inbox.mkdir(parents=True, exist_ok=True)
        config = _base_config(self.target, self.router_port, self.out)
        for section, values in self.overrides.items():
            config[section].update(values)
        env: dict[str, str] = {}
        if self.mode == "rabbit":
            self.dsn = await _create_database(setup.pg_admin_dsn)
            config["state"] = {"backend": "postgres"}
            config["bus"].update(backend="rabbitmq", exchange=f"{self.prefix}.events",
                                 queue_prefix=self.prefix)  # fmt: skip
            env = {"PACSFLOW_STATE__DSN": self.dsn, "PACSFLOW_BUS__URL": setup.rabbit_url}
            path = _write_config(self.target, "pipeline", config)
            # The receiver first, so the uploader finds it; each waits for the one before.
            roles = [(service, [service]) for service in self.services]
        else:
            path = _write_config(self.target, "embedded", config)
            roles = [("pacsflow run", ["run", "watcher", "uploader", "router-scp"])]
        self.config = config
        for label, arguments in roles:
            http_port = free_port()
            child = _pacsflow(self.target, label, arguments, path, http_port, env,
                              self.modules.get(label, "pacsflow"))  # fmt: skip
            self.children.append(child)
            process = child.start()
            await asyncio.to_thread(wait_until_ready, http_port, process)
        await asyncio.to_thread(wait_for_port, self.router_port, self.children[0].process)
        await self._wait_senders()
        await _settle(1.0)

    async def _wait_senders(self) -> None:
        """The uploader's sender processes are up before any clock runs."""
        import psutil

        wanted = self.target.setup.sender_processes
        uploader = next(c for c in self.children if c.label in ("uploader", "pacsflow run"))
        assert uploader.process is not None
        deadline = time.monotonic() + 60
        while wanted and time.monotonic() < deadline:
            children = psutil.Process(uploader.process.pid).children()
            if len([c for c in children if "python" in c.name()]) >= wanted:
                return
            await asyncio.sleep(0.1)

    def failed_child(self) -> subprocess.Popen[bytes] | None:
        for child in self.children:
            if child.process is not None and child.process.poll() is not None:
                return child.process
        return None

    def release(self, data_folder: Path, unit: str) -> float:
        """Move a complete unit into the watched folder in one rename; the time it happened."""
        started = time.perf_counter()
        os.rename(data_folder, self.inbox / unit)
        return started

    async def stop(self) -> dict[str, ProcessFigures | None]:
        figures = {}
        for child in reversed(self.children):
            figures[child.label] = await asyncio.to_thread(child.stop)
        if self.mode == "rabbit":
            with contextlib.suppress(Exception):
                await _delete_rabbit_namespace(self.target.setup.rabbit_url, self.prefix)
            if self.dsn is not None:
                await _drop_database(self.target.setup.pg_admin_dsn, self.dsn)
        return figures


async def _end_to_end(target: Target, data: BenchData, mode: str) -> RunResult:
    staging = target.work / "staging" / "#1-Bench"
    _stage(data, staging)
    pipeline = Pipeline(target, mode)
    try:
        await pipeline.start()
        if mode == "rabbit":
            for label, pid in _servers(target.setup).items():
                target.monitor.add(label, pid)
        if target.profile:
            for child in pipeline.children:
                child.start_profile()
            await _settle(1.0)
        target.start_window(data)
        started_wall = time.time()
        started = pipeline.release(staging, staging.name)
        arrived = await wait_for_files(pipeline.out, data.count, target.setup.timeout)
        figures = target.monitor.end_window()
        if (failed := pipeline.failed_child()) is not None:
            raise ArrivalError(f"{failed.args} exited with {failed.returncode}")
    finally:
        await pipeline.stop()
    return _filed_run(pipeline.out, data, figures, started_wall, polled_seconds=arrived - started)


async def uploader_rabbit_to_router(target: Target, data: BenchData,
                                    volatile: bool = False) -> RunResult:  # fmt: skip
    """The uploader and router-scp processes on RabbitMQ + PostgreSQL, without the watcher;
    with ``volatile``, the uploader keeps its deliveries in memory (bench.volatile_queue)."""
    from pacsflow.bus import create_bus
    from pacsflow.config import load_settings
    from pacsflow.store import open_database

    modules = {"uploader": "bench.volatile_queue"} if volatile else None
    pipeline = Pipeline(target, "rabbit", services=("router-scp", "uploader"), modules=modules)
    try:
        await pipeline.start()
        for label, pid in _servers(target.setup).items():
            target.monitor.add(label, pid)
        if target.profile:
            for child in pipeline.children:
                child.start_profile()
            await _settle(1.0)
        config = {**pipeline.config, "state": {"backend": "postgres", "dsn": pipeline.dsn},
                  "bus": {**pipeline.config["bus"], "url": target.setup.rabbit_url}}  # fmt: skip
        settings = load_settings(None, **config)
        db = await open_database(settings.state)
        bus = create_bus(settings, CollectorRegistry())
        await bus.start()
        try:
            # Recorded as the watcher records them before it announces them (not timed).
            await record_as_the_watcher(db, data.ready_files)
            source = Source(service="watcher", instance="bench")
            events = [
                FileReady(source=source, correlation_id="bench", payload=FileReadyPayload(
                    files=data.ready_files[i:i + 200], batch_key="bench"))
                for i in range(0, data.count, 200)
            ]  # fmt: skip
            target.start_window(data)
            started, started_wall = time.perf_counter(), time.time()
            await bus.publish(*events)
            arrived = await wait_for_files(pipeline.out, data.count, target.setup.timeout)
            figures = target.monitor.end_window()
        finally:
            await bus.close()
            await db.close()
    finally:
        await pipeline.stop()
    return _filed_run(pipeline.out, data, figures, started_wall, polled_seconds=arrived - started)


async def uploader_volatile_to_router(target: Target, data: BenchData) -> RunResult:
    return await uploader_rabbit_to_router(target, data, volatile=True)


def _servers(setup: Setup) -> dict[str, int]:
    """The processes listening on the broker's and the database's ports (shared with others)."""
    from urllib.parse import urlsplit

    import psutil

    ports = {urlsplit(setup.rabbit_url).port or 5672: "RabbitMQ (server)",
             urlsplit(setup.pg_admin_dsn).port or 5432: "PostgreSQL (server)"}  # fmt: skip
    found: dict[str, int] = {}
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port in ports:
            if connection.pid is not None:
                found[ports[connection.laddr.port]] = connection.pid
    return found


async def end_to_end_rabbit(target: Target, data: BenchData) -> RunResult:
    return await _end_to_end(target, data, "rabbit")


async def end_to_end_embedded(target: Target, data: BenchData) -> RunResult:
    return await _end_to_end(target, data, "embedded")


# --- Orthanc -----------------------------------------------------------------------------------


async def _movescu(target: Target, data: BenchData, destination: str) -> tuple[float,
                                                                               ProcessFigures]:
    orthanc = data.orthanc
    return await run_tool(
        [tool("movescu"), "-S", "-aet", CALLING_AE, "-aec", orthanc.ae_title, "-aem", destination,
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={data.study_uid}",
         "127.0.0.1", str(orthanc.dicom_port)], target.work / "movescu.log",
        monitor=target.monitor, label="movescu",
    )  # fmt: skip


async def orthanc_to_storescp(target: Target, data: BenchData) -> RunResult:
    out = target.work / "storescp-out"
    scp = _storescp(target, out, data.ports["storescp"])
    process = scp.start()
    target.monitor.add("Orthanc", data.orthanc.process.pid)
    try:
        await asyncio.to_thread(wait_for_port, data.ports["storescp"], process)
        target.start_window(data)
        seconds, _ = await _movescu(target, data, SCP_AE)
        figures = target.monitor.end_window()
    finally:
        scp.stop()
    return RunResult(seconds, figures, verify_arrival(out, data.count, data.sources))


async def orthanc_to_router(target: Target, data: BenchData) -> RunResult:
    out = target.work / "router-out"
    router = await _start_router(target, data.ports["router"], out)
    target.monitor.add("Orthanc", data.orthanc.process.pid)
    try:
        await _settle()
        target.start_window(data)
        seconds, _ = await _movescu(target, data, ROUTER_AE)
        figures = target.monitor.end_window()
    finally:
        router.stop()
    return RunResult(seconds, figures, verify_arrival(out, data.count, data.sources))


# pacsflow's paths into its own router-scp stop at the same point: the last file's
# modification time, when the router finished writing it (the benchmark's polling for the
# count, every 20 ms, would add its interval; it is kept as the "polled" milestone).
_FILED = "until the router-scp finished writing the last file (its modification time)"

_E2E_CLOCK = ("from the rename that puts the complete folder into the watched import folder "
              f"(debounce 0: nothing to subtract) {_FILED}; watching, validating, hashing, "
              "the ledger, file-ready, claiming, C-STORE, file-sent and the router's filing are "
              "all inside")  # fmt: skip

#: In the order each round runs them: the reference of each group first.
PATHS: dict[str, PathSpec] = {spec.key: spec for spec in [
    PathSpec("dcmtk", "DCMTK storescu → storescp (reference)",
             "storescu's run, start to exit (+sd, one association)", "dcmtk", dcmtk_reference),
    PathSpec("uploader", "pacsflow uploader → storescp",
             "the uploader service in the benchmark process (SQLite ledger, in-memory bus): "
             "from publishing file-ready to the last file-sent event", "dcmtk",
             uploader_to_storescp),
    PathSpec("router", "storescu → pacsflow router-scp",
             "storescu's run, start to exit; the router answers each C-STORE once the file is "
             "on disk", "dcmtk", storescu_to_router),
    PathSpec("send", "pacsflow send → router-scp (bare transfer)",
             "the uploader's sender pool (pacsflow send's path, no ledger, no events; its "
             "associations added one by one as the uploader adds them), from the first "
             f"C-STORE {_FILED}", "dcmtk", send_to_router),
    PathSpec("uploader-rabbit", "file-ready → uploader → router-scp (RabbitMQ + PostgreSQL)",
             "the uploader and router-scp processes, no watcher: the files are in the ledger "
             f"beforehand (not timed); from publishing their file-ready events {_FILED}",
             "dcmtk", uploader_rabbit_to_router),
    PathSpec("uploader-volatile",
             "file-ready → uploader → router-scp, deliveries in memory (not durable)",
             "as uploader-rabbit, but the uploader keeps its deliveries and outbox in memory "
             "(bench.volatile_queue; nothing is recorded, for comparison only): the difference "
             "to uploader-rabbit is what the ledger's durable per-file work costs", "dcmtk",
             uploader_volatile_to_router),
    PathSpec("e2e", "watcher → uploader → router-scp (RabbitMQ + PostgreSQL)",
             _E2E_CLOCK, "dcmtk", end_to_end_rabbit),
    PathSpec("embedded", "pacsflow run: embedded end to end (SQLite bus + state)",
             _E2E_CLOCK, "dcmtk", end_to_end_embedded),
    PathSpec("orthanc-storescp", "Orthanc C-MOVE → storescp (reference for C-MOVE)",
             "movescu's run (study level), start to exit", "orthanc-storescp",
             orthanc_to_storescp, orthanc=True),
    PathSpec("orthanc-router", "Orthanc C-MOVE → pacsflow router-scp",
             "movescu's run (study level), start to exit", "orthanc-storescp", orthanc_to_router,
             orthanc=True),
]}  # fmt: skip
