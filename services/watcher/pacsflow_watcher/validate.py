"""Is this file a DICOM instance that can be sent? Header-only checks, stricter than pydicom.

pydicom is lenient: it reads a truncated file without a warning, and 128 zero bytes plus
``DICM`` as an empty data set. So besides parsing the header (stopping before pixel data),
this module checks the UIDs a PACS needs, that the declared pixel data fits in the file (and
is as long as Rows × Columns × … says), and that the preamble holds no executable
(CVE-2019-11687: a file that is both a valid DICOM instance and a Windows or Linux program).
DICOMDIR files are recognised and set aside: they index a medium, they are not images.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

__all__ = ["CheckedFile", "Verdict", "validate_file"]

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Executable headers seen in the wild in DICOM preambles: PE (MZ), ELF, Mach-O.
_EXECUTABLE_MAGIC = (b"MZ", b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\xca\xfe\xba\xbe")


@dataclass(frozen=True)
class CheckedFile:
    """What the pipeline needs to know of a valid file."""

    path: Path
    size: int
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    # For the folder-name identity rewrite only; never logged above DEBUG.
    patient_id: str = ""
    patient_name: str = ""


@dataclass(frozen=True)
class Verdict:
    outcome: Literal["valid", "invalid", "dicomdir"]
    reason: str = ""
    file: CheckedFile | None = None


def _invalid(reason: str) -> Verdict:
    return Verdict("invalid", reason)


def validate_file(path: Path) -> Verdict:
    """Check one file; never raises for bad content (OSError only for unreadable files)."""
    size = path.stat().st_size
    if size == 0:
        return _invalid("empty file")
    with open(path, "rb") as fp:
        head = fp.read(132)
        has_preamble = len(head) == 132 and head[128:132] == b"DICM"
        if has_preamble and head[:128].startswith(_EXECUTABLE_MAGIC):
            return _invalid("executable code in the preamble (CVE-2019-11687)")
        if not has_preamble and not _starts_like_a_data_set(head):
            return _invalid("not DICOM: no DICM marker and no data set at the start")
        fp.seek(0)
        try:
            dataset = pydicom.dcmread(fp, stop_before_pixels=True, force=not has_preamble)
        except (InvalidDicomError, EOFError, ValueError, KeyError, struct.error,
                NotImplementedError, OverflowError, RecursionError) as err:
            return _invalid(f"unreadable header: {type(err).__name__}: {err}"[:300])
        header_end = fp.tell()
        return _check_dataset(path, size, dataset, fp, header_end)


def _starts_like_a_data_set(head: bytes) -> bool:
    # Without preamble a file starts with the file meta group (0002) or with the data set,
    # whose first element is in group 0008 for every composite IOD; either byte order.
    if len(head) < 8:
        return False
    little = struct.unpack("<HH", head[:4])
    big = struct.unpack(">HH", head[:4])
    return little[0] in (0x0002, 0x0008) or big[0] in (0x0002, 0x0008)


def _uid(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    return str(value).strip() if value is not None else ""


def _check_dataset(path: Path, size: int, dataset: Dataset, fp: BinaryIO,
                   header_end: int) -> Verdict:
    meta = dataset.file_meta if hasattr(dataset, "file_meta") else Dataset()
    sop_class = _uid(dataset, "SOPClassUID") or _uid(meta, "MediaStorageSOPClassUID")
    if sop_class == MEDIA_STORAGE_DIRECTORY or path.name.upper() == "DICOMDIR":
        return Verdict("dicomdir", "DICOMDIR (a media index, not an image)")
    uids = {
        "SOP Class UID": sop_class,
        "SOP Instance UID": _uid(dataset, "SOPInstanceUID"),
        "Study Instance UID": _uid(dataset, "StudyInstanceUID"),
        "Series Instance UID": _uid(dataset, "SeriesInstanceUID"),
    }
    for name, value in uids.items():
        if not value:
            return _invalid(f"missing {name}")
        if len(value) > 64 or not _UID.match(value):
            return _invalid(f"malformed {name}")
    transfer_syntax = _uid(meta, "TransferSyntaxUID") or pydicom.uid.ImplicitVRLittleEndian
    problem = _check_pixel_data(dataset, fp, header_end, size, UID(transfer_syntax))
    if problem:
        return _invalid(problem)
    return Verdict("valid", file=CheckedFile(
        path=path, size=size, sop_class_uid=sop_class,
        sop_instance_uid=uids["SOP Instance UID"],
        series_instance_uid=uids["Series Instance UID"],
        study_instance_uid=uids["Study Instance UID"],
        transfer_syntax_uid=transfer_syntax,
        patient_id=str(dataset.get("PatientID", "") or ""),
        patient_name=str(dataset.get("PatientName", "") or ""),
    ))


def _expected_pixel_bytes(dataset: Dataset) -> int | None:
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        bits = int(dataset.BitsAllocated)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None  # a header too odd to compute from; the length-fits check still holds
    if str(dataset.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        samples = 2  # PS3.3 C.7.6.3.1.2: two chroma samples shared by each pair of pixels
    return math.ceil(rows * columns * samples * frames * bits / 8)


def _check_pixel_data(dataset: Dataset, fp: BinaryIO, header_end: int, size: int,
                      transfer_syntax: UID) -> str:
    """A reason when pixel data is missing, truncated or shorter than declared; else ''."""
    is_image = "Rows" in dataset and "Columns" in dataset
    if transfer_syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return ""  # the data set is compressed as a whole; positions are not file offsets
    # Read the element as pydicom found it encoded: some files disagree with their meta.
    implicit_vr, little = dataset.original_encoding
    if implicit_vr is None:
        implicit_vr, little = transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian
    fp.seek(header_end)
    header = fp.read(12)
    if len(header) < 8:
        return "pixel data missing: the file ends before it (truncated?)" if is_image else ""
    order = "<" if little else ">"
    group, element = struct.unpack(order + "HH", header[:4])
    tag = (group << 16) | element
    if tag not in _PIXEL_TAGS:
        return ""  # stopped at another element at or after pixel data; nothing to check
    if implicit_vr:
        (length,) = struct.unpack(order + "I", header[4:8])
        value_start = header_end + 8
    else:
        if len(header) < 12:
            return "pixel data element header is truncated"
        (length,) = struct.unpack(order + "I", header[8:12])
        value_start = header_end + 12
    if length == _UNDEFINED:
        return _check_fragments(fp, value_start, size, order)
    if value_start + length > size:
        return (f"pixel data declares {length} bytes but the file holds "
                f"{max(0, size - value_start)} (truncated)")
    expected = _expected_pixel_bytes(dataset) if not transfer_syntax.is_compressed else None
    if expected is not None and tag == 0x7FE00010 and length < expected:
        return f"pixel data has {length} bytes, Rows × Columns × … need {expected}"
    return ""


def _check_fragments(fp: BinaryIO, position: int, size: int, order: str) -> str:
    """Walk encapsulated pixel data items (PS3.5 A.4) up to the sequence delimiter."""
    while True:
        fp.seek(position)
        item = fp.read(8)
        if len(item) < 8:
            return "encapsulated pixel data is truncated (no sequence delimiter)"
        group, element, length = struct.unpack(order + "HHI", item)
        tag = (group << 16) | element
        if tag == _SEQUENCE_DELIMITER:
            return ""
        if tag != _ITEM or length == _UNDEFINED:
            return f"encapsulated pixel data is malformed at byte {position}"
        position += 8 + length
        if position > size:
            return "encapsulated pixel data is truncated (a fragment runs past the end)"
