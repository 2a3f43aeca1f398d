"""Small synthetic DICOM files for tests: CT images of a given size.

One image is encoded with pydicom; the others are byte copies with their own SOP Instance
UID, Instance Number and pixel values patched in place (same lengths), so thousands of files
take a fraction of a second to write.
"""

from __future__ import annotations

import uuid
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["ct_dataset", "write_ct_series"]


def ct_dataset(
    study_uid: str,
    series_uid: str,
    sop_instance_uid: str,
    number: int,
    rows: int = 64,
    columns: int = 64,
) -> Dataset:
    """A minimal CT Image Storage data set with 16-bit pixel data of ``rows`` x ``columns``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "PF0001"
    ds.Modality = "CT"
    ds.StudyDescription = "synthetic"
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "PFTEST"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = f"{number:05d}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = _pixels(number, rows * columns * 2)
    return ds


# UID components have no leading zeros (PS3.5 9.1): count up from a fixed-width base.
_UID_BASE = 10_000_000


def _pixels(number: int, length: int) -> bytes:
    # Different per image, so a byte comparison notices swapped files.
    pattern = bytes((number + index) % 251 for index in range(251))
    return (pattern * (length // 251 + 1))[:length]


def write_ct_series(
    folder: Path,
    count: int,
    rows: int = 64,
    columns: int = 64,
    study_uid: str | None = None,
    series_uid: str | None = None,
    uid_root: str | None = None,
) -> list[Path]:
    """Write ``count`` CT images of one series into ``folder``; return their paths.

    Instance UIDs are ``<uid_root>.<number>`` (a fresh random root by default; a fixed one
    gives the same bytes on every run, as the benchmarks want)."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    # Fixed-width UIDs and instance numbers: the copies keep every offset and length.
    uid_root = uid_root or f"2.25.{uuid.uuid4().int}"
    template_uid = f"{uid_root}.{_UID_BASE}"
    buffer = BytesIO()
    dcmwrite(
        buffer,
        ct_dataset(study_uid, series_uid, template_uid, 0, rows, columns),
        enforce_file_format=True,
    )
    template = buffer.getvalue()
    pixel_length = rows * columns * 2
    head = template[:-pixel_length]
    # Instance Number (0020,0013) IS, "00000" padded to even length.
    number_header = b"\x20\x00\x13\x00IS\x06\x00"
    template_number = number_header + b"00000 "
    if head.count(template_uid.encode()) != 2 or head.count(template_number) != 1:
        raise AssertionError("the template's UID or instance number is not where the copies expect")
    paths = []
    for number in range(1, count + 1):
        uid = f"{uid_root}.{_UID_BASE + number}".encode()
        data = head.replace(template_uid.encode(), uid).replace(
            template_number, number_header + f"{number:05d} ".encode()
        )
        path = folder / f"ct{number:05d}.dcm"
        path.write_bytes(data + _pixels(number, pixel_length))
        paths.append(path)
    return paths


def write_presentation_variety(
    folder: Path, sop_classes: list[str], transfer_syntaxes: list[str]
) -> list[Path]:
    """One small image per (SOP class, transfer syntax) pair: as many pairs as asked for.

    The data sets are CT images labelled with other SOP classes; a storage SCP that stores
    bytes (pacsflow's, storescp) does not check the IOD.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for number, (sop_class, syntax) in enumerate(
        ((c, s) for c in sop_classes for s in transfer_syntaxes), start=1
    ):
        ds = ct_dataset(study_uid, series_uid, generate_uid(), number, rows=8, columns=8)
        ds.SOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.TransferSyntaxUID = syntax
        path = folder / f"variety{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
