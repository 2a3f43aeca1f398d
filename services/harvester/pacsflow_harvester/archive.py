"""Patient archives: ``<archive folder>/<PatientID>.zip`` with every instance of the patient.

The zip holds the storage layout below the storage root
(``<PatientID>/<StudyDate>_<StudyTime>/<SeriesUID>/<SOPUID>.dcm``), so unpacking it next to
other patients' archives gives the router's tree. It is written to a temporary file in the
archive folder, flushed to disk and renamed over the old archive: a reader sees the old zip or
the new one, never half of one. The name is the sanitised PatientID (safety invariant 4).

Only what the harvest verified goes in: for each complete series, the instances present on
disk. A complete series with fewer files than it had when it completed (someone deleted them)
is reported, and the caller sends it back to be fetched again instead of archiving a gap.
"""

from __future__ import annotations

import logging
import os
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pacsflow_router.paths import safe_part

from pacsflow_harvester.layout import Storage
from pacsflow_harvester.state import SeriesJob

__all__ = ["ArchiveResult", "archive_path", "build_archive"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchiveResult:
    """What a build wrote, or which series lacked files (then nothing was written)."""

    path: Path | None
    series: int
    instances: int
    bytes: int
    incomplete: list[str] = field(default_factory=list)


def archive_path(folder: Path, patient_id: str) -> Path:
    """Where the archive of a patient goes."""
    return folder / f"{safe_part(patient_id)}.zip"


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename is still atomic
    finally:
        os.close(fd)


def build_archive(
    storage: Storage,
    folder: Path,
    patient_id: str,
    series: Sequence[SeriesJob],
    *,
    compression: int = zipfile.ZIP_STORED,
) -> ArchiveResult:
    """Write the patient's archive from the files of ``series`` (blocking)."""
    members: list[tuple[Path, str]] = []
    incomplete: list[str] = []
    for item in series:
        present = storage.present(item.patient_id, item.series_uid, everywhere=True)
        if len(present.files) < item.instances:
            incomplete.append(item.series_uid)
            continue
        for _key, (path, _size) in sorted(present.files.items()):
            members.append((path, storage.relative(path)))
    if incomplete:
        return ArchiveResult(None, 0, 0, 0, incomplete)

    folder.mkdir(parents=True, exist_ok=True)
    target = archive_path(folder, patient_id)
    temporary = folder / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    total = 0
    try:
        with zipfile.ZipFile(temporary, "w", compression=compression, allowZip64=True) as archive:
            for path, name in members:
                archive.write(path, name)
                total += path.stat().st_size
        with open(temporary, "rb+") as fp:
            os.fsync(fp.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync_folder(folder)
    return ArchiveResult(target, len(series), len(members), total)
