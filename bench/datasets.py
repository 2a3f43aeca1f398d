"""Deterministic synthetic DICOM data sets for the benchmarks.

``write_series(folder, count, rows, columns)`` writes CT images of one study and series: one
is encoded with pydicom, the others are byte copies with their SOP Instance UID, Instance
Number and pixel values patched in place, so thousands of files take well under a second.
The same arguments give the same bytes on every run (UIDs are derived from ``seed``).
"""

from __future__ import annotations

import hashlib
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

__all__ = ["DATASETS", "write_dataset", "write_series"]

#: name -> (images, rows, columns): about 0.5 MB and about 10 kB per image
DATASETS: dict[str, tuple[int, int, int]] = {
    "large": (500, 512, 512),
    "small": (2000, 64, 64),
}

# UID components have no leading zeros (PS3.5 9.1): count up from a fixed-width base.
_BASE = 10_000_000


def _uid_root(seed: str) -> str:
    # A 2.25 UID (PS3.5 B.2) from a hash of the seed: deterministic and unique per seed.
    return "2.25." + str(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:12], "big"))


def _pixels(number: int, length: int) -> bytes:
    # Different per image, so a byte comparison notices swapped files.
    pattern = bytes((number + index) % 251 for index in range(251))
    return (pattern * (length // 251 + 1))[:length]


def _template(root: str, rows: int, columns: int) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = f"{root}.3.{_BASE}"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{root}.3.{_BASE}"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "BENCH1"
    ds.Modality = "CT"
    ds.StudyDescription = "benchmark"
    ds.PatientName = "Bench^Synthetic"
    ds.PatientID = "PFBENCH"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = f"{root}.1"
    ds.SeriesInstanceUID = f"{root}.2"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = "00000"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = _pixels(0, rows * columns * 2)
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def write_series(
    folder: Path, count: int, rows: int, columns: int, seed: str = "bench"
) -> list[Path]:
    """Write ``count`` CT images of one series into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    root = _uid_root(f"{seed}:{count}:{rows}x{columns}")
    template = _template(root, rows, columns)
    pixel_length = rows * columns * 2
    head = template[:-pixel_length]
    template_uid = f"{root}.3.{_BASE}".encode()
    number_tag = b"\x20\x00\x13\x00IS\x06\x00"
    template_number = number_tag + b"00000 "
    if head.count(template_uid) != 2 or head.count(template_number) != 1:
        raise AssertionError("the template's UID or instance number is not where copies expect")
    paths = []
    for number in range(1, count + 1):
        uid = f"{root}.3.{_BASE + number}".encode()
        data = head.replace(template_uid, uid).replace(
            template_number, number_tag + f"{number:05d} ".encode()
        )
        path = folder / f"img{number:05d}.dcm"
        path.write_bytes(data + _pixels(number, pixel_length))
        paths.append(path)
    return paths


def write_dataset(folder: Path, name: str) -> list[Path]:
    """Write one of :data:`DATASETS` into ``folder``."""
    count, rows, columns = DATASETS[name]
    return write_series(folder, count, rows, columns, seed=name)
