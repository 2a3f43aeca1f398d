"""Patient archives and the storage layout they are built from."""

from __future__ import annotations

import zipfile
from pathlib import Path

from pacsflow_harvester.archive import archive_path, build_archive
from pacsflow_harvester.layout import Storage
from pacsflow_harvester.state import SeriesJob
from pacsflow_router.paths import instance_path


def stored(root: Path, patient_id: str, series_uid: str, uids: list[str]) -> None:
    for uid in uids:
        where = instance_path(root, patient_id, "20230101", "010000", series_uid, uid)
        where.series_folder.mkdir(parents=True, exist_ok=True)
        where.file.write_bytes(b"DICM" + uid.encode())


def job(patient_id: str, series_uid: str, instances: int) -> SeriesJob:
    return SeriesJob(series_uid, "1.2", patient_id, "20230101", "010000", "CT", instances,
                     instances, 1)  # fmt: skip


class TestStorage:
    def test_present_lists_instances_and_skips_temporary_files(self, tmp_path: Path) -> None:
        stored(tmp_path, "P1", "1.2.3", ["1.2.3.1", "1.2.3.2"])
        folder = tmp_path / "P1" / "20230101_010000" / "1.2.3"
        (folder / ".1.2.3.3.dcm.tmp").write_bytes(b"half")
        (folder / "notes.txt").write_text("x")
        present = Storage(tmp_path).present("P1", "1.2.3")
        assert present.keys() == {"1.2.3.1", "1.2.3.2"}
        assert present.bytes_of(present.keys()) == 2 * (4 + 7)

    def test_a_series_filed_under_another_patient_folder_is_found(self, tmp_path: Path) -> None:
        # The PACS's header PatientID differs from its C-FIND answer.
        stored(tmp_path, "P1-HEADER", "1.2.3", ["1.2.3.1"])
        storage = Storage(tmp_path)
        assert storage.present("P1", "1.2.3").keys() == set()
        assert storage.present("P1", "1.2.3", everywhere=True).keys() == {"1.2.3.1"}


class TestArchive:
    def test_the_archive_holds_the_layout_and_replaces_the_old_one(self, tmp_path: Path) -> None:
        storage = Storage(tmp_path / "storage")
        stored(storage.root, "P1", "1.2.3", ["1.2.3.1", "1.2.3.2"])
        stored(storage.root, "P1", "1.2.4", ["1.2.4.1"])
        folder = tmp_path / "archive"
        folder.mkdir()
        archive_path(folder, "P1").write_bytes(b"an older archive")
        result = build_archive(
            storage, folder, "P1", [job("P1", "1.2.3", 2), job("P1", "1.2.4", 1)]
        )
        assert result.path == folder / "P1.zip"
        assert (result.series, result.instances) == (2, 3)
        with zipfile.ZipFile(folder / "P1.zip") as zipped:
            assert sorted(zipped.namelist()) == [
                "P1/20230101_010000/1.2.3/1.2.3.1.dcm",
                "P1/20230101_010000/1.2.3/1.2.3.2.dcm",
                "P1/20230101_010000/1.2.4/1.2.4.1.dcm",
            ]
        assert sorted(path.name for path in folder.iterdir()) == ["P1.zip"]

    def test_a_hostile_patient_id_stays_inside_the_archive_folder(self, tmp_path: Path) -> None:
        storage = Storage(tmp_path / "storage")
        patient_id = "../../etc/passwd\x00"
        stored(storage.root, patient_id, "1.2.3", ["1.2.3.1"])
        folder = tmp_path / "archive"
        result = build_archive(storage, folder, patient_id, [job(patient_id, "1.2.3", 1)])
        assert result.path is not None
        # One plain file name: no separator, not hidden, and it resolves inside the folder.
        assert "/" not in result.path.name and not result.path.name.startswith(".")
        assert result.path.resolve().parent == folder.resolve()
        with zipfile.ZipFile(result.path) as zipped:
            assert all(not name.startswith(("/", "..")) for name in zipped.namelist())

    def test_missing_files_write_nothing_and_name_the_series(self, tmp_path: Path) -> None:
        storage = Storage(tmp_path / "storage")
        stored(storage.root, "P1", "1.2.3", ["1.2.3.1"])
        folder = tmp_path / "archive"
        result = build_archive(storage, folder, "P1", [job("P1", "1.2.3", 2)])
        assert result.path is None
        assert result.incomplete == ["1.2.3"]
        assert not (folder / "P1.zip").exists()
