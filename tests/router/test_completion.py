"""Study completion on SQLite and the memory bus: claims, crashes, re-opening, counting."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pacsflow.bus import MemoryBus
from pacsflow.errors import BusError
from pacsflow.events import Event, Source, StudyComplete, encode_event
from pacsflow.store import SqliteDatabase, upgrade
from pacsflow_router.collector import Stored
from pacsflow_router.completion import Completer
from pacsflow_router.metrics import RouterMetrics
from pacsflow_router.studies import StudyStore, StudyUpdates
from prometheus_client import CollectorRegistry

from tests.router.support import router_settings, running_router

SOURCE = Source(service="router-scp", instance="test")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class FlakyBus(MemoryBus):
    """A memory bus whose next ``failures`` publishes fail, as when the broker is down."""

    failures = 0

    async def publish(self, *events: Event) -> None:
        if self.failures:
            self.failures -= 1
            raise BusError("broker unreachable")
        await super().publish(*events)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StudyStore]:
    db = await SqliteDatabase.open(tmp_path / "state.db")
    await upgrade(db)
    yield StudyStore(db)
    await db.close()


@pytest.fixture
async def bus() -> AsyncIterator[FlakyBus]:
    bus = FlakyBus()
    await bus.start()
    yield bus
    await bus.close()


async def _published(bus: MemoryBus) -> list[StudyComplete]:
    seen: list[StudyComplete] = []

    async def collect(event: Event) -> None:
        assert isinstance(event, StudyComplete)
        seen.append(event)

    await bus.subscribe("completiontest", ["study-complete"], collect)
    return seen


def _completer(store: StudyStore, bus: MemoryBus, clock: Clock, owner: str = "a") -> Completer:
    return Completer(
        store, bus, SOURCE, RouterMetrics(CollectorRegistry()),
        quiet_seconds=10, claim_timeout=30, owner=owner, clock=clock,
    )  # fmt: skip


def _files(folder: Path, count: int, start: int = 0) -> list[Stored]:
    """Write ``count`` instance files into ``folder`` and the records a receiver reports."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for number in range(start, start + count):
        path = folder / f"1.2.3.{number}.dcm"
        path.write_bytes(b"x")
        records.append(
            Stored(
                route="MRI", study_instance_uid="1.2.3", series_instance_uid="1.2.3.9",
                sop_instance_uid=f"1.2.3.{number}", sop_class_uid="1.2", transfer_syntax_uid="1.2",
                patient_id="P1", study_description="Brain", study_folder=str(folder.parent),
                series_folder=str(folder), path=str(path), size=1, received_at=time.time(),
            )
        )  # fmt: skip
    return records


async def _record(store: StudyStore, records: list[Stored]) -> None:
    updates = StudyUpdates()
    updates.add(records)
    await store.record(updates.take())


async def _wait(seen: list[StudyComplete], count: int) -> None:
    import asyncio

    async with asyncio.timeout(5):
        while len(seen) < count:
            await asyncio.sleep(0.02)


class TestCompletion:
    async def test_a_quiet_study_is_reported_once(
        self, store: StudyStore, bus: FlakyBus, tmp_path: Path
    ) -> None:
        seen = await _published(bus)
        clock = Clock()
        await _record(store, _files(tmp_path / "s1", 5))
        completer = _completer(store, bus, clock)
        assert await completer.sweep() == 0  # not quiet yet
        clock.now += 11
        assert await completer.sweep() == 1
        assert await completer.sweep() == 0
        await _wait(seen, 1)
        payload = seen[0].payload
        assert (payload.files_received, payload.files_new, payload.completion) == (5, 5, 1)
        assert payload.study_description == "Brain"

    async def test_two_sweepers_publish_one_event(
        self, store: StudyStore, bus: FlakyBus, tmp_path: Path
    ) -> None:
        import asyncio

        seen = await _published(bus)
        clock = Clock()
        await _record(store, _files(tmp_path / "s1", 3))
        clock.now += 11
        first, second = _completer(store, bus, clock, "a"), _completer(store, bus, clock, "b")
        results = await asyncio.gather(first.sweep(), second.sweep(), first.sweep(), second.sweep())
        assert sum(results) == 1
        await asyncio.sleep(0.2)
        assert len(seen) == 1

    async def test_counts_come_from_disk_when_reports_were_lost(
        self, store: StudyStore, bus: FlakyBus, tmp_path: Path
    ) -> None:
        """A crash between answering C-STOREs and flushing loses reports, not files."""
        seen = await _published(bus)
        clock = Clock()
        records = _files(tmp_path / "s1", 8)
        await _record(store, records[:3])  # five reports never reached the store
        clock.now += 11
        await _completer(store, bus, clock).sweep()
        await _wait(seen, 1)
        assert seen[0].payload.files_received == 8

    async def test_late_instances_reopen_the_study_for_a_marked_second_notice(
        self, store: StudyStore, bus: FlakyBus, tmp_path: Path
    ) -> None:
        seen = await _published(bus)
        clock = Clock()
        completer = _completer(store, bus, clock)
        await _record(store, _files(tmp_path / "s1", 4))
        clock.now += 11
        await completer.sweep()
        await _record(store, _files(tmp_path / "s1", 3, start=4))
        clock.now += 11
        row = await store.get("MRI", "1.2.3")
        assert row is not None and row["status"] == "open"
        await completer.sweep()
        await _wait(seen, 2)
        second = seen[1].payload
        assert (second.completion, second.files_new, second.files_received) == (2, 3, 7)

    async def test_instances_received_again_after_completion_tell_nobody(
        self, store: StudyStore, bus: FlakyBus, tmp_path: Path
    ) -> None:
        import asyncio

        seen = await _published(bus)
        clock = Clock()
        completer = _completer(store, bus, clock)
        records = _files(tmp_path / "s1", 4)
        await _record(store, records)
        clock.now += 11
        await completer.sweep()
        await _record(store, records[:2])  # re-sent: same files
        clock.now += 11
        await completer.sweep()
        await asyncio.sleep(0.2)
        assert len(seen) == 1
        row = await store.get("MRI", "1.2.3")
        assert row is not None and row["status"] == "notified"

    async def test_a_claim_left_by_a_crash_is_published_again_with_its_id(
        self, store: StudyStore, bus: FlakyBus, tmp_path: Path
    ) -> None:
        seen = await _published(bus)
        clock = Clock()
        await _record(store, _files(tmp_path / "s1", 2))
        row = await store.get("MRI", "1.2.3")
        assert row is not None
        # What a process that crashed right after claiming leaves behind.
        event = StudyComplete(
            source=SOURCE,
            payload={
                "route": "MRI", "study_instance_uid": "1.2.3", "patient_id": "P1",
                "files_received": 2, "files_new": 2, "storage_path": str(tmp_path),
                "first_received": "2024-01-01T00:00:00Z", "last_received": "2024-01-01T00:00:01Z",
            },
        )  # fmt: skip
        assert await store.claim(
            row,
            claim_id=str(event.id),
            claim_event=encode_event(event).decode(),
            owner="dead",
            now=clock.now,
        )
        completer = _completer(store, bus, clock, "b")
        clock.now += 11
        assert await completer.sweep() == 0  # the claim is young: its owner may still publish
        clock.now += 30
        assert await completer.sweep() == 1
        await _wait(seen, 1)
        assert seen[0].id == event.id
        assert await completer.sweep() == 0
        row = await store.get("MRI", "1.2.3")
        assert row is not None and row["status"] == "notified"

    async def test_a_publish_that_fails_is_retried_with_the_same_id(
        self, store: StudyStore, bus: FlakyBus, tmp_path: Path
    ) -> None:
        seen = await _published(bus)
        clock = Clock()
        await _record(store, _files(tmp_path / "s1", 2))
        completer = _completer(store, bus, clock)
        clock.now += 11
        bus.failures = 1
        assert await completer.sweep() == 0
        row = await store.get("MRI", "1.2.3")
        assert row is not None and row["status"] == "claimed"
        assert await completer.sweep() == 1
        await _wait(seen, 1)
        assert str(seen[0].id) == row["claim_id"]

    async def test_instances_during_publishing_reopen_after_it(
        self, store: StudyStore, bus: FlakyBus, tmp_path: Path
    ) -> None:
        seen = await _published(bus)
        clock = Clock()
        completer = _completer(store, bus, clock)
        await _record(store, _files(tmp_path / "s1", 2))
        clock.now += 11
        bus.failures = 1
        await completer.sweep()  # claimed, not published
        records = _files(tmp_path / "s1", 1, start=2)
        for record in records:
            object.__setattr__(record, "received_at", clock.now)
        await _record(store, records)
        await completer.sweep()  # publishes the claim; the study opens again
        row = await store.get("MRI", "1.2.3")
        assert row is not None and row["status"] == "open"
        clock.now += 11
        await completer.sweep()
        await _wait(seen, 2)
        assert [e.payload.completion for e in seen] == [1, 2]
        assert seen[1].payload.files_new == 1


async def test_reported_studies_are_forgotten_after_the_retention_time(
    store: StudyStore, bus: FlakyBus, tmp_path: Path
) -> None:
    clock = Clock()
    await _record(store, _files(tmp_path / "s1", 2))
    clock.now += 11
    await _completer(store, bus, clock).sweep()
    assert await store.prune(clock.now - 3600) == 0
    assert await store.prune(clock.now + 1) == 1
    assert await store.get("MRI", "1.2.3") is None
    assert await store.series_folders("MRI", "1.2.3") == []
    assert (tmp_path / "s1").is_dir()


async def test_a_storage_folder_that_cannot_be_read_fails_one_sweep_not_the_router(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A share that refuses reading for a moment (NFS, permissions being fixed): the sweep
    # reports it and the next one tries again; the router goes on receiving.
    settings = router_settings(tmp_path, {"MRI": {"path": str(tmp_path / "mri")}})
    async with running_router(settings) as harness:
        completer = harness.router.completer
        real_sweep = completer.sweep
        failures = []

        async def refused() -> int:
            failures.append(1)
            raise PermissionError(13, "Permission denied", str(tmp_path / "mri"))

        completer.sweep = refused  # type: ignore[method-assign]
        await harness.router.sweep()
        completer.sweep = real_sweep  # type: ignore[method-assign]
        await harness.router.sweep()
        assert harness.metric("pacsflow_router_sweep_failures_total", target="storage") == 1
    assert failures == [1]
    assert any("completion sweep failed" in r.getMessage() and "Permission denied"
               in r.getMessage() for r in caplog.records)  # fmt: skip
