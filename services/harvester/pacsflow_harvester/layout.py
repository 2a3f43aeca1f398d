"""Where retrieved instances are: the router's storage layout, read back and written.

With C-MOVE the router files each instance under
``<route path>/<PatientID>/<StudyDate>_<StudyTime>/<SeriesUID>/<SOPUID>.dcm`` (every part
sanitised by :func:`pacsflow_router.paths.safe_part`); with C-GET the harvester writes the
same layout itself, with the router's own path and header code, so both methods leave the
same tree and the same checks apply.

Arrival is checked on disk: the SOP Instance UIDs of a series are the names of the ``.dcm``
files in its folder (temporary files start with a dot and are ignored). The folder is found
under the patient's folder by the series UID; if the PACS's header values differ from its
C-FIND answers, a look through every patient's folder finds it anyway.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pacsflow.dicom import ReceivedInstance
from pacsflow.dicom.status import Status
from pacsflow.errors import InvalidDicom
from pacsflow_router.header import scan_header
from pacsflow_router.paths import instance_path, safe_part

__all__ = ["Present", "Storage", "file_key"]

log = logging.getLogger(__name__)

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def file_key(sop_instance_uid: str) -> str:
    """The file name stem of an instance (a valid UID is its own stem)."""
    return safe_part(sop_instance_uid)


@dataclass
class Present:
    """The instances of one series found on disk: file stem -> (path, size)."""

    files: dict[str, tuple[Path, int]] = field(default_factory=dict)

    def keys(self) -> set[str]:
        return set(self.files)

    def bytes_of(self, keys: Iterable[str]) -> int:
        return sum(self.files[key][1] for key in keys if key in self.files)


class Storage:
    """The storage tree of one route: finding series folders, writing C-GET arrivals."""

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.root = root.expanduser().absolute()
        self.fsync = fsync
        self._made: set[str] = set()
        self._lock = threading.Lock()

    def series_folders(self, patient_id: str, series_uid: str, *, everywhere: bool) -> list[Path]:
        """The folders holding the series: under the patient, or (``everywhere``) any patient."""
        name = safe_part(series_uid)
        # safe_part keeps no glob metacharacters, so its output is a literal pattern.
        found = sorted(
            path for path in (self.root / safe_part(patient_id)).glob(f"*/{name}") if path.is_dir()
        )
        if not found and everywhere and self.root.is_dir():
            found = sorted(path for path in self.root.glob(f"*/*/{name}") if path.is_dir())
        return found

    def present(self, patient_id: str, series_uid: str, *, everywhere: bool = False) -> Present:
        """The instances of the series on disk now."""
        present = Present()
        for folder in self.series_folders(patient_id, series_uid, everywhere=everywhere):
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for entry in entries:
                name = entry.name
                if name.startswith(".") or not name.endswith(".dcm"):
                    continue
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue
                present.files.setdefault(name[:-4], (Path(entry.path), size))
        return present

    def relative(self, path: Path) -> str:
        """``path`` relative to the storage root (the name inside an archive)."""
        return path.relative_to(self.root).as_posix()

    # --- C-GET arrivals ------------------------------------------------------------------

    def write(self, instance: ReceivedInstance) -> tuple[int, int]:
        """File one C-GET arrival as the router would; (DIMSE status, bytes written)."""
        try:
            header = scan_header(instance.dataset, instance.transfer_syntax_uid)
        except InvalidDicom as err:
            log.warning("C-GET sent SOP instance %s that cannot be read: %s",
                        instance.sop_instance_uid, err.reason)  # fmt: skip
            return Status.CANNOT_UNDERSTAND, 0
        where = instance_path(
            self.root,
            header.patient_id,
            header.study_date,
            header.study_time,
            header.series_instance_uid,
            header.sop_instance_uid,
        )
        key = str(where.series_folder)
        try:
            if key not in self._made:
                where.series_folder.mkdir(parents=True, exist_ok=True)
                with self._lock:
                    self._made.add(key)
            path = instance.write(where.file, fsync=self.fsync)
            return Status.SUCCESS, path.stat().st_size
        except OSError as err:
            with self._lock:
                self._made.discard(key)
            log.error("could not write SOP instance %s under %s: %s",
                      instance.sop_instance_uid, self.root, err.strerror or err)  # fmt: skip
            status = Status.OUT_OF_RESOURCES if err.errno in _FULL else Status.HANDLER_FAILED
            return int(status), 0
