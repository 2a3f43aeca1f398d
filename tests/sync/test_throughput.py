"""A cycle with two larger series moved side by side: counts and images per minute.

Prints the cycle's statistics table (``pytest -s`` shows it); nothing is asserted about speed
on a shared machine, only that every image arrived and was counted once.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from pacsflow.config import StateSettings
from pacsflow.store import open_database, upgrade

from tests.dicom.synthetic import ct_dataset
from tests.peers import OrthancProcess

from .support import LOCAL_AE, REMOTE_AE, harness, local_series, make_settings

pytestmark = pytest.mark.orthanc

SERIES, IMAGES, SIZE = 2, 150, 256


def write_study(folder: Path) -> list[Path]:
    now = datetime.now()
    study, paths = generate_uid(), []
    for number in range(1, SERIES + 1):
        series = generate_uid()
        for image in range(1, IMAGES + 1):
            ds = ct_dataset(study, series, generate_uid(), image, SIZE, SIZE)
            ds.StudyDate, ds.StudyTime = f"{now:%Y%m%d}", f"{now:%H%M%S}"
            ds.SeriesNumber = number
            path = folder / f"{number}-{image:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


async def test_two_series_of_150_ct_images_move_side_by_side(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    paths = write_study(tmp_path / "files")
    state = StateSettings(path=tmp_path / "state.db")
    with OrthancProcess(tmp_path / "local", ae_title=LOCAL_AE) as local:
        modalities = {"local": (LOCAL_AE, "127.0.0.1", local.dicom_port)}
        remote_folder = tmp_path / "remote"
        with OrthancProcess(remote_folder, ae_title=REMOTE_AE, modalities=modalities) as remote:
            remote.upload(paths)
            settings = make_settings(remote, local, state, selection="all", movers=2)
            db = await open_database(state)
            try:
                await upgrade(db)
                async with harness(settings, db) as h:
                    report = await h.parts.cycle.run(drive=True)
            finally:
                await db.close()
            print(f"\n{report.table()}")
            assert report.ok, report.table()
            assert report.images == report.images_transferred == SERIES * IMAGES
            assert sorted(local_series(local).values()) == [IMAGES] * SERIES
            assert report.images_per_minute > 0
            assert h.metric("pacsflow_sync_images_moved_total", status="completed") == (
                SERIES * IMAGES
            )
            assert h.metric("pacsflow_sync_images_per_minute") == pytest.approx(
                report.images_per_minute
            )
