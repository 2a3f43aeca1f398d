"""The watcher end to end in one process: real SQLite ledger, the in-memory bus, real folders."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from prometheus_client import CollectorRegistry

from pacsflow.bus import MemoryBus
from pacsflow.config import WatcherSettings
from pacsflow.errors import BusError
from pacsflow.events import Event, FileOutcome, FileOutcomePayload, FileReady, FileSent, Source
from pacsflow.store import Database, Ledger, Outcome, SqliteDatabase, upgrade
from pacsflow_watcher import watcher as watcher_module
from pacsflow_watcher.watcher import Watcher
from tests.dicom.synthetic import write_ct_series

SOURCE = Source(service="watcher", instance="test")


@dataclass
class Received:
    events: list[FileReady] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        return [f.sop_instance_uid for e in self.events for f in e.payload.files]


@dataclass
class Rig:
    watcher: Watcher
    ledger: Ledger
    bus: MemoryBus
    received: Received
    inbox: Path
    archive: Path
    quarantine: Path
    task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.watcher.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def wait_for(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received.files) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.received.files)} of {count} files announced")
            await asyncio.sleep(0.05)


async def make_db(path: Path) -> Database:
    db = await SqliteDatabase.open(path)
    await upgrade(db)
    return db


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    db = await make_db(tmp_path / "state.db")
    bus = MemoryBus()
    await bus.start()
    received = Received()

    async def collect(event: Event) -> None:
        assert isinstance(event, FileReady)
        received.events.append(event)
        received.times.append(time.monotonic())

    await bus.subscribe("uploader", ["file-ready"], collect)
    settings = WatcherSettings(
        import_folders=[tmp_path / "inbox"], archive_folder=tmp_path / "archive",
        quarantine_folder=tmp_path / "quarantine", debounce_seconds=1.0, batch_size=100,
        archive_interval_seconds=0.5,
    )
    ledger = Ledger(db)
    watcher = Watcher(settings, ledger=ledger, bus=bus, source=SOURCE, registry=CollectorRegistry())
    rig = Rig(watcher, ledger, bus, received, tmp_path / "inbox", tmp_path / "archive",
              tmp_path / "quarantine")
    yield rig
    await rig.stop()
    await bus.close()
    await db.close()


class TestDebounce:
    async def test_slow_copy_is_announced_once_after_the_quiet_period(
        self, rig: Rig, tmp_path: Path
    ) -> None:
        source = tmp_path / "source"
        write_ct_series(source, 1000)
        files = sorted(source.iterdir())
        await rig.start()
        target = rig.inbox / "#12345-HongGildong" / "series1"
        target.mkdir(parents=True)
        for start in range(0, 1000, 100):  # ten bursts, pauses shorter than the debounce
            for path in files[start:start + 100]:
                shutil.copy(path, target / path.name)
            await asyncio.sleep(0.4)
            assert rig.received.files == [], "announced before the folder was quiet"
        last_write = time.monotonic()
        await rig.wait_for(1000)
        assert min(rig.received.times) - last_write >= 1.0 - 0.45
        await asyncio.sleep(1.5)  # nothing more comes later
        assert len(rig.received.files) == 1000
        assert len(set(rig.received.files)) == 1000
        assert all(len(e.payload.files) <= 100 for e in rig.received.events)
        assert {e.payload.batch_key for e in rig.received.events} == {
            rig.received.events[0].payload.batch_key}

    async def test_rescan_finds_files_that_arrived_while_stopped(self, rig: Rig) -> None:
        write_ct_series(rig.inbox / "#1-A", 20)
        await rig.start()
        await rig.wait_for(20)
        assert len(rig.received.files) == 20


class TestBatches:
    async def test_batches_start_small_and_double_up_to_the_batch_size(self, rig: Rig) -> None:
        # The first images leave after 16 files were read, not after a whole batch (100 here).
        write_ct_series(rig.inbox / "#3-C", 250)
        await rig.start()
        await rig.wait_for(250)
        assert [len(e.payload.files) for e in rig.received.events] == [16, 32, 64, 100, 38]
        assert len(set(rig.received.files)) == 250


class TestRestart:
    async def test_restart_announces_only_what_was_not_announced(
        self, rig: Rig, tmp_path: Path
    ) -> None:
        write_ct_series(rig.inbox / "#1-A", 300)
        await rig.start()
        await rig.wait_for(300)
        await rig.stop()
        write_ct_series(rig.inbox / "#2-B", 50)
        # A file recorded but not announced before a crash (the publish never happened).
        rows = await rig.ledger.list_files(status="ready", limit=1)
        await rig.ledger._db.execute(  # noqa: SLF001 - simulating the crash window
            "UPDATE ledger_files SET announced_at = NULL WHERE id = $1", rows[0].id)
        rig.watcher = Watcher(rig.watcher.settings, ledger=rig.ledger, bus=rig.bus,
                              source=SOURCE, registry=CollectorRegistry())
        await rig.start()
        await rig.wait_for(351)
        await asyncio.sleep(1.5)
        assert len(rig.received.files) == 351  # the new folder and the one not announced
        counts = await rig.ledger.count_by_status()
        assert counts.get("ready") == 350
        assert sum(counts.values()) == 350  # one ledger row per file, never two


class RefusingBus:
    """The in-memory bus, but ``publish`` fails (a broker restarting) or never returns (a
    watcher killed before the bus confirmed) while ``mode`` says so."""

    def __init__(self, bus: MemoryBus, mode: str) -> None:
        self.bus = bus
        self.mode = mode
        self.refused = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.bus, name)

    async def publish(self, *events: Event) -> None:
        if self.mode == "refuse":
            self.refused += 1
            self.mode = "pass"
            raise BusError("broker restarting")
        if self.mode == "hang":
            await asyncio.Event().wait()
        await self.bus.publish(*events)


async def unconfirmed_batches(ledger: Ledger) -> int:
    return int(await ledger._db.fetchval("SELECT count(*) FROM ledger_announcing"))  # noqa: SLF001


class TestUnconfirmedAnnouncements:
    async def test_events_the_bus_refused_go_out_on_the_next_pass(self, rig: Rig) -> None:
        bus = RefusingBus(rig.bus, "refuse")
        rig.watcher = Watcher(rig.watcher.settings, ledger=rig.ledger, bus=bus,  # type: ignore[arg-type]
                              source=SOURCE, registry=CollectorRegistry())
        write_ct_series(rig.inbox / "#1-A", 20)
        await rig.start()
        await rig.wait_for(20)
        await asyncio.sleep(1.5)
        assert bus.refused == 1
        assert len(rig.received.files) == 20
        assert await unconfirmed_batches(rig.ledger) == 0

    async def test_a_restart_announces_what_the_bus_never_confirmed(self, rig: Rig) -> None:
        bus = RefusingBus(rig.bus, "hang")
        first = rig.watcher
        rig.watcher = Watcher(first.settings, ledger=rig.ledger, bus=bus,  # type: ignore[arg-type]
                              source=SOURCE, registry=CollectorRegistry())
        write_ct_series(rig.inbox / "#1-A", 40)
        await rig.start()
        deadline = time.monotonic() + 30
        while not await unconfirmed_batches(rig.ledger):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await rig.stop()  # killed while waiting for the bus to confirm the first batch
        assert rig.received.files == []
        assert await rig.ledger.count_files() == 16
        rig.watcher = Watcher(first.settings, ledger=rig.ledger, bus=rig.bus, source=SOURCE,
                              registry=CollectorRegistry())
        await rig.start()
        await rig.wait_for(40)
        await asyncio.sleep(1.5)
        assert len(rig.received.files) == 40
        assert await unconfirmed_batches(rig.ledger) == 0
        assert (await rig.ledger.count_by_status())["ready"] == 40


class TestMixedFolder:
    async def test_each_kind_of_file_gets_its_outcome(
        self, rig: Rig, pydicom_test_files: Path
    ) -> None:
        unit = rig.inbox / "#7-Mixed"
        good = write_ct_series(unit, 3)
        (unit / "readme.txt").write_text("not an image")
        (unit / "empty.dcm").write_bytes(b"")
        (unit / "cut.dcm").write_bytes(good[0].read_bytes()[:-3000])
        shutil.copy(pydicom_test_files / "dicomdirtests" / "DICOMDIR", unit / "DICOMDIR")
        bare_source = write_ct_series(rig.inbox.parent / "other", 1)[0]
        ds = pydicom.dcmread(bare_source)
        ds.file_meta, ds.preamble = pydicom.dataset.FileMetaDataset(), None
        ds.save_as(unit / "nopreamble.dcm", implicit_vr=True, little_endian=True,
                   enforce_file_format=False)
        await rig.start()
        await rig.wait_for(4)
        await asyncio.sleep(0.3)
        invalid = await rig.ledger.list_files(status="invalid")
        reasons = {Path(f.path).name: f.reason or "" for f in invalid}
        assert reasons["readme.txt"].startswith("not DICOM")
        assert reasons["empty.dcm"].startswith("empty file")
        assert "truncated" in reasons["cut.dcm"]
        # Invalid files went to quarantine, valid ones were announced and stay until sent.
        assert len(list(rig.quarantine.rglob("readme.txt"))) == 1
        assert not (unit / "readme.txt").exists()
        assert sorted(Path(p.path).name for e in rig.received.events for p in e.payload.files) \
            == sorted([p.name for p in good] + ["nopreamble.dcm"])
        assert all(p.exists() for p in good)
        assert not (unit / "DICOMDIR").exists()
        assert list(rig.archive.rglob("DICOMDIR"))


class TestArchive:
    async def test_only_confirmed_files_are_archived(self, rig: Rig) -> None:
        paths = write_ct_series(rig.inbox / "#9-Z" / "s", 4)
        await rig.start()
        await rig.wait_for(4)
        rows = {Path(f.path).name: f for f in await rig.ledger.list_files(status="ready")}
        ids = [rows[p.name].id for p in paths]
        await rig.ledger.add_deliveries(ids, ["pacs", "backup"])
        # Every destination confirmed the first two; the third only at one; the fourth failed.
        await rig.ledger.record_outcomes(
            [Outcome(i, d, "sent", 0) for i in ids[:2] for d in ("pacs", "backup")]
            + [Outcome(ids[2], "pacs", "sent", 0), Outcome(ids[3], "pacs", "failed", 0xA700),
               Outcome(ids[3], "backup", "sent", 0)]
        )
        await rig.bus.publish(FileSent(source=SOURCE, payload=FileOutcomePayload(files=[
            FileOutcome(path=str(paths[0]), sop_instance_uid="x", destination="pacs", status=0)
        ])))
        deadline = time.monotonic() + 10
        while len(list(rig.archive.rglob("*.dcm"))) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        archived = sorted(p.name for p in rig.archive.rglob("*.dcm"))
        assert archived == [paths[0].name, paths[1].name]
        assert not paths[0].exists() and paths[2].exists() and paths[3].exists()
        # The archive keeps the import folder's structure under a time-stamped folder.
        moved = next(rig.archive.rglob(paths[0].name))
        assert moved.relative_to(rig.archive).parts[1:] == ("#9-Z", "s", paths[0].name)
        counts = await rig.ledger.count_by_status()
        assert counts.get("archived") == 2

    async def test_file_sent_events_waiting_together_share_one_archive_pass(
        self, rig: Rig
    ) -> None:
        paths = write_ct_series(rig.inbox / "#10-Y", 6)
        await rig.start()
        await rig.wait_for(6)
        rows = {Path(f.path).name: f for f in await rig.ledger.list_files(status="ready")}
        ids = [rows[p.name].id for p in paths]
        await rig.ledger.add_deliveries(ids, ["pacs"])
        event = FileSent(source=SOURCE, payload=FileOutcomePayload(files=[
            FileOutcome(path=str(paths[0]), sop_instance_uid="x", destination="pacs", status=0)
        ]))
        watcher = rig.watcher
        async with watcher._archive_lock:  # noqa: SLF001 - a pass is running meanwhile
            first = asyncio.create_task(watcher._on_file_sent(event))  # noqa: SLF001
            await asyncio.sleep(0.05)
            await rig.ledger.record_outcomes([Outcome(i, "pacs", "sent", 0) for i in ids])
            # The first is still waiting: the second's outcomes are left to its pass.
            await asyncio.wait_for(watcher._on_file_sent(event), 1)  # noqa: SLF001
            assert not first.done()
        assert await asyncio.wait_for(first, 10) is None
        assert sorted(p.name for p in rig.archive.rglob("*.dcm")) == sorted(p.name for p in paths)
        assert (await rig.ledger.count_by_status()).get("archived") == 6


class TestDuplicates:
    @pytest.mark.parametrize("read_whole", [True, False], ids=["in-memory", "streamed"])
    async def test_a_sent_file_dropped_again_is_set_aside_a_changed_one_is_sent(
        self, rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_whole: bool
    ) -> None:
        # Small files are validated and hashed from one read; large ones stream from the file
        # and are hashed only when an instance with their UID was sent before.
        monkeypatch.setattr(watcher_module, "_READ_WHOLE_UP_TO", 1 << 30 if read_whole else 0)
        originals = write_ct_series(tmp_path / "originals", 2)
        shutil.copytree(originals[0].parent, rig.inbox / "#1-A")
        await rig.start()
        await rig.wait_for(2)
        rows = await rig.ledger.list_files(status="ready")
        hashes = sorted(hashlib.sha256(path.read_bytes()).hexdigest() for path in originals)
        assert sorted(row.sha256 or "" for row in rows) == (hashes if read_whole else ["", ""])
        await rig.ledger.add_deliveries([row.id for row in rows], ["pacs"])
        await rig.ledger.record_outcomes([Outcome(row.id, "pacs", "sent", 0) for row in rows])

        again = rig.inbox / "#1-A-again"
        again.mkdir()
        shutil.copy(originals[0], again / "same.dcm")
        changed = bytearray(originals[1].read_bytes())
        changed[-1] ^= 0xFF  # the same SOP Instance UID, one pixel different
        (again / "changed.dcm").write_bytes(changed)
        await rig.wait_for(3)
        announced = [Path(f.path).name for e in rig.received.events for f in e.payload.files]
        assert announced.count("changed.dcm") == 1 and "same.dcm" not in announced
        duplicates = await rig.ledger.list_files(status="duplicate")
        assert [Path(row.path).name for row in duplicates] == ["same.dcm"]
        assert "already sent" in (duplicates[0].reason or "")
        assert not (again / "same.dcm").exists() and list(rig.archive.rglob("same.dcm"))
        # The originals were hashed where they are now to be compared, and the hashes kept.
        kept = await rig.ledger.get_files(row.id for row in rows)
        assert sorted(row.sha256 for row in kept) == hashes

    async def test_a_copy_whose_original_is_gone_is_sent(
        self, rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A large file was never hashed; once its archive is cleared its content is gone, so
        # a file with its SOP Instance UID cannot be called a copy of it.
        monkeypatch.setattr(watcher_module, "_READ_WHOLE_UP_TO", 0)
        [original] = write_ct_series(tmp_path / "originals", 1)
        shutil.copytree(original.parent, rig.inbox / "#1-A")
        await rig.start()
        await rig.wait_for(1)
        [row] = await rig.ledger.list_files(status="ready")
        await rig.ledger.record_outcomes([Outcome(row.id, "pacs", "sent", 0)])
        await rig.ledger.mark_archived({row.id: str(tmp_path / "purged" / "a.dcm")})
        os.unlink(row.path)
        again = rig.inbox / "#1-A-again"
        again.mkdir()
        shutil.copy(original, again / "same.dcm")
        await rig.wait_for(2)
        assert [Path(f.path).name for f in rig.received.events[-1].payload.files] == ["same.dcm"]
        assert await rig.ledger.count_files(status="duplicate") == 0


class TestInspect:
    def test_a_file_larger_than_the_hash_block_is_hashed_whole(self, tmp_path: Path) -> None:
        # 1024 x 1024 x 16 bits: 2 MiB of pixel data, more than one block of the hash buffer.
        (path,) = write_ct_series(tmp_path, 1, rows=1024, columns=1024)
        assert path.stat().st_size > 2 * watcher_module._HASH_BLOCK
        verdict, stat, sha = watcher_module._inspect(path)
        assert verdict.outcome == "valid" and stat.st_size == path.stat().st_size
        assert sha is None  # validated from its headers; hashed only when a copy needs it
        digest = watcher_module._hash_file(str(path))
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
        assert watcher_module._hash_file(str(tmp_path / "gone.dcm")) is None


class TestMove:
    def test_a_move_to_another_file_system_copies_never_overwrites(self, tmp_path: Path) -> None:
        # An archive on another disk than the import folder: rename fails with EXDEV.
        with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
            assert os.stat(other).st_dev != tmp_path.stat().st_dev
            first, second = Path(other) / "a.dcm", Path(other) / "b" / "a.dcm"
            second.parent.mkdir()
            first.write_bytes(b"first")
            second.write_bytes(b"second")
            made: set[str] = set()
            target = tmp_path / "archive" / "stamp" / "a.dcm"
            moved = [Path(watcher_module._move(p, target, made)) for p in (first, second)]
            assert not first.exists() and not second.exists()
        assert [p.name for p in moved] == ["a.dcm", "a.1.dcm"]
        assert [p.read_bytes() for p in moved] == [b"first", b"second"]
        assert made == {str(target.parent)}
