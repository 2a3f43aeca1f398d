"""``pacsflow status`` shows harvest and sync progress from the services' own state."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from pacsflow.store import SqliteDatabase, upgrade
from pacsflow_harvester.state import HarvestState, SeriesFound, SeriesOutcome, StudyFound
from pacsflow_sync.report import CycleReport
from pacsflow_sync.runs import Runs

from tests.cli.support import pacsflow, status_json


async def test_harvest_and_sync_progress(tmp_path: Path) -> None:
    config = tmp_path / "pacsflow.yaml"
    config.write_text(yaml.safe_dump({
        "state": {"backend": "sqlite", "path": str(tmp_path / "state.db")},
        "nodes": {"pacs": {"ae_title": "MAIN_PACS", "host": "127.0.0.1", "port": 104}},
        "uploader": {"destinations": ["pacs"]},
        "harvester": {"source": "pacs", "criteria": {"patient_ids": ["P1"]}},
    }))  # fmt: skip
    db = await SqliteDatabase.open(tmp_path / "state.db")
    try:
        await upgrade(db)
        # A harvest of 4 wanted series (a 5th excluded): 2 complete, 1 failed.
        state = HarvestState(db)
        await state.ensure_scan("d")
        assert await state.claim_scan("w", 60)
        await state.add_patients(["P1"])
        await state.finish_scan("w", 1, None)
        await state.claim_patient("w", 60)
        await state.finish_patient("w", "P1", [StudyFound("1.2", "20230101", "", "", "CT", True)])
        await state.claim_study("w", 60)
        await state.finish_study("w", "1.2", [
            SeriesFound(f"1.2.{n}", "CT", str(n), "", 10, n != 5) for n in range(1, 6)
        ])  # fmt: skip
        for _ in (1, 2):
            job = await state.claim_series("w", 60)
            assert job is not None
            await state.complete_series(
                job.series_uid, "w", SeriesOutcome(10, 5_000_000, 1, 0, 10, 0, 0, 1.0), expected=10
            )
        job = await state.claim_series("w", 60)
        assert job is not None
        await state.fail_series(job.series_uid, "w", "no C-MOVE response", delay=0, max_attempts=1)
        # One finished sync cycle.
        report = CycleReport(source="MAIN_PACS", destination_ae="RESEARCH", started_at=time.time())
        report.run_id = await Runs(db).start("test", report)
        report.missing_studies, report.series_requested, report.series_moved = 2, 3, 3
        report.images_transferred, report.finished_at = 42, time.time()
        await Runs(db).finish(report)
    finally:
        await db.close()

    data = status_json(config)
    assert data["harvest"]["series_wanted"] == 4 and data["harvest"]["series_complete"] == 2
    assert data["sync"]["last_run"]["series_moved"] == 3
    assert data["studies"] == {"open": 0, "claimed": 0, "notified": 0}
    text = pacsflow("-c", str(config), "status").stdout
    assert "harvest: 2/4 series [############............]  50.0 %, 1 failed" in text
    assert "ok: 2 missing studies, 3/3 series moved, 0 failed, 42 images" in text
