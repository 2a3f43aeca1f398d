"""The uploader service in-process: a real SQLite ledger, the memory bus, real peers."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pacsflow.bus import MemoryBus
from pacsflow.config import Node, UploaderSettings
from pacsflow.dicom import StoreSCP, read_part10
from pacsflow.errors import StoreError
from pacsflow.events import FileFailed, FileSent
from pacsflow.store import Database, Ledger
from pacsflow_uploader.deliveries import DeliveryQueue

from tests.dicom.synthetic import write_ct_series
from tests.peers import OrthancProcess, free_port
from tests.uploader.support import (
    MR_ONLY_PROFILE,
    Storescp,
    UploaderRig,
    ready_files,
    sample,
    wait_until,
)
from tests.uploader.test_deliveries import dead_owner

pytestmark = pytest.mark.dcmtk


def settings(**values: object) -> UploaderSettings:
    base: dict[str, object] = {
        "destinations": [], "associations": 2, "processes": 0, "chunk_size": 16,
        "max_attempts": 3, "retry_initial_seconds": 0.2, "retry_max_seconds": 1.0,
    }  # fmt: skip
    base.update(values)
    return UploaderSettings(**base)  # type: ignore[arg-type]


def files_at(registry: object, destination: str, status: str) -> float:
    return sample(registry, "pacsflow_uploader_files_total",  # type: ignore[arg-type]
                  destination=destination, status=status)


async def test_every_file_reaches_both_destinations_once_and_is_reported(
    db: Database, bus: MemoryBus, tmp_path: Path, series_2000: list[Path],
    orthanc: OrthancProcess,
) -> None:  # fmt: skip
    paths = series_2000[:600]
    before = orthanc.instance_count()
    with Storescp(tmp_path / "pacs") as pacs:
        rig = UploaderRig(db, bus, settings(destinations=["pacs", "backup"], processes=2),
                          {"pacs": pacs.node, "backup": orthanc.node})
        await rig.collect()
        await rig.start()
        try:
            await rig.announce(paths)
            await wait_until(lambda: rig.settled("pacs", 600), 60, "pacs")
            await wait_until(lambda: rig.settled("backup", 600), 60, "backup")
            await wait_until(
                lambda: asyncio.sleep(0, len(rig.reported("file-sent")) >= 1200), 10, "events"
            )
        finally:
            await rig.stop()
        received = pacs.uids()
    expected = {read_part10(p).sop_instance_uid for p in paths}
    assert set(received) == expected and set(received.values()) == {1}
    assert orthanc.instance_count() - before == 600
    for name in ("pacs", "backup"):
        assert await rig.deliveries(name) == {"sent": 600}
        assert Counter(rig.reported("file-sent", name)) == Counter(str(p) for p in paths)
        assert files_at(rig.registry, name, "sent") == 600
        assert sample(rig.registry, "pacsflow_uploader_bytes_total", destination=name,
                      status="sent") == sum(p.stat().st_size for p in paths)
        assert sample(rig.registry, "pacsflow_uploader_store_seconds_count",
                      destination=name) == 600
        assert sample(rig.registry, "pacsflow_uploader_delivery_seconds_count",
                      destination=name) == 600
    assert rig.reported("file-failed") == []
    assert (await Ledger(db).count_by_status())["sent"] == 600
    # One event per batch of outcomes, not one per file.
    assert len([e for e in rig.events if isinstance(e, FileSent)]) < 100


async def test_each_kind_of_destination_trouble_ends_in_its_own_state(
    db: Database, bus: MemoryBus, tmp_path: Path, pydicom_test_files: Path
) -> None:
    """Refused SOP class, failure status, warning status, unreachable: each ends where it
    should, and a healthy destination gets the whole batch meanwhile."""
    ct = write_ct_series(tmp_path / "ct", 200)
    mr = tmp_path / "mr" / "MR_small.dcm"
    mr.parent.mkdir()
    shutil.copy(pydicom_test_files / "MR_small.dcm", mr)
    paths = [*ct, mr]
    warned: list[str] = []

    def warn(instance: object) -> int:
        warned.append(instance.sop_instance_uid)  # type: ignore[attr-defined]
        return 0xB007

    with (
        Storescp(tmp_path / "good") as good,
        Storescp(tmp_path / "mr-only", profile=MR_ONLY_PROFILE) as mr_only,
        Storescp(tmp_path / "broken") as broken,
        StoreSCP(warn, ae_title="COERCING", host="127.0.0.1") as coercing,
    ):
        # storescp answers "out of resources" (0xA700) when it cannot write a file.
        shutil.rmtree(broken.folder)
        nodes = {
            "good": good.node, "mr-only": mr_only.node, "broken": broken.node,
            "coercing": Node(ae_title="COERCING", host="127.0.0.1", port=coercing.port),
            "gone": Node(ae_title="GONE", host="127.0.0.1", port=free_port()),
        }  # fmt: skip
        rig = UploaderRig(db, bus, settings(max_attempts=2), nodes)
        await rig.collect()
        await rig.start()
        started = time.monotonic()
        try:
            await rig.announce(paths, destinations=list(nodes))
            await wait_until(lambda: rig.settled("good", 201), 30, "the healthy destination")
            good_done = time.monotonic() - started
            for name in ("mr-only", "broken", "coercing"):
                await wait_until(lambda n=name: rig.settled(n, 201), 30, name)
            await wait_until(
                lambda: asyncio.sleep(0, len(rig.reported("file-failed")) >= 401), 10, "events"
            )
        finally:
            await rig.stop()
        # After the stop: the unreachable destination tries again every second or so, and
        # between a claim and its settlement its files are "sending"; stopping settles that.
        gone = await rig.deliveries("gone")
        received_good = good.uids()

    assert good_done < 15
    assert len(received_good) == 201
    assert await rig.deliveries("good") == {"sent": 201}
    # A refused presentation context: unsupported at once, never tried again.
    assert await rig.deliveries("mr-only") == {"unsupported": 200, "sent": 1}
    refused = await db.fetch(
        "SELECT attempts, dimse_status, last_error FROM ledger_deliveries"
        " WHERE destination = 'mr-only' AND status = 'unsupported'"
    )
    assert {(r["attempts"], r["dimse_status"]) for r in refused} == {(1, None)}
    assert "accepted no presentation context" in refused[0]["last_error"]
    # A failure status: retried with backoff up to max_attempts, then failed.
    assert await rig.deliveries("broken") == {"failed": 201}
    failed = await db.fetch(
        "SELECT DISTINCT attempts, dimse_status FROM ledger_deliveries"
        " WHERE destination = 'broken'"
    )
    assert [(r["attempts"], r["dimse_status"]) for r in failed] == [(2, 0xA700)]
    # A warning: stored, with the warning kept.
    assert await rig.deliveries("coercing") == {"warning": 201}
    assert len(warned) == 201
    warning = await db.fetchrow(
        "SELECT dimse_status, last_error FROM ledger_deliveries WHERE destination = 'coercing'"
    )
    assert warning is not None and warning["dimse_status"] == 0xB007
    assert "0xB007" in warning["last_error"]
    # Unreachable: files wait, no attempt used, the destination rests.
    assert gone == {"pending": 201}
    waiting = await db.fetch(
        "SELECT DISTINCT attempts, last_error FROM ledger_deliveries WHERE destination = 'gone'"
    )
    assert {r["attempts"] for r in waiting} == {0}
    assert any("connection refused" in (r["last_error"] or "") for r in waiting)
    # Files with any failure or refusal are not "sent"; the rest of the ledger agrees.
    assert (await Ledger(db).count_by_status())["sent"] == 0

    registry = rig.registry
    assert files_at(registry, "good", "sent") == 201
    assert files_at(registry, "mr-only", "unsupported") == 200
    assert files_at(registry, "broken", "failed") == 201
    assert sample(registry, "pacsflow_uploader_retries_total", destination="broken",
                  reason="failure-status") == 201
    assert files_at(registry, "coercing", "warning") == 201
    assert sample(registry, "pacsflow_uploader_association_failures_total",
                  destination="gone") >= 1
    assert sample(registry, "pacsflow_uploader_destination_paused", destination="gone") == 1
    assert files_at(registry, "gone", "sent") == 0
    failed_events = [f for e in rig.events if isinstance(e, FileFailed) for f in e.payload.files]
    assert Counter(f.destination for f in failed_events) == {"mr-only": 200, "broken": 201}
    assert {f.status for f in failed_events if f.destination == "broken"} == {0xA700}
    assert len(rig.reported("file-sent", "coercing")) == 201


async def test_pacs_stopped_mid_run_gets_everything_after_it_is_back(
    db: Database, bus: MemoryBus, tmp_path: Path, series_2000: list[Path]
) -> None:
    pacs = Storescp(tmp_path / "pacs").start()
    try:
        rig = UploaderRig(db, bus, settings(destinations=["pacs"], processes=2, chunk_size=32),
                          {"pacs": pacs.node})
        await rig.collect()
        await rig.start()
        try:
            await rig.announce(series_2000)
            await wait_until(
                lambda: asyncio.sleep(0, len(pacs.files()) >= 500), 30, "a quarter to arrive"
            )
            pacs.stop()
            await asyncio.sleep(2.0)
            while_down = await rig.deliveries("pacs")
            pacs.start()
            await wait_until(lambda: rig.settled("pacs", 2000), 90, "every file")
        finally:
            await rig.stop()
        received = pacs.uids()
    finally:
        pacs.stop()
    assert while_down.get("pending", 0) > 0, while_down
    assert await rig.deliveries("pacs") == {"sent": 2000}
    assert len(received) == 2000
    # A file can only arrive twice when it was in flight as the PACS stopped (the peer had
    # it, the answer was lost): at most one per association, each sent again in doubt.
    twice = {uid for uid, n in received.items() if n > 1}
    assert len(twice) <= 2
    retried = {
        row["sop_instance_uid"]
        for row in await db.fetch(
            "SELECT f.sop_instance_uid FROM ledger_files f JOIN ledger_deliveries d"
            " ON d.file_id = f.id WHERE d.attempts > 1"
        )
    }
    assert twice <= retried
    assert sample(rig.registry, "pacsflow_uploader_association_failures_total",
                  destination="pacs") >= 1


async def test_restarted_uploader_sends_nothing_twice(
    db: Database, bus: MemoryBus, tmp_path: Path, series_2000: list[Path]
) -> None:
    with Storescp(tmp_path / "pacs") as pacs:
        rig = UploaderRig(db, bus, settings(destinations=["pacs"], processes=2),
                          {"pacs": pacs.node})
        await rig.collect()
        await rig.start()
        await rig.announce(series_2000)
        await wait_until(lambda: asyncio.sleep(0, len(pacs.files()) >= 700), 30, "some files")
        await rig.stop()
        stopped_with = len(pacs.files())
        # What was claimed ahead and not sent went back as it was: pending, no attempt used,
        # not in doubt; nothing stays claimed.
        left = await db.fetch(
            "SELECT status, attempts, in_doubt, claimed_by FROM ledger_deliveries"
            " WHERE status NOT IN ('sent', 'warning')"
        )
        assert {(r["status"], r["attempts"], r["in_doubt"], r["claimed_by"]) for r in left} == {
            ("pending", 0, 0, None)}
        await rig.start()
        try:
            await wait_until(lambda: rig.settled("pacs", 2000), 60, "every file")
        finally:
            await rig.stop()
        received = pacs.uids()
    assert 700 <= stopped_with < 2000
    assert len(received) == 2000 and set(received.values()) == {1}
    # Stopping recorded every chunk it had in flight: nothing was left to take back.
    assert sample(rig.registry, "pacsflow_uploader_retries_total", destination="pacs",
                  reason="interrupted") == 0
    assert len(rig.reported("file-sent")) == 2000


class _DatabaseShuttingDown(DeliveryQueue):
    """A ledger whose database is going down just as an idle sender loop asks it."""

    failures = 0

    async def next_due(self, destination: str) -> float | None:
        if _DatabaseShuttingDown.failures < 2:
            _DatabaseShuttingDown.failures += 1
            raise StoreError("PostgreSQL: CannotConnectNowError: the database system is"
                             " shutting down")  # fmt: skip
        return await super().next_due(destination)


async def test_idle_sender_loop_rides_out_the_database_going_down(
    db: Database, bus: MemoryBus, tmp_path: Path, series_2000: list[Path]
) -> None:
    paths = series_2000[:20]
    with Storescp(tmp_path / "pacs") as pacs:
        rig = UploaderRig(db, bus, settings(destinations=["pacs"]), {"pacs": pacs.node},
                          queue_class=_DatabaseShuttingDown)  # fmt: skip
        await rig.collect()
        await rig.start()
        try:
            await wait_until(lambda: asyncio.sleep(0, _DatabaseShuttingDown.failures >= 1), 10,
                             "the idle loop asking the database")  # fmt: skip
            await rig.announce(paths)
            await wait_until(lambda: rig.settled("pacs", 20), 30, "the files")
            assert rig.task is not None and not rig.task.done()
        finally:
            await rig.stop()
        assert len(pacs.files()) == 20


async def test_redelivered_file_ready_sends_nothing_again(
    db: Database, bus: MemoryBus, tmp_path: Path, series_2000: list[Path]
) -> None:
    paths = series_2000[:20]
    with Storescp(tmp_path / "pacs", fork=False) as pacs:
        rig = UploaderRig(db, bus, settings(destinations=["pacs"], associations=1),
                          {"pacs": pacs.node})
        await rig.collect()
        await rig.start()
        try:
            await rig.announce(paths)
            await wait_until(lambda: rig.settled("pacs", 20), 20, "the files")
            await rig.announce(paths)
            await rig.announce(paths, destinations=["pacs"])
            await asyncio.sleep(1.0)
            assert await bus.queue_depths() == {} or sum(
                (await bus.queue_depths()).values()) == 0
        finally:
            await rig.stop()
        assert len(pacs.files()) == 20
    assert files_at(rig.registry, "pacs", "sent") == 20


async def test_file_ready_for_an_unknown_destination_is_dead_lettered(
    db: Database, bus: MemoryBus, tmp_path: Path
) -> None:
    paths = write_ct_series(tmp_path / "ct", 2)
    rig = UploaderRig(db, bus, settings(destinations=["pacs"]),
                      {"pacs": Node(ae_title="X", host="127.0.0.1", port=free_port())})
    await rig.collect()
    await rig.start()
    try:
        await rig.announce(paths, destinations=["nowhere"])
        await wait_until(lambda: _has_dead_letter(bus), 10, "the dead letter")
    finally:
        await rig.stop()
    (letter,) = await bus.dead_letters("uploader")
    assert "nowhere" in letter.reason
    assert await db.fetchval("SELECT count(*) FROM ledger_deliveries") == 0


async def _has_dead_letter(bus: MemoryBus) -> bool:
    return bool(await bus.dead_letters("uploader"))


async def test_high_load_pauses_taking_work_until_it_drops(
    db: Database, bus: MemoryBus, tmp_path: Path
) -> None:
    paths = write_ct_series(tmp_path / "ct", 10)
    load = {"now": 9.0}
    with Storescp(tmp_path / "pacs", fork=False) as pacs:
        rig = UploaderRig(db, bus, settings(destinations=["pacs"], associations=1),
                          {"pacs": pacs.node}, load=lambda: load["now"])
        await rig.collect()
        await rig.start()
        try:
            await rig.announce(paths)
            await wait_until(lambda: _pending(rig, 10), 10, "the files to be scheduled")
            await asyncio.sleep(1.0)
            assert await rig.deliveries("pacs") == {"pending": 10}
            assert sample(rig.registry, "pacsflow_uploader_paused") == 1
            load["now"] = 0.5
            await wait_until(lambda: rig.settled("pacs", 10), 20, "the files")
        finally:
            await rig.stop()
        assert len(pacs.files()) == 10
    assert sample(rig.registry, "pacsflow_uploader_paused") == 0


async def _pending(rig: UploaderRig, count: int) -> bool:
    return (await rig.deliveries("pacs")).get("pending", 0) == count


@pytest.mark.orthanc
async def test_interrupted_send_found_at_the_destination_is_not_sent_again(
    db: Database, bus: MemoryBus, tmp_path: Path, orthanc: OrthancProcess
) -> None:
    """After a crash, with verify_in_doubt, C-FIND tells which files already arrived."""
    arrived, missing = write_ct_series(tmp_path / "ct", 2)
    orthanc.upload([arrived])
    # A previous uploader process claimed both and died before recording anything.
    crashed = DeliveryQueue(db, owner=dead_owner())
    await crashed.schedule(ready_files([arrived, missing]), ["pacs"], "b1")
    assert len(await crashed.claim("pacs", 10)) == 2
    before = orthanc.instance_count()
    rig = UploaderRig(db, bus, settings(destinations=["pacs"], verify_in_doubt=True),
                      {"pacs": orthanc.node})
    await rig.collect()
    await rig.start()
    try:
        await wait_until(lambda: rig.settled("pacs", 2), 30, "both files")
    finally:
        await rig.stop()
    assert files_at(rig.registry, "pacs", "verified") == 1
    assert files_at(rig.registry, "pacs", "sent") == 1
    assert sample(rig.registry, "pacsflow_uploader_retries_total", destination="pacs",
                  reason="interrupted") == 2
    assert orthanc.instance_count() - before == 1
    rows = {
        r["path"]: r["last_error"]
        for r in await db.fetch(
            "SELECT f.path, d.last_error FROM ledger_deliveries d JOIN ledger_files f"
            " ON f.id = d.file_id"
        )
    }
    assert "C-FIND" in rows[str(arrived)]
    assert rows[str(missing)] is None
    assert sorted(rig.reported("file-sent")) == sorted([str(arrived), str(missing)])


class _WatchedQueue(DeliveryQueue):
    """Counts how many file-ready events are being scheduled at once."""

    running = 0
    most = 0

    async def schedule(self, *args: Any, **kwargs: Any) -> Any:
        type(self).running += 1
        type(self).most = max(type(self).most, type(self).running)
        try:
            await asyncio.sleep(0.01)  # as a database under load would take
            return await super().schedule(*args, **kwargs)
        finally:
            type(self).running -= 1


class _PartsQueue(DeliveryQueue):
    """Keeps how many files each schedule call was given."""

    parts: list[int] = []

    async def schedule(self, files: Any, *args: Any, **kwargs: Any) -> Any:
        type(self).parts.append(len(files))
        return await super().schedule(files, *args, **kwargs)


async def test_an_idle_destination_gets_the_head_of_a_batch_scheduled_first(
    db: Database, bus: MemoryBus, tmp_path: Path, series_2000: list[Path]
) -> None:
    """Sending starts after a short statement for the first chunks, not after the whole
    batch was scheduled; a batch not much larger than that head goes in one."""
    _PartsQueue.parts = []
    with Storescp(tmp_path / "pacs") as pacs:
        rig = UploaderRig(db, bus, settings(destinations=["pacs"], chunk_size=16),
                          {"pacs": pacs.node}, queue_class=_PartsQueue)  # fmt: skip
        await rig.collect()
        await rig.start()
        try:
            await rig.announce(series_2000[:200])
            await wait_until(lambda: rig.settled("pacs", 200), 30, "the first batch")
            await rig.announce(series_2000[200:260])
            await wait_until(lambda: rig.settled("pacs", 260), 30, "the second batch")
        finally:
            await rig.stop()
        assert len(pacs.files()) == 260
    # Two chunks of 16 first, then the rest; 60 files are no more than twice the head.
    assert _PartsQueue.parts == [32, 168, 60]


async def test_file_ready_events_are_scheduled_one_after_the_other(
    db: Database, bus: MemoryBus, tmp_path: Path, series_2000: list[Path]
) -> None:
    """The bus hands over several events at once; scheduled together they would share the
    database and the first batch would wait for all of them before it could be sent."""
    paths = series_2000[:100]
    _WatchedQueue.most = 0
    with Storescp(tmp_path / "pacs", fork=False) as pacs:
        rig = UploaderRig(db, bus, settings(destinations=["pacs"], associations=1),
                          {"pacs": pacs.node}, queue_class=_WatchedQueue)  # fmt: skip
        await rig.collect()
        await rig.start()
        try:
            await rig.announce(paths, per_event=10)
            await wait_until(lambda: rig.settled("pacs", 100), 30, "the files")
        finally:
            await rig.stop()
        assert len(pacs.files()) == 100
    assert _WatchedQueue.most == 1


class _HeldQueue(DeliveryQueue):
    """Schedules nothing until the test lets it (a slow database)."""

    released: asyncio.Event

    async def schedule(self, *args: Any, **kwargs: Any) -> Any:
        await type(self).released.wait()
        return await super().schedule(*args, **kwargs)


async def test_an_idle_destination_associates_while_the_work_is_scheduled(
    db: Database, bus: MemoryBus, tmp_path: Path, series_2000: list[Path]
) -> None:
    """The first chunk of a batch finds its association open: it was asked for when the
    file-ready event came, not after the files were scheduled and claimed."""
    from tests.dicom.engine.conftest import RecordingHandler, make_server

    paths = series_2000[:5]
    _HeldQueue.released = asyncio.Event()
    handler = RecordingHandler()
    server = make_server(handler).start()
    node = Node(ae_title="ENGINE", host="127.0.0.1", port=server.port)
    rig = UploaderRig(db, bus, settings(destinations=["engine"], associations=1, processes=1),
                      {"engine": node}, queue_class=_HeldQueue)  # fmt: skip
    try:
        await rig.collect()
        await rig.start()
        try:
            await rig.announce(paths)
            # Not one file scheduled yet, and the association is there.
            assert await asyncio.to_thread(handler.wait_outcome, "accepted", "", 10.0)
            assert handler.stores == 0
            _HeldQueue.released.set()
            await wait_until(lambda: rig.settled("engine", 5), 30, "the files")
        finally:
            await rig.stop()
    finally:
        server.stop(grace=1)
        server.listener.close()
    assert handler.stores == 5
    # The chunk went over the association opened ahead: one in all, released at the end.
    assert handler.outcomes == {("accepted", ""): 1, ("released", ""): 1}
    assert sample(rig.registry, "pacsflow_uploader_association_failures_total",
                  destination="engine") == 0
