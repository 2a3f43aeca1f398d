"""``pacsflow harvest``: status with a progress bar, failures, retry and rescan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pacsflow.cli import main
from pacsflow.store import SqliteDatabase, upgrade
from pacsflow_harvester.report import progress_bar
from pacsflow_harvester.state import HarvestState, SeriesFound, SeriesOutcome, StudyFound


@pytest.fixture
async def config(tmp_path: Path) -> Path:
    """A configuration whose state holds a harvest: 4 series, 2 complete, 1 failed."""
    path = tmp_path / "pacsflow.yaml"
    path.write_text(yaml.safe_dump({
        "state": {"backend": "sqlite", "path": str(tmp_path / "state.db")},
        "nodes": {"pacs": {"ae_title": "MAIN_PACS", "host": "127.0.0.1", "port": 104}},
        "uploader": {"destinations": ["pacs"]},
        "harvester": {"source": "pacs", "criteria": {"patient_ids": ["P1"]}},
    }))  # fmt: skip
    db = await SqliteDatabase.open(tmp_path / "state.db")
    try:
        await upgrade(db)
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
        for n in (1, 2):
            job = await state.claim_series("w", 60)
            assert job is not None
            await state.complete_series(
                job.series_uid, "w", SeriesOutcome(10, 5_000_000, 1, 0, 10, 0, 0, 1.0), expected=10
            )
        job = await state.claim_series("w", 60)
        assert job is not None
        await state.fail_series(job.series_uid, "w", "no C-MOVE response", delay=0, max_attempts=1)
    finally:
        await db.close()
    return path


def test_the_progress_bar_fills_with_the_fraction() -> None:
    assert progress_bar(0, 0, width=10) == "[..........]   0.0 %"
    assert progress_bar(1, 4, width=10) == "[##........]  25.0 %"
    assert progress_bar(4, 4, width=10) == "[##########] 100.0 %"


def test_status_shows_each_level_by_state_with_a_progress_bar(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["harvest", "status", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "harvest from pacs, C-MOVE to PACSFLOW, at most 700 requests/min" in out
    assert "patients       1  listed 1" in out
    assert "series         5  pending 1, complete 2, failed 1, excluded 1" in out
    assert "progress  [" + "#" * 15 + "." * 15 + "]  50.0 %  2 of 4 series" in out
    assert "instances 20 of 40 (10.0 MB), 2 re-fetched" in out
    assert "failed    1" in out


def test_status_as_json(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["harvest", "status", "--json", "-c", str(config)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["series"] == {"pending": 1, "complete": 2, "failed": 1, "excluded": 1}
    assert (report["series_complete"], report["series_wanted"]) == (2, 4)
    assert report["bytes"] == 10_000_000


def test_failed_lists_and_retry_requeues(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["harvest", "failed", "-c", str(config)]) == 1
    out = capsys.readouterr().out
    assert "series   1.2.3  attempts=1  no C-MOVE response" in out
    assert main(["harvest", "retry", "1.2.3", "-c", str(config)]) == 0
    assert "1 failed item(s) queued again" in capsys.readouterr().out
    assert main(["harvest", "failed", "-c", str(config)]) == 0


def test_rescan_makes_the_scan_due(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["harvest", "rescan", "-c", str(config)]) == 0
    assert main(["harvest", "status", "-c", str(config)]) == 0
    assert "scan      pending" in capsys.readouterr().out


def test_status_without_harvest_tables_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(
        yaml.safe_dump({"state": {"backend": "sqlite", "path": str(tmp_path / "s.db")}})
    )
    assert main(["harvest", "status", "-c", str(path)]) == 1
    assert "pacsflow db upgrade" in capsys.readouterr().err
