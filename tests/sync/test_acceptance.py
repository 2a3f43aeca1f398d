"""The sync acceptance tests: two Orthanc instances as remote and local PACS.

The remote has four studies of the last 13 hours (``recent`` 3/5/8 images per series,
``earlier`` 2/6, ``old`` 13 hours ago with 4, ``present`` 3/4) and one of last week (2); the
local has ``present``. With the default window of 12 hours, ``recent`` and ``earlier`` are
missing. What arrived is checked on the local Orthanc over its REST API; the C-MOVEs are
counted by the proxy between the remote and the local PACS.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pacsflow.config import StateSettings
from pacsflow.store import open_database, upgrade

from pacsflow_sync.transfers import Transfers

from tests.peers import OrthancProcess

from .support import (
    LOCAL_AE,
    REMOTE_AE,
    CountingProxy,
    Scenario,
    delete_series,
    harness,
    local_series,
    make_settings,
    restart_on_same_ports,
    uids,
)

pytestmark = pytest.mark.orthanc

Pair = tuple[OrthancProcess, OrthancProcess]


async def run_one_cycle(settings, state: StateSettings, **kw):  # type: ignore[no-untyped-def]
    """One cycle with its moves driven in this task, as ``pacsflow sync --once`` runs it."""
    db = await open_database(state)
    try:
        await upgrade(db)
        async with harness(settings, db) as h:
            report = await h.parts.cycle.run(drive=True, **kw)
            return report, h
    finally:
        await db.close()


class TestSelectionModes:
    @pytest.mark.parametrize(
        ("sync", "expected"),
        [
            ({}, {"recent": (3,), "earlier": (2,)}),
            ({"selection": "max-images", "max_images": 6}, {"recent": (3, 5), "earlier": (2,)}),
            ({"selection": "all"}, {"recent": (3, 5, 8), "earlier": (2, 6)}),
        ],
        ids=["smallest", "max-images-6", "all"],
    )
    async def test_each_mode_moves_exactly_the_expected_series(
        self,
        pacs_pair: Pair,
        scenario: Scenario,
        move_proxy: CountingProxy,
        sqlite_state: StateSettings,
        sync: dict[str, object],
        expected: dict[str, tuple[int, ...]],
    ) -> None:
        remote, local = pacs_pair
        wanted: dict[str, int] = {}
        for name, counts in expected.items():
            wanted.update(scenario.series(name, *counts))
        settings = make_settings(remote, local, sqlite_state, **sync)

        report, h = await run_one_cycle(settings, sqlite_state)

        assert report.ok, report.table()
        assert local_series(local) == {**scenario.initially_local(), **wanted}
        assert move_proxy.connections == len(wanted)
        assert (report.remote_studies, report.local_studies, report.missing_studies) == (3, 1, 2)
        assert report.series_chosen == report.series_requested == report.series_moved
        assert report.series_moved == len(wanted)
        assert report.images == report.images_transferred == sum(wanted.values())
        assert report.images_per_minute > 0
        assert uids(h.published("series-missing")) == set(wanted)
        moved = h.published("moved")
        assert uids(moved) == set(wanted)
        assert {e.payload.status for e in moved} == {"success"}  # type: ignore[union-attr]
        assert h.metric("pacsflow_sync_series_moved_total", status="success") == len(wanted)
        assert h.metric("pacsflow_sync_cycles_total", status="ok") == 1
        assert h.metric("pacsflow_sync_missing_studies") == 2
        table = report.table()
        for label in ("remote studies", "local studies", "missing studies", "series chosen",
                      "images", "transferred", "time", "images per minute"):  # fmt: skip
            assert label in table

        # The next cycle finds nothing missing and moves nothing.
        again, _ = await run_one_cycle(settings, sqlite_state)
        assert again.ok and again.series_requested == 0
        assert move_proxy.connections == len(wanted)
        if not sync:
            assert again.missing_studies == 0

    async def test_without_a_time_window_the_13_hour_old_study_is_moved_too(
        self, pacs_pair: Pair, scenario: Scenario, sqlite_state: StateSettings
    ) -> None:
        remote, local = pacs_pair
        settings = make_settings(remote, local, sqlite_state, window_hours=None)
        report, _ = await run_one_cycle(settings, sqlite_state)
        assert report.ok and report.missing_studies == 3
        assert local_series(local) == {
            **scenario.initially_local(),
            **scenario.series("recent", 3),
            **scenario.series("earlier", 2),
            **scenario.series("old", 4),
        }

    async def test_a_week_long_range_reaches_last_week(
        self, pacs_pair: Pair, scenario: Scenario, sqlite_state: StateSettings
    ) -> None:
        remote, local = pacs_pair
        settings = make_settings(
            remote, local, sqlite_state, window_hours=None, date_range_days=8
        )
        report, _ = await run_one_cycle(settings, sqlite_state)
        assert report.ok and report.missing_studies == 4
        assert scenario.studies["last-week"].series[0][0] in local_series(local)

    async def test_an_incomplete_study_gets_only_the_chosen_series_it_lacks(
        self, pacs_pair: Pair, scenario: Scenario, sqlite_state: StateSettings,
        move_proxy: CountingProxy,
    ) -> None:
        remote, local = pacs_pair
        lost = scenario.series("present", 4)
        delete_series(local, next(iter(lost)))
        # Smallest: "present"'s smallest series is there; nothing of it is moved.
        settings = make_settings(remote, local, sqlite_state, include_incomplete=True)
        report, _ = await run_one_cycle(settings, sqlite_state)
        assert report.ok and report.incomplete_studies == 0 and report.series_moved == 2
        assert not set(lost) & set(local_series(local))
        # All: the lost series comes back, and only it.
        settings = make_settings(
            remote, local, sqlite_state, include_incomplete=True, selection="all"
        )
        move_proxy.reset()
        report, _ = await run_one_cycle(settings, sqlite_state)
        # "recent" and "earlier" are incomplete now too: they have their smallest series.
        assert report.ok and report.incomplete_studies == 3
        assert local_series(local)[next(iter(lost))] == 4
        rows = await _transfer_rows(sqlite_state)
        assert scenario.studies["present"].series_uid(3) not in rows
        # recent 5 and 8 and earlier 6, plus the lost series.
        assert move_proxy.connections == 4


async def _transfer_rows(state: StateSettings) -> dict[str, str]:
    """Series Instance UID -> status of every transfer row."""
    db = await open_database(state)
    try:
        rows = await db.fetch("SELECT series_instance_uid, status FROM sync_transfers")
    finally:
        await db.close()
    return {row["series_instance_uid"]: row["status"] for row in rows}


class TestFailures:
    async def test_local_pacs_down_fails_the_cycle_clearly_and_the_next_one_completes(
        self, tmp_path: Path, scenario: Scenario, sqlite_state: StateSettings
    ) -> None:
        # A local PACS of this test's own: it is stopped and started again on the same ports.
        with OrthancProcess(tmp_path / "local", ae_title=LOCAL_AE) as local:
            local.upload(scenario.local_paths())
            modalities = {"local": (LOCAL_AE, "127.0.0.1", local.dicom_port)}
            remote_folder = tmp_path / "remote"
            with OrthancProcess(remote_folder, ae_title=REMOTE_AE, modalities=modalities) as remote:
                remote.upload(scenario.remote_paths())
                settings = make_settings(remote, local, sqlite_state)
                local.stop()

                down, h = await run_one_cycle(settings, sqlite_state)

                assert down.status == "failed" and not down.ok
                assert down.error is not None
                assert "the local PACS" in down.error
                assert f"{LOCAL_AE}@127.0.0.1:{local.dicom_port}" in down.error
                assert "C-FIND" in down.error
                assert down.series_requested == 0 and h.events == []
                assert h.metric("pacsflow_sync_cycles_total", status="failed") == 1
                assert "error: the local PACS" in down.table()

                restart_on_same_ports(local)
                up, _ = await run_one_cycle(settings, sqlite_state)

                assert up.ok, up.table()
                assert up.series_moved == 2
                assert local_series(local) == {
                    **scenario.initially_local(),
                    **scenario.series("recent", 3),
                    **scenario.series("earlier", 2),
                }

    async def test_failed_moves_wait_for_their_backoff_then_succeed(
        self, pacs_pair: Pair, scenario: Scenario, move_proxy: CountingProxy,
        sqlite_state: StateSettings,
    ) -> None:
        remote, local = pacs_pair
        offset = [0.0]
        settings = make_settings(
            remote, local, sqlite_state, retry_initial_seconds=300, retry_max_seconds=600
        )
        db = await open_database(sqlite_state)
        try:
            await upgrade(db)
            async with harness(settings, db, clock=lambda: time.time() + offset[0]) as h:
                move_proxy.refusing = True
                failed = await h.parts.cycle.run(drive=True)
                assert failed.status == "failed" and failed.series_failed == 2
                assert len(failed.failures) == 2 and "C-MOVE" in failed.failures[0]
                assert move_proxy.refused >= 2 and move_proxy.connections == 0
                moved = h.published("moved")
                assert {e.payload.status for e in moved} == {"failed"}  # type: ignore[union-attr]
                assert h.metric("pacsflow_sync_series_moved_total", status="failed") == 2

                # Still missing, but not due yet: nothing is requested.
                move_proxy.refusing = False
                waiting = await h.parts.cycle.run(drive=True)
                assert waiting.series_waiting == 2 and waiting.series_requested == 0
                assert move_proxy.connections == 0

                offset[0] = 301
                retried = await h.parts.cycle.run(drive=True)
                assert retried.ok and retried.series_requested == retried.series_moved == 2
                assert move_proxy.connections == 2
                rows = await db.fetch("SELECT status, attempts FROM sync_transfers")
                assert sorted((r["status"], r["attempts"]) for r in rows) == [("moved", 2)] * 2
        finally:
            await db.close()
        assert set(scenario.series("recent", 3)) <= set(local_series(local))


class TestInProgress:
    async def test_a_requested_series_is_not_requested_again_by_the_next_cycle(
        self, pacs_pair: Pair, scenario: Scenario, move_proxy: CountingProxy,
        sqlite_state: StateSettings,
    ) -> None:
        remote, local = pacs_pair
        settings = make_settings(remote, local, sqlite_state, cycle_timeout_seconds=0.5)
        db = await open_database(sqlite_state)
        try:
            await upgrade(db)
            async with harness(settings, db) as h:
                # No movers run: the cycle requests, waits its half second, gives up waiting.
                first = await h.parts.cycle.run()
                assert first.status == "incomplete" and first.series_pending == 2
                second = await h.parts.cycle.run()
                assert second.series_requested == 0 and second.series_in_progress == 2
                assert len(h.published("series-missing")) == 2

                report = await h.parts.cycle.run(drive=False)
                assert report.series_in_progress == 2
                await _drain_all(h.parts.movers, h.parts.transfers)
                assert move_proxy.connections == 2
                assert len(h.published("series-missing")) == 2
        finally:
            await db.close()
        assert set(scenario.series("earlier", 2)) <= set(local_series(local))

    async def test_two_syncs_at_once_move_each_series_once(
        self, pacs_pair: Pair, scenario: Scenario, move_proxy: CountingProxy,
        sqlite_state: StateSettings,
    ) -> None:
        remote, local = pacs_pair
        settings = make_settings(remote, local, sqlite_state, selection="all")
        first_db, second_db = await open_database(sqlite_state), await open_database(sqlite_state)
        try:
            await upgrade(first_db)
            async with harness(settings, first_db) as one, harness(settings, second_db) as two:
                reports = await asyncio.gather(
                    one.parts.cycle.run(drive=True), two.parts.cycle.run(drive=True)
                )
        finally:
            await first_db.close()
            await second_db.close()
        assert all(report.error is None for report in reports)
        assert sum(report.series_requested for report in reports) == 5
        assert move_proxy.connections == 5
        assert len(local_series(local)) == 7


async def _drain_all(movers, transfers: Transfers) -> None:  # type: ignore[no-untyped-def]
    while (transfer := await transfers.claim_next(movers.owner, time.time())) is not None:
        await movers.move(transfer)
