"""Reading files to send: the fast file-meta path agrees with the strict reader."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
from pacsflow.dicom import read_part10
from pacsflow.errors import InvalidDicom
from pacsflow_uploader.files import FileJob, identify, load_data_set

from tests.dicom.synthetic import write_ct_series


def _corpus(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


class TestIdentify:
    def test_agrees_with_the_strict_reader_on_the_pydicom_corpus(
        self, pydicom_test_files: Path
    ) -> None:
        checked = 0
        for path in _corpus(pydicom_test_files):
            try:
                expected = read_part10(path)
            except InvalidDicom:
                continue
            recorded = FileJob(
                1, str(path), expected.sop_class_uid, expected.sop_instance_uid,
                expected.transfer_syntax_uid,
            )  # fmt: skip
            for job in (FileJob(1, str(path)), recorded):
                found = identify(job)
                assert (
                    found.sop_class_uid, found.sop_instance_uid, found.transfer_syntax_uid,
                    found.dataset_offset,
                ) == (
                    expected.sop_class_uid, expected.sop_instance_uid,
                    expected.transfer_syntax_uid, expected.dataset_offset,
                ), path.name  # fmt: skip
                checked += 1
        assert checked > 250

    def test_meta_naming_another_instance_than_the_data_set_is_not_trusted(
        self, pydicom_test_files: Path
    ) -> None:
        # rtplan.dcm's file meta names another SOP instance than its data set: the command
        # must carry the data set's.
        path = pydicom_test_files / "rtplan.dcm"
        expected = read_part10(path)
        found = identify(FileJob(1, str(path), expected.sop_class_uid, expected.sop_instance_uid))
        assert found.sop_instance_uid == expected.sop_instance_uid
        assert identify(FileJob(1, str(path))).sop_instance_uid == expected.sop_instance_uid

    def test_file_replaced_by_another_instance_is_refused(self, tmp_path: Path) -> None:
        first, second = write_ct_series(tmp_path / "s", 2)
        recorded = read_part10(first)
        shutil.copy(second, first)
        with pytest.raises(InvalidDicom, match="changed since it was recorded"):
            identify(FileJob(1, str(first), recorded.sop_class_uid, recorded.sop_instance_uid))

    def test_files_that_are_not_dicom_or_truncated_are_invalid(
        self, tmp_path: Path, pydicom_test_files: Path
    ) -> None:
        text = tmp_path / "notes.txt"
        text.write_text("not an image")
        for path in (text, pydicom_test_files / "rtplan_truncated.dcm", tmp_path / "missing"):
            with pytest.raises(InvalidDicom):
                identify(FileJob(1, str(path)))


class TestDataSetBytes:
    @pytest.mark.parametrize(("rows", "mapped"), [(64, False), (512, True)])
    def test_bytes_are_the_data_set_as_on_disk(
        self, tmp_path: Path, rows: int, mapped: bool
    ) -> None:
        (path,) = write_ct_series(tmp_path / "s", 1, rows, rows)
        file = identify(FileJob(1, str(path)))
        assert (file.content is None) is mapped
        with load_data_set(file) as data:
            assert bytes(data) == path.read_bytes()[file.dataset_offset :]

    def test_a_file_that_changes_size_before_sending_is_invalid(self, tmp_path: Path) -> None:
        (path,) = write_ct_series(tmp_path / "s", 1, 512, 512)
        file = identify(FileJob(1, str(path)))
        with open(path, "ab") as fp:
            fp.write(b"\0\0")
        with pytest.raises(InvalidDicom, match="changed size"), load_data_set(file):
            pass


def test_jobs_cross_to_sender_processes_unchanged() -> None:
    jobs = [FileJob(1, "/in/a.dcm", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),
            FileJob(2, "/in/b.dcm")]  # fmt: skip
    again = pickle.loads(pickle.dumps(jobs, protocol=pickle.HIGHEST_PROTOCOL))
    assert again == jobs and all(type(job) is FileJob for job in again)
    # Pickled by its arguments: no per-object state hooks on the way to a sender.
    assert jobs[0].__reduce__() == (FileJob, (1, "/in/a.dcm", "1.2.840.10008.5.1.4.1.1.2",
                                              "1.2.3.4", "1.2.840.10008.1.2.1"))


def test_results_cross_back_from_sender_processes_unchanged() -> None:
    from pacsflow_uploader.scu import SendResult

    results = [SendResult(1, "success", 0, None, 0.01, 9_800, True, True),
               SendResult(2, "failure", 0xA700, "out of resources", 0.5, 12, False, False),
               SendResult(3, "error", attempted=False)]  # fmt: skip
    again = pickle.loads(pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL))
    assert again == results and all(type(result) is SendResult for result in again)
