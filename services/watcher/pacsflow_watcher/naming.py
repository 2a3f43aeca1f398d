"""Patient identity from an import folder's name, as hospitals name CD imports.

A folder such as ``#12345-HongGildong`` carries the PatientID and PatientName that the images
inside must get. The pattern's first group is the PatientID, the second the PatientName.
Names outside ASCII (Korean, for example) are written with Specific Character Set ``ISO_IR 192``
(UTF-8). The file is rewritten into a temporary file beside it and renamed over the original,
so a crash mid-write never leaves a broken file.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from pacsflow.errors import InvalidDicom

__all__ = ["DEFAULT_PATTERN", "PatientIdentity", "identity_from_folder", "rewrite_identity"]

DEFAULT_PATTERN = r"^#([0-9]+)-([#^A-Za-z0-9]+)$"

# PS3.5 6.2: LO (PatientID) holds 64 characters, each PN component group 64.
_MAX_ID = 64
_MAX_NAME = 64


@dataclass(frozen=True)
class PatientIdentity:
    patient_id: str
    patient_name: str

    @property
    def needs_utf8(self) -> bool:
        """True when the values are outside the default character repertoire."""
        return not (self.patient_id + self.patient_name).isascii()


def identity_from_folder(folder_name: str, pattern: str | re.Pattern[str]) -> PatientIdentity | None:
    """The identity a folder name carries, or None when it does not match the pattern."""
    match = re.match(pattern, folder_name)
    if match is None or match.re.groups < 2:
        return None
    patient_id, patient_name = match.group(1), match.group(2)
    if not patient_id or not patient_name:
        return None
    if len(patient_id) > _MAX_ID or len(patient_name) > _MAX_NAME:
        return None
    if "\\" in patient_id + patient_name:  # the DICOM value separator
        return None
    return PatientIdentity(patient_id, patient_name)


def rewrite_identity(path: Path, identity: PatientIdentity) -> None:
    """Set PatientID and PatientName in the file at ``path``, atomically.

    Pixel data is carried over as encoded bytes; only the header is changed.
    """
    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise InvalidDicom(f"cannot read for identity rewrite: {err}") from err
    if identity.needs_utf8:
        # Other text in the header keeps its meaning only if it was ASCII or already UTF-8;
        # ISO_IR 192 is a superset of the default repertoire.
        dataset.SpecificCharacterSet = "ISO_IR 192"
    dataset.PatientID = identity.patient_id
    dataset.PatientName = identity.patient_name
    fd, temp_name = tempfile.mkstemp(prefix=".pacsflow-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            dataset.save_as(out, enforce_file_format=False)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
