"""Is this file a DICOM instance that can be sent? Header-only checks, stricter than pydicom.

pydicom is lenient: it reads a truncated file without a warning, and 128 zero bytes plus
``DICM`` as an empty data set. The header walk of :func:`pacsflow.dicom.read_part10` (file
meta, UIDs, declared lengths that fit the file, pixel data not cut off) does the common part;
this module adds what an import folder needs besides: the four UIDs a PACS files an instance
by, pixel data as long as Rows × Columns × … say, every fragment of encapsulated pixel data in
the file, no executable in the preamble (CVE-2019-11687: a file that is both a valid DICOM
instance and a Windows or Linux program), and DICOMDIR files recognised and set aside (they
index a medium, they are not images).

Import folders hold whatever a CD or a user put there, so nothing a file declares is
trusted before it is checked against the file: :func:`~pacsflow.dicom.read_part10` checks file
meta lengths against the file before parsing them, caps inflation of a deflated data set at
:data:`~pacsflow.dicom.files.MAX_INFLATED_BYTES` and the nesting of sequences; anything else a
reader raises on a damaged file makes the file invalid rather than failing its folder.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from pacsflow.dicom import PartTenFile, read_part10
from pacsflow.dicom.files import MAX_INFLATED_BYTES
from pacsflow.errors import InvalidDicom

__all__ = ["CheckedFile", "MAX_INFLATED_BYTES", "Verdict", "validate_file"]

log = logging.getLogger(__name__)


# Media Storage Directory Storage: a DICOMDIR (PS3.10 8.6). Recognised in the file meta, which
# comes first and is short, before the data set walk (a DICOMDIR has no SOP Instance UID).
_DICOMDIR_CLASS = re.compile(rb"1\.2\.840\.10008\.1\.3\.10(?![0-9.])")
# Executable headers seen in DICOM preambles: PE (MZ), ELF, Mach-O.
_EXECUTABLE_MAGIC = (b"MZ", b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\xca\xfe\xba\xbe")
_DEFLATED = "1.2.840.10008.1.2.1.99"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", _BIG_ENDIAN)

_ROWS, _COLUMNS, _BITS_ALLOCATED = 0x00280010, 0x00280011, 0x00280100
_SAMPLES_PER_PIXEL, _NUMBER_OF_FRAMES, _PHOTOMETRIC = 0x00280002, 0x00280008, 0x00280004
_PATIENT_ID, _PATIENT_NAME, _CHARACTER_SET = 0x00100020, 0x00100010, 0x00080005
_IMAGE_TAGS = frozenset({_ROWS, _COLUMNS, _BITS_ALLOCATED, _SAMPLES_PER_PIXEL, _NUMBER_OF_FRAMES,
                         _PHOTOMETRIC, _PATIENT_ID, _PATIENT_NAME, _CHARACTER_SET})
_PIXEL_DATA = 0x7FE00010
_ITEM, _SEQUENCE_DELIMITER, _UNDEFINED = 0xFFFEE000, 0xFFFEE0DD, 0xFFFFFFFF


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
    # For the folder-name identity rewrite only (raw header text); never logged above DEBUG.
    patient_id: str = ""
    patient_name: str = ""


@dataclass(frozen=True)
class Verdict:
    outcome: Literal["valid", "invalid", "dicomdir"]
    reason: str = ""
    file: CheckedFile | None = None


def _invalid(reason: str) -> Verdict:
    return Verdict("invalid", reason)


def validate_file(path: Path, stream: BinaryIO | None = None) -> Verdict:
    """Check one file; never raises for bad content (OSError only for unreadable files).

    ``stream``: the file's content already open (the file, or its bytes in memory), for a
    caller that reads the whole file anyway; it is left open.
    """
    if stream is not None:
        return _validate(path, stream)
    with open(path, "rb") as fp:
        return _validate(path, fp)


def _validate(path: Path, fp: BinaryIO) -> Verdict:
    fp.seek(0)
    head = fp.read(1024)
    if not head:
        return _invalid("empty file")
    has_preamble = len(head) >= 132 and head[128:132] == b"DICM"
    if has_preamble and head[:128].startswith(_EXECUTABLE_MAGIC):
        return _invalid("executable code in the preamble (CVE-2019-11687)")
    if path.name.upper() == "DICOMDIR" or (has_preamble and _DICOMDIR_CLASS.search(head)):
        return Verdict("dicomdir", "DICOMDIR (a media index, not an image)")
    try:
        part = read_part10(path, extra_tags=_IMAGE_TAGS, stream=fp)
    except InvalidDicom as err:
        return _invalid(err.reason)
    except (RecursionError, MemoryError) as err:
        return _invalid(f"unreadable header: {type(err).__name__} (nested too deeply?)")
    except Exception as err:  # noqa: BLE001 - any failure on untrusted bytes: not valid
        # The message may quote header values (patient data): DEBUG only.
        log.debug("header reader failed on %s", path, exc_info=True)
        return _invalid(f"unreadable header ({type(err).__name__})")
    for name, value in (("Study Instance UID", part.study_instance_uid),
                        ("Series Instance UID", part.series_instance_uid)):
        if not value:
            return _invalid(f"missing {name}")
    problem = _check_pixel_data(part, fp)
    if problem:
        return _invalid(problem)
    extra = part.extra or {}
    return Verdict("valid", file=CheckedFile(
        path=path, size=part.size, sop_class_uid=part.sop_class_uid,
        sop_instance_uid=part.sop_instance_uid,
        series_instance_uid=part.series_instance_uid or "",
        study_instance_uid=part.study_instance_uid or "",
        transfer_syntax_uid=part.transfer_syntax_uid,
        patient_id=_text(extra.get(_PATIENT_ID)),
        patient_name=_text(extra.get(_PATIENT_NAME)),
    ))


def _text(raw: bytes | None) -> str:
    # Only compared with the identity a folder name gives; UTF-8 covers ASCII and ISO_IR 192.
    return raw.rstrip(b"\x00 ").decode("utf-8", errors="replace") if raw else ""


def _unsigned_short(raw: bytes | None, order: str) -> int | None:
    return struct.unpack(order + "H", raw[:2])[0] if raw is not None and len(raw) >= 2 else None


def _expected_pixel_bytes(extra: dict[int, bytes], order: str) -> int | None:
    rows, columns = _unsigned_short(extra.get(_ROWS), order), _unsigned_short(
        extra.get(_COLUMNS), order)
    bits = _unsigned_short(extra.get(_BITS_ALLOCATED), order)
    if not rows or not columns or not bits:
        return None  # a header too odd to compute from; the length-fits check still holds
    samples = _unsigned_short(extra.get(_SAMPLES_PER_PIXEL), order) or 1
    try:
        frames = int(_text(extra.get(_NUMBER_OF_FRAMES)) or 1)
    except ValueError:
        return None
    if _text(extra.get(_PHOTOMETRIC)) == "YBR_FULL_422":
        samples = 2  # PS3.3 C.7.6.3.1.2: two chroma samples shared by each pair of pixels
    return math.ceil(rows * columns * samples * max(frames, 1) * bits / 8)


def _check_pixel_data(part: PartTenFile, fp: BinaryIO) -> str:
    """A reason when pixel data is missing, shorter than the image, or its fragments do not
    fit; else ''."""
    extra = part.extra or {}
    is_image = _ROWS in extra and _COLUMNS in extra
    if part.pixel_data is None:
        return "pixel data missing: the file ends before it (truncated?)" if is_image else ""
    if part.transfer_syntax_uid == _DEFLATED:
        return ""  # the data set is compressed as a whole; positions are not file offsets
    offset, header_length, length = part.pixel_data
    order = ">" if part.transfer_syntax_uid == _BIG_ENDIAN else "<"
    fp.seek(offset)
    group, element = struct.unpack(order + "HH", fp.read(4))
    if (group << 16 | element) != _PIXEL_DATA:
        return ""  # float or double pixel data: read_part10 checked its length fits
    if length == _UNDEFINED:
        return _check_fragments(fp, offset + header_length, part.size, order)
    expected = _expected_pixel_bytes(extra, order)
    if part.transfer_syntax_uid in _NATIVE and expected is not None and length < expected:
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
