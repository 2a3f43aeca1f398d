"""The watcher as its own process: killed mid-folder and started again, and identity rewrite."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
from prometheus_client import CollectorRegistry

from pacsflow.bus import EmbeddedBus
from pacsflow.config import BusSettings
from pacsflow.events import Event, FileReady
from tests.dicom.synthetic import write_ct_series
from tests.peers import free_port


def config(tmp_path: Path, **watcher: str) -> Path:
    extra = "".join(f"\n  {key}: '{value}'" for key, value in watcher.items())
    path = tmp_path / "pacsflow.yaml"
    path.write_text(f"""
http: {{host: 127.0.0.1, port: {free_port()}}}
state: {{path: {tmp_path}/state.db}}
watcher:
  import_folders: [{tmp_path}/inbox]
  archive_folder: {tmp_path}/archive
  quarantine_folder: {tmp_path}/quarantine
  debounce_seconds: 0.2{extra}
""")
    return path


def start(config_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "pacsflow", "-c", str(config_path), "watcher"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ledger_counts(db: Path) -> tuple[int, int]:
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute(
                "SELECT count(*), count(announced_at) FROM ledger_files").fetchone()
    except sqlite3.OperationalError:
        return 0, 0  # not created yet


async def announced_files(db: Path, expected: int, timeout: float = 60) -> list[FileReady]:
    """Consume the uploader's queue in the state file until ``expected`` distinct files came."""
    events: list[FileReady] = []

    async def collect(event: Event) -> None:
        assert isinstance(event, FileReady)
        events.append(event)

    bus = EmbeddedBus(db, BusSettings(), registry=CollectorRegistry())
    await bus.start()
    await bus.subscribe("uploader", ["file-ready"], collect)
    deadline = time.monotonic() + timeout
    while len({f.sop_instance_uid for e in events for f in e.payload.files}) < expected:
        assert time.monotonic() < deadline, "not every file was announced"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # anything more would come now
    await bus.close()
    return events


async def declare_uploader_queue(db: Path) -> None:
    # The uploader's queue exists before the watcher publishes, as in a real deployment.
    bus = EmbeddedBus(db, BusSettings(), registry=CollectorRegistry())
    await bus.start()
    await bus.declare("uploader", ["file-ready"])
    await bus.close()


class TestKilledMidFolder:
    async def test_sigkill_then_restart_misses_nothing_and_records_nothing_twice(
        self, tmp_path: Path
    ) -> None:
        cfg = config(tmp_path)
        db = tmp_path / "state.db"
        write_ct_series(tmp_path / "inbox" / "#1-Big" / "s1", 3000)
        await declare_uploader_queue(db)
        first = start(cfg)
        try:
            deadline = time.monotonic() + 60
            while ledger_counts(db)[0] == 0:  # killed once the folder is being recorded
                assert time.monotonic() < deadline and first.poll() is None
                await asyncio.sleep(0.01)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
        second = start(cfg)
        try:
            events = await announced_files(db, 3000)
        finally:
            second.terminate()
            assert second.wait(timeout=30) == 0
        uids = [f.sop_instance_uid for e in events for f in e.payload.files]
        assert len(set(uids)) == 3000
        # Only a kill between a publish and its record in the ledger repeats an announcement.
        assert len(uids) <= 2 * 3000
        rows, announced = ledger_counts(db)
        assert rows == 3000 and announced == 3000
        with sqlite3.connect(db, timeout=5) as conn:
            # Every batch confirmed, the one the kill left behind included.
            assert conn.execute("SELECT count(*) FROM ledger_announcing").fetchone() == (0,)


class TestIdentityRewrite:
    async def test_folder_name_sets_patient_identity(self, tmp_path: Path) -> None:
        cfg = config(tmp_path, rename_pattern=r"^#([0-9]+)-([#^\w]+)$")
        db = tmp_path / "state.db"
        ascii_files = write_ct_series(tmp_path / "inbox" / "#00001-Kim#Young^Hee", 3)
        korean_files = write_ct_series(tmp_path / "inbox" / "#12345-홍길동", 2)
        await declare_uploader_queue(db)
        process = start(cfg)
        try:
            await announced_files(db, 5)
        finally:
            process.terminate()
            process.wait(timeout=30)
        for path in ascii_files:
            ds = pydicom.dcmread(path)
            assert (ds.PatientID, str(ds.PatientName)) == ("00001", "Kim#Young^Hee")
        for path in korean_files:
            ds = pydicom.dcmread(path)
            assert (ds.PatientID, str(ds.PatientName)) == ("12345", "홍길동")
            assert ds.SpecificCharacterSet == "ISO_IR 192"
