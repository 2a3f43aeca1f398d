"""Faults on the way: the PACS killed mid-download, the harvester killed, network resets that
never stop, and pause windows. Everything completes, and nothing already complete is fetched
again."""

from __future__ import annotations

import asyncio
import io
import json
import time
from contextlib import redirect_stdout
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pacsflow.cli import main
from pacsflow.events import Moved
from pacsflow.store import SqliteDatabase, upgrade
from pacsflow_harvester.state import HarvestState
from pacsflow_harvester.windows import Schedule

from tests.harvester.support import (
    Cohort,
    DimseProxy,
    HarvesterProcess,
    harvest_done,
    harvest_settings,
    running_harvester,
    series_on_disk,
    wait_until,
    write_config,
)
from tests.peers import OrthancProcess
from tests.router.support import running_router

pytestmark = [pytest.mark.orthanc]

SELECTED = ("PAT001", "PAT003", "PAT005")


async def _complete_series(state: HarvestState) -> set[str]:
    rows = await state.db.fetch("SELECT series_uid FROM harvest_series WHERE status = 'complete'")
    return {row["series_uid"] for row in rows}


def _retrieves_per_series(proxy: DimseProxy) -> dict[str, int]:
    counts: dict[str, int] = {}
    for request in proxy.snapshot():
        if request.command in ("C-MOVE", "C-GET") and request.series_uid:
            counts[request.series_uid] = counts.get(request.series_uid, 0) + 1
    return counts


class TestPacsRestart:
    async def test_orthanc_killed_mid_download_completes_without_fetching_twice(
        self,
        tmp_path: Path,
        cohort: Cohort,
        loaded_orthanc: OrthancProcess,
        proxy: DimseProxy,
        router_port: int,
    ) -> None:
        settings = harvest_settings(
            tmp_path, proxy.port, router_port=router_port, requests_per_minute=900
        )
        router_db = await SqliteDatabase.open(tmp_path / "router.db")
        try:
            async with (
                running_router(settings, db=router_db) as router,
                running_harvester(settings) as running,
            ):
                state = running.state
                await wait_until(lambda: _count_at_least(state, 4), 60, "four complete series")
                # Kill it as a retrieve goes out: mid-download.
                moves = len(proxy.snapshot("C-MOVE"))
                await wait_until(lambda: len(proxy.snapshot("C-MOVE")) > moves, 20,
                                 "the next C-MOVE", interval=0.005)  # fmt: skip
                assert loaded_orthanc.process is not None
                loaded_orthanc.process.kill()
                loaded_orthanc.process.wait(10)
                loaded_orthanc.process = None
                complete_before = await _complete_series(state)
                retrieves_before = _retrieves_per_series(proxy)
                await asyncio.sleep(1.0)
                await asyncio.to_thread(loaded_orthanc.start)
                proxy.target_port = loaded_orthanc.dicom_port

                await wait_until(lambda: harvest_done(state), 90, "the harvest")
                errors = sum(
                    running.metric("pacsflow_harvester_request_errors_total",
                                   type=kind, reason=reason)
                    for kind in ("find", "move") for reason in ("unreachable", "aborted")
                )  # fmt: skip
                counts = await state.counts()
        finally:
            await router_db.close()
        # Read after the router stopped: its last reports are flushed by then.
        stored = router.metric("pacsflow_router_instances_total", route="PACSFLOW")

        wanted = cohort.of_patients(SELECTED)
        assert counts["series"] == {"complete": 18}
        assert series_on_disk(tmp_path / "storage") == {
            s.series_uid: set(s.sop_uids) for s in wanted
        }
        # The outage was noticed (requests failed), and yet every instance was stored once.
        assert errors >= 1
        assert stored == 72
        retrieves = _retrieves_per_series(proxy)
        for series_uid in complete_before:
            assert retrieves[series_uid] == retrieves_before[series_uid] == 1
        for patient_id in SELECTED:
            assert (tmp_path / "archive" / f"{patient_id}.zip").is_file()


async def cli(*args: str) -> tuple[int, str]:
    """``pacsflow ARGS`` as the command line runs it (its own event loop, in a thread)."""

    def call() -> tuple[int, str]:
        out = io.StringIO()
        with redirect_stdout(out):
            code = main(list(args))
        return code, out.getvalue()

    return await asyncio.to_thread(call)


async def _count_at_least(state: HarvestState, count: int) -> bool:
    return len(await _complete_series(state)) >= count


class TestHarvesterRestart:
    async def test_killed_harvester_resumes_and_refetches_nothing_complete(
        self,
        tmp_path: Path,
        cohort: Cohort,
        proxy: DimseProxy,
        router_port: int,
    ) -> None:
        settings = harvest_settings(
            tmp_path, proxy.port, router_port=router_port, requests_per_minute=900
        )
        config = write_config(tmp_path / "harvester.yaml", settings)
        router_db = await SqliteDatabase.open(tmp_path / "router.db")
        state_db = await SqliteDatabase.open(settings.state.path)
        await upgrade(state_db)
        state = HarvestState(state_db)
        first = HarvesterProcess(config, tmp_path / "first.log")
        second = HarvesterProcess(config, tmp_path / "second.log")
        try:
            async with running_router(settings, db=router_db) as router:
                first.start()
                try:
                    await wait_until(lambda: _count_at_least(state, 4), 60,
                                     "four complete series")  # fmt: skip
                    moves = len(proxy.snapshot("C-MOVE"))
                    await wait_until(lambda: len(proxy.snapshot("C-MOVE")) > moves, 20,
                                     "the next C-MOVE", interval=0.005)  # fmt: skip
                    first.kill()
                except BaseException:
                    print(first.log()[-5000:])
                    raise
                finally:
                    first.stop()
                complete_before = await _complete_series(state)
                retrieves_before = _retrieves_per_series(proxy)
                claimed = await state_db.fetchval(
                    "SELECT count(*) FROM harvest_series WHERE status = 'retrieving'"
                )
                second.start()
                try:
                    await wait_until(lambda: harvest_done(state), 90, "the harvest")
                except BaseException:
                    print(second.log()[-5000:])
                    raise
                finally:
                    second.stop()
                counts = await state.counts()
        finally:
            await state_db.close()
            await router_db.close()
        # Read after the router stopped: its last reports are flushed by then.
        stored = router.metric("pacsflow_router_instances_total", route="PACSFLOW")

        wanted = cohort.of_patients(SELECTED)
        # The killed harvester held claims; its successor took them back at once.
        assert claimed >= 1
        assert "took back claims of stopped harvesters" in second.log()
        assert counts["series"] == {"complete": 18}
        assert series_on_disk(tmp_path / "storage") == {
            s.series_uid: set(s.sop_uids) for s in wanted
        }
        retrieves = _retrieves_per_series(proxy)
        for series_uid in complete_before:
            assert retrieves[series_uid] == retrieves_before[series_uid] == 1
        # Only instances of series that were being retrieved at the kill may come twice.
        assert 72 <= stored <= 72 + 4 * settings.harvester.workers
        for patient_id in SELECTED:
            assert (tmp_path / "archive" / f"{patient_id}.zip").is_file()


class TestResets:
    async def test_a_series_reset_every_time_fails_after_max_attempts_and_is_reported(
        self, tmp_path: Path, cohort: Cohort, proxy: DimseProxy, router_port: int
    ) -> None:
        settings = harvest_settings(
            tmp_path, proxy.port, router_port=router_port, max_attempts=3,
            criteria={"patient_ids": ["PAT002"]},
        )  # fmt: skip
        config = write_config(tmp_path / "harvester.yaml", settings)
        proxy.cut = {"C-MOVE"}
        router_db = await SqliteDatabase.open(tmp_path / "router.db")
        try:
            async with (
                running_router(settings, db=router_db),
                running_harvester(settings) as running,
            ):
                await wait_until(lambda: harvest_done(running.state), 60, "every attempt")
                await wait_until(lambda: len(running.of_type("moved")) == 6, 10, "moved")
                counts = await running.state.counts()
                failed = running.metric("pacsflow_harvester_failed_total", stage="series")
                retries = running.metric(
                    "pacsflow_harvester_retries_total", stage="series", reason="aborted"
                )
                moves = len(proxy.snapshot("C-MOVE"))
                await asyncio.sleep(1.0)
                # Failed for good: no further attempts however long it runs.
                assert len(proxy.snapshot("C-MOVE")) == moves

                code, status = await cli("harvest", "status", "-c", str(config))
                assert code == 0
                code, listing = await cli("harvest", "failed", "--json", "-c", str(config))
                assert code == 1

                # The link is repaired; the operator retries what failed.
                proxy.cut = set()
                code, _ = await cli("harvest", "retry", "-c", str(config))
                assert code == 0
                await wait_until(lambda: harvest_done(running.state), 60, "the retry")
                after = await running.state.counts()
        finally:
            await router_db.close()

        assert counts["series"] == {"failed": 6}
        assert moves == 6 * 3
        assert proxy.cuts == 6 * 3
        assert failed == 6
        assert retries == 6 * 2
        moved = [e for e in running.events if isinstance(e, Moved)]
        assert {e.payload.status for e in moved[:6]} == {"failed"}
        assert all("C-MOVE" in (e.payload.error or "") for e in moved[:6])
        assert "failed    6" in status
        rows = json.loads(listing)
        assert sorted(row["key"] for row in rows) == sorted(
            s.series_uid for s in cohort.of_patients(["PAT002"])
        )
        assert {row["attempts"] for row in rows} == {3}
        assert after["series"] == {"complete": 6}


class TestWindows:
    async def test_no_request_starts_in_a_pause_window(
        self, tmp_path: Path, proxy: DimseProxy, router_port: int
    ) -> None:
        # 02:56 UTC on some day: inside the pause window; the test moves the clock on.
        now = [datetime(2024, 3, 5, 2, 56, tzinfo=UTC).timestamp()]
        schedule = Schedule(["02:55-03:10"], zone="UTC", clock=lambda: now[0], max_sleep=0.05)
        settings = harvest_settings(
            tmp_path, proxy.port, router_port=router_port, criteria={"patient_ids": ["PAT004"]}
        )
        router_db = await SqliteDatabase.open(tmp_path / "router.db")
        try:
            async with (
                running_router(settings, db=router_db),
                running_harvester(settings, schedule=schedule) as running,
            ):
                await asyncio.sleep(1.5)
                held = proxy.snapshot()
                paused = running.metric("pacsflow_harvester_paused")
                now[0] = datetime(2024, 3, 5, 3, 10, tzinfo=UTC).timestamp()
                started = time.monotonic()
                await wait_until(lambda: harvest_done(running.state), 60, "the harvest")
                took = time.monotonic() - started
                resumed = running.metric("pacsflow_harvester_paused")
                counts = await running.state.counts()
        finally:
            await router_db.close()

        assert held == []
        assert paused == 1
        assert resumed == 0
        assert counts["series"] == {"complete": 6}
        assert took < 30
