"""Deterministic synthetic DICOM data sets for the benchmarks.

``write_series(folder, count, rows, columns)`` writes CT images of one study and series with
the generator the tests use (one image encoded with pydicom, the others byte copies with their
own UIDs and pixel values), with UIDs derived from ``seed``: the same arguments give the same
bytes on every run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.dicom.synthetic import write_ct_series

__all__ = ["DATASETS", "write_dataset", "write_series"]

#: name -> (images, rows, columns): about 0.5 MB and about 10 kB per image
DATASETS: dict[str, tuple[int, int, int]] = {
    "large": (500, 512, 512),
    "small": (2000, 64, 64),
}


def _uid_root(seed: str) -> str:
    # A 2.25 UID (PS3.5 B.2) from a hash of the seed: deterministic and unique per seed.
    return "2.25." + str(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:12], "big"))


def write_series(
    folder: Path, count: int, rows: int, columns: int, seed: str = "bench"
) -> list[Path]:
    """Write ``count`` CT images of one series into ``folder``; return their paths."""
    root = _uid_root(f"{seed}:{count}:{rows}x{columns}")
    return write_ct_series(folder, count, rows, columns, study_uid=f"{root}.1",
                           series_uid=f"{root}.2", uid_root=f"{root}.3")


def write_dataset(folder: Path, name: str) -> list[Path]:
    """Write one of :data:`DATASETS` into ``folder``."""
    count, rows, columns = DATASETS[name]
    return write_series(folder, count, rows, columns, seed=name)
