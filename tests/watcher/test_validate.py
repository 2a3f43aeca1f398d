"""The validator: the outcome and reason for each kind of file an import folder receives."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from pacsflow_watcher.validate import validate_file


@pytest.fixture
def ct(pydicom_test_files: Path) -> Path:
    return pydicom_test_files / "CT_small.dcm"


class TestValidFiles:
    def test_part10_file(self, ct: Path) -> None:
        verdict = validate_file(ct)
        assert verdict.outcome == "valid", verdict.reason
        ds = pydicom.dcmread(ct, stop_before_pixels=True)
        assert verdict.file is not None
        assert verdict.file.sop_instance_uid == ds.SOPInstanceUID
        assert verdict.file.study_instance_uid == ds.StudyInstanceUID
        assert verdict.file.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
        assert verdict.file.size == ct.stat().st_size

    def test_file_without_preamble_or_meta(self, tmp_path: Path, ct: Path) -> None:
        ds = pydicom.dcmread(ct)
        bare = tmp_path / "bare.dcm"
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.preamble = None
        ds.save_as(bare, implicit_vr=True, little_endian=True, enforce_file_format=False)
        assert bare.read_bytes()[128:132] != b"DICM"
        verdict = validate_file(bare)
        assert verdict.outcome == "valid", verdict.reason
        assert verdict.file and verdict.file.transfer_syntax_uid == ImplicitVRLittleEndian

    @pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm",
                                      "rtplan.dcm", "image_dfl.dcm", "SC_rgb_rle_2frame.dcm"])
    def test_other_syntaxes_and_objects(self, pydicom_test_files: Path, name: str) -> None:
        verdict = validate_file(pydicom_test_files / name)
        assert verdict.outcome == "valid", verdict.reason


class TestInvalidFiles:
    def test_empty_file(self, tmp_path: Path) -> None:
        (tmp_path / "zero.dcm").write_bytes(b"")
        assert validate_file(tmp_path / "zero.dcm").reason == "empty file"

    def test_text_file(self, tmp_path: Path) -> None:
        (tmp_path / "notes.txt").write_text("Patient called, will bring CD tomorrow.\n")
        verdict = validate_file(tmp_path / "notes.txt")
        assert verdict.outcome == "invalid" and verdict.reason.startswith("not DICOM")

    def test_marker_without_data_set(self, tmp_path: Path) -> None:
        (tmp_path / "hollow.dcm").write_bytes(bytes(128) + b"DICM")
        verdict = validate_file(tmp_path / "hollow.dcm")
        assert verdict.outcome == "invalid" and verdict.reason == "no data set after the file meta"

    # CT_small's pixel data runs from byte 6300 to 39068; other data follows it.
    @pytest.mark.parametrize("length", [6400, 20000, 39067])
    def test_truncated_in_pixel_data(self, tmp_path: Path, ct: Path, length: int) -> None:
        (tmp_path / "cut.dcm").write_bytes(ct.read_bytes()[:length])
        verdict = validate_file(tmp_path / "cut.dcm")
        assert verdict.outcome == "invalid" and "truncated" in verdict.reason

    def test_truncated_before_pixel_data(self, tmp_path: Path, ct: Path) -> None:
        header_end = 6288  # where CT_small's pixel data element starts
        (tmp_path / "cut.dcm").write_bytes(ct.read_bytes()[:header_end])
        verdict = validate_file(tmp_path / "cut.dcm")
        assert verdict.outcome == "invalid" and "pixel data missing" in verdict.reason

    def test_truncated_encapsulated_pixel_data(self, tmp_path: Path,
                                               pydicom_test_files: Path) -> None:
        data = (pydicom_test_files / "JPEG2000.dcm").read_bytes()
        (tmp_path / "cut.dcm").write_bytes(data[:-200])
        verdict = validate_file(tmp_path / "cut.dcm")
        assert verdict.outcome == "invalid" and "encapsulated" in verdict.reason

    def test_pixel_data_shorter_than_the_image(self, tmp_path: Path, ct: Path) -> None:
        ds = pydicom.dcmread(ct)
        ds.PixelData = ds.PixelData[:1000]
        ds.save_as(tmp_path / "short.dcm")
        verdict = validate_file(tmp_path / "short.dcm")
        assert verdict.outcome == "invalid" and "need" in verdict.reason

    def test_missing_sop_instance_uid(self, tmp_path: Path, ct: Path) -> None:
        ds = pydicom.dcmread(ct)
        del ds.SOPInstanceUID
        ds.save_as(tmp_path / "nouid.dcm", enforce_file_format=False)
        assert validate_file(tmp_path / "nouid.dcm").reason == "no SOP Instance UID in the data set"

    def test_malformed_uid(self, tmp_path: Path, ct: Path) -> None:
        ds = pydicom.dcmread(ct)
        ds.StudyInstanceUID = "1.2.3.abc"
        ds.save_as(tmp_path / "bad.dcm")
        assert validate_file(tmp_path / "bad.dcm").reason == \
            "Study Instance UID '1.2.3.abc' is not a UID"

    def test_missing_series_instance_uid(self, tmp_path: Path, ct: Path) -> None:
        ds = pydicom.dcmread(ct)
        del ds.SeriesInstanceUID
        ds.save_as(tmp_path / "noseries.dcm")
        assert validate_file(tmp_path / "noseries.dcm").reason == "missing Series Instance UID"

    @pytest.mark.parametrize("magic", [b"MZ\x90\x00", b"\x7fELF\x02\x01"])
    def test_executable_in_preamble(self, tmp_path: Path, ct: Path, magic: bytes) -> None:
        data = bytearray(ct.read_bytes())
        data[: len(magic)] = magic
        (tmp_path / "polyglot.dcm").write_bytes(bytes(data))
        assert "CVE-2019-11687" in validate_file(tmp_path / "polyglot.dcm").reason


class TestDicomdir:
    def test_dicomdir_is_recognised(self, tmp_path: Path, pydicom_test_files: Path) -> None:
        shutil.copy(pydicom_test_files / "dicomdirtests" / "DICOMDIR", tmp_path / "DICOMDIR")
        assert validate_file(tmp_path / "DICOMDIR").outcome == "dicomdir"

    def test_dicomdir_by_sop_class_under_another_name(self, tmp_path: Path,
                                                      pydicom_test_files: Path) -> None:
        shutil.copy(pydicom_test_files / "dicomdirtests" / "DICOMDIR", tmp_path / "index.dcm")
        assert validate_file(tmp_path / "index.dcm").outcome == "dicomdir"
