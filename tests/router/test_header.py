"""Reading routing values from received bytes, checked against pydicom on its own corpus."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pacsflow.dicom import read_part10
from pacsflow.errors import InvalidDicom
from pacsflow_router.header import scan_header

CORPUS = [
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "image_dfl.dcm",  # deflated
    "rtplan.dcm",  # sequences before the wanted tags
    "test-SR.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG2000.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
]


def _received(path: Path) -> tuple[bytes, str]:
    info = read_part10(path)
    return path.read_bytes()[info.dataset_offset :], info.transfer_syntax_uid


@pytest.mark.parametrize("name", CORPUS)
def test_values_match_pydicom(pydicom_test_files: Path, name: str) -> None:
    path = pydicom_test_files / name
    data, syntax = _received(path)
    header = scan_header(data, syntax)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.sop_class_uid == ds.SOPClassUID
    assert header.study_instance_uid == ds.get("StudyInstanceUID", "")
    assert header.series_instance_uid == ds.get("SeriesInstanceUID", "")
    assert header.patient_id == str(ds.get("PatientID", ""))
    assert header.study_date == str(ds.get("StudyDate", ""))
    assert header.study_time == str(ds.get("StudyTime", ""))
    assert header.study_description == str(ds.get("StudyDescription", ""))


def _encoded(ds: pydicom.Dataset, folder: Path) -> tuple[bytes, str]:
    path = folder / "encoded.dcm"
    ds.save_as(path, enforce_file_format=True)
    return _received(path)


def test_a_data_set_without_sop_instance_uid_is_refused(
    pydicom_test_files: Path, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(pydicom_test_files / "CT_small.dcm")
    del ds.SOPInstanceUID
    with pytest.raises(InvalidDicom, match="SOP Instance UID"):
        scan_header(*_encoded(ds, tmp_path))


@pytest.mark.parametrize("cut", [3, 10, 200])
def test_truncated_bytes_are_refused(pydicom_test_files: Path, cut: int) -> None:
    data, syntax = _received(pydicom_test_files / "CT_small.dcm")
    with pytest.raises(InvalidDicom):
        scan_header(data[:cut], syntax)


def test_garbage_is_refused() -> None:
    with pytest.raises(InvalidDicom):
        scan_header(b"\xff" * 64, "1.2.840.10008.1.2.1")


@pytest.mark.parametrize(
    ("charset", "patient_id", "description"),
    [("ISO_IR 100", "Müller", "Schädel"), ("ISO_IR 192", "Ωμέγα", "머리 검사")],
)
def test_text_is_decoded_with_the_specific_character_set(
    pydicom_test_files: Path, tmp_path: Path, charset: str, patient_id: str, description: str
) -> None:
    ds = pydicom.dcmread(pydicom_test_files / "CT_small.dcm", stop_before_pixels=True)
    ds.SpecificCharacterSet = charset
    ds.PatientID = patient_id
    ds.StudyDescription = description
    header = scan_header(*_encoded(ds, tmp_path))
    assert header.patient_id == patient_id
    assert header.study_description == description
