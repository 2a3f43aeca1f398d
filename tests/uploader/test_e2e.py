"""End to end: ``pacsflow run watcher uploader`` as its own process, images dropped in the
import folder, real PACS peers (DCMTK storescp, Orthanc) receiving them.

Each run checks what the receivers hold (every SOP instance, each once), that every file is
archived at the end, and, sampled along the way, that no file left the import folder before
every destination had it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from pacsflow.bus import create_bus
from pacsflow.config import Settings, load_settings
from pacsflow.dicom import read_part10
from pacsflow.errors import InvalidDicom
from pacsflow.store import Database, open_database
from prometheus_client import CollectorRegistry

from tests.peers import OrthancProcess, free_port
from tests.uploader.support import Storescp

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


def write_config(
    tmp_path: Path, nodes: dict[str, Storescp | OrthancProcess], *, state: str, bus: str
) -> Path:
    node_lines = "".join(
        f"\n  {name}: {{ae_title: {peer.node.ae_title}, host: 127.0.0.1, port: {peer.node.port}}}"
        for name, peer in nodes.items()
    )
    path = tmp_path / "pacsflow.yaml"
    path.write_text(f"""
instance: e2e
http: {{host: 127.0.0.1, port: {free_port()}}}
logging: {{level: INFO, format: text}}
state: {state}
bus: {bus}
dicom: {{ae_title: PFE2E, connect_timeout: 3, acse_timeout: 10, dimse_timeout: 10}}
nodes:{node_lines}
watcher:
  import_folders: [{tmp_path}/inbox]
  archive_folder: {tmp_path}/archive
  quarantine_folder: {tmp_path}/quarantine
  debounce_seconds: 0.5
  archive_interval_seconds: 0.5
uploader:
  destinations: [{", ".join(nodes)}]
  retry_initial_seconds: 0.2
  retry_max_seconds: 1.0
""")
    return path


class Service:
    """``pacsflow run watcher uploader`` in a child process, logging to a file."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.settings: Settings = load_settings(config)
        self.log = config.parent / "pacsflow.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacsflow", "-c", str(self.config), "run", "watcher",
                 "uploader"],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
            )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL: no chance to finish or record anything."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.terminate()
        return self.process.wait(timeout=60)

    def metric(self, name: str, **labels: str) -> float:
        port = self.settings.http.port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                         if labels else "")
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@asynccontextmanager
async def ledger_of(settings: Settings) -> AsyncIterator[Database]:
    db = await open_database(settings.state)
    try:
        yield db
    finally:
        await db.close()


async def declare_queues(settings: Settings) -> None:
    # As in a deployment, the uploader's queue exists before the watcher first publishes.
    bus = create_bus(settings, CollectorRegistry())
    await bus.start()
    await bus.declare("uploader", ["file-ready"])
    await bus.close()


def archived_uids(tmp_path: Path) -> set[str]:
    """SOP instances of the files moved out of the import folder so far."""
    found = set()
    for path in (tmp_path / "archive").rglob("*.dcm"):
        try:
            found.add(read_part10(path).sop_instance_uid)
        except InvalidDicom:
            continue  # being moved right now
    return found


async def all_archived(tmp_path: Path, count: int) -> bool:
    """True once the import folder is empty and the archive holds ``count`` files."""
    if any((tmp_path / "inbox").rglob("*.dcm")):
        return False
    return len(list((tmp_path / "archive").rglob("*.dcm"))) >= count


async def run_until(
    done: Callable[[], Awaitable[bool]], service: Service, timeout: float, what: str,
    check: Callable[[], Awaitable[None]] | None = None, poll: float = 0.5,
) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while not await done():
        assert service.process is not None and service.process.poll() is None, service.tail()
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{service.tail()}"
        if check is not None:
            await check()
        await asyncio.sleep(poll)


@pytest.mark.orthanc
async def test_watcher_and_uploader_deliver_to_two_pacs_with_one_stopped_for_a_while(
    tmp_path: Path, series_2000: list[Path], orthanc: OrthancProcess
) -> None:
    expected = {read_part10(p).sop_instance_uid for p in series_2000}
    orthanc_before = orthanc.instance_count()
    with Storescp(tmp_path / "pacs") as pacs:
        config = write_config(
            tmp_path, {"pacs": pacs, "backup": orthanc},
            state=f"{{backend: sqlite, path: {tmp_path}/state.db}}", bus="{backend: embedded}",
        )  # fmt: skip
        service = Service(config)
        await declare_queues(service.settings)
        shutil.copytree(series_2000[0].parent, tmp_path / "inbox" / "#1-Test" / "series")
        service.start()
        samples = 0
        try:

            last_sample = 0.0

            async def nothing_archived_early(force: bool = False) -> None:
                # Archive first, receivers second: what had left the import folder must be
                # at both destinations.
                nonlocal samples, last_sample
                if not force and time.monotonic() - last_sample < 2.0:
                    return
                last_sample = time.monotonic()
                archived = archived_uids(tmp_path)
                at_orthanc = orthanc.instance_count() - orthanc_before
                assert archived <= set(pacs.uids())
                assert len(archived) <= at_orthanc
                samples += 1

            await run_until(lambda: _arrived(pacs, 600), service, 60, "a part at storescp")
            pacs.stop()
            await nothing_archived_early(force=True)
            await asyncio.sleep(3)
            await nothing_archived_early(force=True)
            pacs.start()
            await run_until(
                lambda: all_archived(tmp_path, 2000), service, 120, "every file archived",
                check=nothing_archived_early,
            )
            await nothing_archived_early(force=True)
            assert service.stop() == 0, service.tail()
        finally:
            service.stop()
        received = pacs.uids()
    assert samples >= 3
    assert set(received) == expected
    # Only files in flight when storescp went down may have arrived twice (one per association).
    assert sum(received.values()) - len(received) <= 8
    assert orthanc.instance_count() - orthanc_before == 2000
    assert not list((tmp_path / "inbox").rglob("*.dcm"))
    assert len(list((tmp_path / "archive").rglob("*.dcm"))) == 2000


@pytest.mark.rabbit
@pytest.mark.postgres
async def test_killed_service_on_rabbitmq_and_postgres_resumes_and_sends_each_file_once(
    tmp_path: Path, series_2000: list[Path], pg_dsn: str, rabbit_url: str, unique_prefix: str
) -> None:
    with Storescp(tmp_path / "pacs") as pacs:
        config = write_config(
            tmp_path, {"pacs": pacs},
            state=f"{{backend: postgres, dsn: '{pg_dsn}'}}",
            bus=f"{{backend: rabbitmq, url: '{rabbit_url}', queue_prefix: {unique_prefix},"
            f" exchange: {unique_prefix}.events}}",
        )  # fmt: skip
        service = Service(config)
        await declare_queues(service.settings)
        shutil.copytree(series_2000[0].parent, tmp_path / "inbox" / "#2-Test" / "series")
        service.start()
        try:
            async with ledger_of(service.settings) as db:
                # 2,000 small files take about a second: look often, to kill mid-run.
                await run_until(lambda: _arrived(pacs, 100), service, 90, "a part to arrive",
                                poll=0.01)
                service.kill()
                at_kill = sum(pacs.uids().values())
                service.start()
                await run_until(
                    lambda: all_archived(tmp_path, 2000), service, 120, "every file archived"
                )
                taken_back = service.metric("pacsflow_uploader_retries_total",
                                            destination="pacs", reason="interrupted")
                rows = await db.fetch(
                    "SELECT status, count(*) AS n FROM ledger_deliveries GROUP BY status"
                )
            assert service.stop() == 0, service.tail()
        finally:
            service.stop()
        received = pacs.uids()
    assert 100 <= at_kill < 2000
    assert len(received) == 2000
    # A kill leaves its chunks in flight in doubt; only those can arrive twice.
    twice = sum(received.values()) - len(received)
    assert twice <= taken_back
    assert {(r["status"], r["n"]) for r in rows} == {("sent", 2000)}


async def _arrived(pacs: Storescp, count: int) -> bool:
    return len(pacs.files()) >= count

