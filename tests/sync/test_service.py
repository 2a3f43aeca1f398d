"""The sync service as it runs: cycles on a schedule, the movers, and its event handling on a
memory bus, against the two Orthanc instances."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from prometheus_client import CollectorRegistry

from pacsflow.bus import MemoryBus
from pacsflow.config import Settings, StateSettings
from pacsflow.events import (
    Event,
    Moved,
    MovedPayload,
    SeriesMissing,
    SeriesMissingPayload,
    Source,
)
from pacsflow.http import HealthServer
from pacsflow.runtime import ServiceContext
from pacsflow.store import Database, open_database, upgrade

from pacsflow_sync.service import EventHandler, run
from pacsflow_sync.transfers import SeriesRequest, Transfers

from tests.peers import OrthancProcess

from .support import (
    LOCAL_AE,
    REMOTE_AE,
    CountingProxy,
    Scenario,
    eventually,
    harness,
    local_series,
    make_settings,
    uids,
)

Pair = tuple[OrthancProcess, OrthancProcess]
HARVESTER = Source(service="harvester", instance="h1")


def series_missing(series_uid: str, study_uid: str = "1.2.3", *, by: str = "sync") -> SeriesMissing:
    return SeriesMissing(
        source=Source(service=by, instance="t"),
        payload=SeriesMissingPayload(
            requested_by=by,  # type: ignore[arg-type]
            source_ae=REMOTE_AE,
            destination_ae=LOCAL_AE,
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            expected_images=4,
            reason="test",
        ),
    )


@asynccontextmanager
async def running_service(
    settings: Settings, db: Database
) -> AsyncIterator[tuple[MemoryBus, CollectorRegistry, list[Event]]]:
    """``run(ctx)`` in a task, on a memory bus with an observer of the sync's events."""
    registry = CollectorRegistry()
    bus = MemoryBus(registry=registry)
    await bus.start()
    seen: list[Event] = []

    async def observe(event: Event) -> None:
        seen.append(event)

    await bus.subscribe("observer", ["series-missing", "moved"], observe)
    ctx = ServiceContext("sync", settings, bus, db, registry, HealthServer(registry))
    task = asyncio.create_task(run(ctx))
    try:
        yield bus, registry, seen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise AssertionError("the service crashed") from task.exception()


@pytest.fixture
async def sqlite_db(sqlite_state: StateSettings) -> AsyncIterator[Database]:
    database = await open_database(sqlite_state)
    await upgrade(database)
    yield database
    await database.close()


SYNC_QUEUE = "pacsflow.sync.series-missing"


async def declared(bus: MemoryBus) -> None:
    """Wait until the service has declared its queues (events published before are not its)."""
    for _ in range(200):
        if SYNC_QUEUE in await bus.queue_depths():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the sync service never declared its queues")


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.mark.orthanc
class TestRunningService:
    async def test_cycles_on_schedule_move_each_missing_series_once(
        self, pacs_pair: Pair, scenario: Scenario, move_proxy: CountingProxy,
        sqlite_state: StateSettings, sqlite_db: Database, capsys: pytest.CaptureFixture[str],
    ) -> None:
        remote, local = pacs_pair
        settings = make_settings(remote, local, sqlite_state, interval_seconds=0.3)
        expected = {**scenario.series("recent", 3), **scenario.series("earlier", 2)}
        async with running_service(settings, sqlite_db) as (_, registry, seen):
            await eventually(lambda: set(expected) <= set(local_series(local)))
            # A cycle's statistics are printed after its metric counts it: a fourth cycle
            # counted means three were printed.
            await eventually(lambda: metric(registry, "pacsflow_sync_cycles_total",
                                            status="ok") >= 4)  # fmt: skip
        assert move_proxy.connections == 2
        assert uids(e for e in seen if e.type == "series-missing") == set(expected)
        moved = [e for e in seen if isinstance(e, Moved)]
        assert uids(moved) == set(expected) and len(moved) == 2
        assert {e.payload.completed for e in moved} == {2, 3}
        assert metric(registry, "pacsflow_sync_series_moved_total", status="success") == 2
        assert metric(registry, "pacsflow_sync_images_moved_total", status="completed") == 5
        assert metric(registry, "pacsflow_sync_cycle_duration_seconds_count") >= 3
        assert metric(registry, "pacsflow_sync_last_cycle_timestamp_seconds") > 0
        out = capsys.readouterr().out
        assert out.count("images per minute") >= 3 and "missing studies" in out
        runs = await sqlite_db.fetch("SELECT * FROM sync_runs ORDER BY id")
        assert runs[0]["status"] == "ok" and runs[0]["series_moved"] == 2
        assert runs[0]["images_transferred"] == 5 and runs[0]["missing_studies"] == 2
        assert all(row["series_requested"] == 0 for row in runs[1:] if row["status"] != "running")

    async def test_a_series_missing_event_alone_gets_its_series_moved(
        self, pacs_pair: Pair, scenario: Scenario, sqlite_state: StateSettings,
        sqlite_db: Database,
    ) -> None:
        remote, local = pacs_pair
        # Outside the window and the date range: only the event asks for it.
        study = scenario.studies["last-week"]
        series_uid = study.series[0][0]
        settings = make_settings(remote, local, sqlite_state, interval_seconds=3600,
                                 selection="max-images", max_images=1)  # fmt: skip
        async with running_service(settings, sqlite_db) as (bus, _, seen):
            await declared(bus)
            await bus.publish(series_missing(series_uid, study.uid))
            await eventually(lambda: series_uid in local_series(local))
            await eventually(lambda: any(isinstance(e, Moved) for e in seen))
        row = await Transfers(sqlite_db).get(REMOTE_AE, LOCAL_AE, series_uid)
        assert row is not None and row.status == "moved" and row.reported_at is not None

    async def test_unannounced_requests_and_unreported_outcomes_are_published_again(
        self, pacs_pair: Pair, sqlite_state: StateSettings, sqlite_db: Database,
    ) -> None:
        """A crash between a commit and its event: the event is published by the next cycle
        (series-missing) or the next mover round (moved)."""
        remote, local = pacs_pair
        transfers = Transfers(sqlite_db)
        old = time.time() - 120
        await transfers.request(
            SeriesRequest(REMOTE_AE, LOCAL_AE, "1.2.3", "1.2.3.1", 2, "missing-study"),
            run_id=None, now=old, local_checked_at=old, stale_before=old - 300,
        )  # fmt: skip
        await transfers.request(
            SeriesRequest(REMOTE_AE, LOCAL_AE, "1.2.3", "1.2.3.2", 2, "missing-study"),
            run_id=None, now=old, local_checked_at=old, stale_before=old - 300,
        )  # fmt: skip
        claimed = await transfers.claim_next("gone", old)
        assert claimed is not None
        await transfers.finish(
            claimed, "gone", moved=True, completed=2, failed=0, warning=0, dimse_status=0,
            error=None, now=old, retry_initial=1, retry_max=1,
        )  # fmt: skip
        settings = make_settings(remote, local, sqlite_state)
        async with harness(settings, sqlite_db) as h:
            await h.parts.cycle.run(drive=True)
            assert await h.parts.movers.report_pending() == 1
            await eventually(lambda: "1.2.3.2" in uids(h.published("series-missing"))
                             and "1.2.3.1" in uids(h.published("moved")))
            assert uids(h.published("series-missing")) >= {"1.2.3.2"}
            assert uids(h.published("moved")) >= {"1.2.3.1"}
            # Published once: marked, so the next round finds nothing.
            assert await h.parts.movers.report_pending() == 0
            assert await transfers.unannounced(time.time()) == []


    async def test_a_bus_outage_does_not_stop_the_moves(
        self, pacs_pair: Pair, move_proxy: CountingProxy, sqlite_state: StateSettings,
        sqlite_db: Database,
    ) -> None:
        remote, local = pacs_pair
        settings = make_settings(remote, local, sqlite_state)
        async with harness(settings, sqlite_db) as h:
            await h.bus.close()
            report = await h.parts.cycle.run(drive=True)
        assert report.ok and report.series_moved == 2 and move_proxy.connections == 2
        transfers = Transfers(sqlite_db)
        assert len(await transfers.unreported(time.time() + 60)) == 2
        # The bus is back: the outcomes are published, once.
        async with harness(settings, sqlite_db, clock=lambda: time.time() + 60) as h:
            assert await h.parts.movers.report_pending() == 2
            await eventually(lambda: len(h.published("moved")) == 2)
            assert await h.parts.movers.report_pending() == 0


class TestEventHandler:
    async def test_records_sync_requests_once_and_ignores_other_requesters(
        self, sqlite_state: StateSettings, sqlite_db: Database,
    ) -> None:
        settings = Settings(
            nodes={**Settings().nodes, "r": {"ae_title": REMOTE_AE, "host": "127.0.0.1",
                                             "port": 1}},
            sync={"remote": "r", "local": "router"},
            state=sqlite_state,
        )  # fmt: skip
        async with harness(settings, sqlite_db) as h:
            transfers = h.parts.transfers
            handler = EventHandler(transfers, h.parts.movers)
            await handler(series_missing("1.2.3.9", by="harvester"))
            assert await transfers.count_by_status() == dict.fromkeys(
                ("requested", "moving", "moved", "failed"), 0)  # fmt: skip

            event = series_missing("1.2.3.1")
            await handler(event)
            await handler(event)  # redelivered
            assert (await transfers.count_by_status())["requested"] == 1

            # A series already moved is not moved again by a late event.
            claimed = await transfers.claim_next("m", time.time())
            assert claimed is not None
            await transfers.finish(
                claimed, "m", moved=True, completed=4, failed=0, warning=0, dimse_status=0,
                error=None, now=time.time(), retry_initial=1, retry_max=1,
            )  # fmt: skip
            await handler(event)
            row = await transfers.get(REMOTE_AE, LOCAL_AE, "1.2.3.1")
            assert row is not None and row.status == "moved" and row.attempts == 1
            assert not await transfers.has_requested()

            harvester_moved = Moved(
                source=HARVESTER,
                payload=MovedPayload(
                    requested_by="harvester", source_ae="A", destination_ae="B",
                    study_instance_uid="1", series_instance_uid="2", completed=1, failed=0,
                    warning=0, duration_seconds=1, status="success",
                ),
            )  # fmt: skip
            await handler(harvester_moved)

    async def test_unconfigured_service_keeps_its_events_queued(
        self, sqlite_db: Database, sqlite_state: StateSettings
    ) -> None:
        settings = Settings(state=sqlite_state)
        async with running_service(settings, sqlite_db) as (bus, _, _seen):
            await declared(bus)
            await bus.publish(series_missing("1.2.3.1"))
            await asyncio.sleep(0.3)
            assert (await bus.queue_depths())[SYNC_QUEUE] == 1
