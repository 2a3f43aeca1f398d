"""Header values as path parts: the storage layout and the sanitiser that guards it.

Every value that becomes part of a path comes from a DICOM header, which the sender controls
(safety invariant 4). :func:`safe_part` turns any text into one harmless path component:

* only letters, digits and ``- _ . + = @ , ^ #`` are kept; anything else (``/``, ``\\``, NUL,
  control characters, ``:`` and the other characters Windows refuses) becomes ``_``;
* a part never starts with ``.`` (no ``.``/``..``, no hidden files that could clash with the
  temporary files written next to the instances) and never ends with ``.`` or a space;
* Windows device names (``CON``, ``NUL``, ``COM1`` ..., also with an extension) get a prefix;
* over-long values are cut (at most :data:`MAX_PART` characters);
* an empty value becomes :data:`EMPTY`;
* whenever the value had to be changed, ``~`` and a hash of the original are appended, so two
  different hostile values never share a folder or a file name.

DICOM pads values with spaces (and UIDs with NUL): those are removed first, so ``"AB "`` and
``"AB"`` are the same value, as DICOM says.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EMPTY", "MAX_PART", "InstancePath", "instance_parts", "instance_path", "safe_part"]

#: the longest part this module produces (well below the 255 bytes of common file systems,
#: even when every character takes 4 bytes in UTF-8)
MAX_PART = 64
#: what an empty value becomes; it cannot come from a value (``~`` is never kept)
EMPTY = "~empty"

_KEPT = frozenset("-_.+=@,^#")
_DEVICE = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9¹²³]|LPT[0-9¹²³]|CONIN\$|CONOUT\$)$", re.IGNORECASE)
_HASH_LENGTH = 10


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LENGTH]


# A value of only these characters that neither starts nor ends with "." is kept as it is
# (UIDs, most IDs): checked by one match instead of character by character.
_ALREADY_SAFE = re.compile(r"[A-Za-z0-9_+=@,^#-][A-Za-z0-9_.+=@,^#-]*")


def safe_part(value: str) -> str:
    """One path component made from a header value; never empty, never ``.``/``..``."""
    if (
        len(value) <= MAX_PART
        and _ALREADY_SAFE.fullmatch(value)
        and not value.endswith(".")
        and not _DEVICE.match(value.split(".", 1)[0])
    ):
        return value
    return _cleaned(value)


@functools.lru_cache(maxsize=4096)
def _cleaned(value: str) -> str:
    value = value.strip(" \x00")
    if not value:
        return EMPTY
    cleaned = "".join(
        ch if (ch in _KEPT or ch.isalnum()) and ch.isprintable() else "_" for ch in value
    )
    if cleaned.startswith("."):
        cleaned = "_" + cleaned[1:]
    cleaned = cleaned.rstrip(". ")
    stem = cleaned.split(".", 1)[0]
    if _DEVICE.match(stem):
        cleaned = "_" + cleaned
    if cleaned == value and len(cleaned) <= MAX_PART:
        return cleaned
    # Changed or cut: the hash of the original keeps different values apart.
    cleaned = cleaned[: MAX_PART - _HASH_LENGTH - 1].rstrip(". ") or "_"
    return f"{cleaned}~{_digest(value)}"


@dataclass(frozen=True, slots=True)
class InstancePath:
    """Where one instance goes: its study folder, series folder and file."""

    study_folder: Path
    series_folder: Path
    file: Path


def instance_parts(
    root: str,
    patient_id: str,
    study_date: str,
    study_time: str,
    series_uid: str,
    sop_instance_uid: str,
) -> tuple[str, str, str]:
    """The study folder, series folder and file of :func:`instance_path`, as strings (the
    router builds one per instance received: strings cost less than ``pathlib``)."""
    date = study_date.strip(" \x00")
    time = study_time.strip(" \x00")
    study = os.path.join(
        root, safe_part(patient_id), safe_part(f"{date}_{time}" if date or time else "")
    )
    series = os.path.join(study, safe_part(series_uid))
    return study, series, os.path.join(series, f"{safe_part(sop_instance_uid)}.dcm")


def instance_path(
    root: Path,
    patient_id: str,
    study_date: str,
    study_time: str,
    series_uid: str,
    sop_instance_uid: str,
) -> InstancePath:
    """``<root>/<PatientID>/<StudyDate>_<StudyTime>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``."""
    study, series, file = instance_parts(
        os.fspath(root), patient_id, study_date, study_time, series_uid, sop_instance_uid
    )
    return InstancePath(Path(study), Path(series), Path(file))
