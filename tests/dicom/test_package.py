"""The public surface of pacsflow.dicom, and the rule that only it imports pynetdicom."""

from __future__ import annotations

import re
from pathlib import Path

import pacsflow.dicom

ROOT = Path(__file__).resolve().parents[2]
IMPORTS_PYNETDICOM = re.compile(r"^\s*(from|import)\s+pynetdicom\b", re.MULTILINE)


def test_every_exported_name_exists() -> None:
    missing = [name for name in pacsflow.dicom.__all__ if not hasattr(pacsflow.dicom, name)]
    assert missing == []
    assert len(set(pacsflow.dicom.__all__)) == len(pacsflow.dicom.__all__)


def test_only_the_dicom_package_imports_pynetdicom() -> None:
    dicom_package = ROOT / "shared" / "pacsflow" / "dicom"
    offenders = [
        str(path.relative_to(ROOT))
        for folder in (ROOT / "shared", ROOT / "services")
        for path in folder.rglob("*.py")
        if dicom_package not in path.parents and IMPORTS_PYNETDICOM.search(path.read_text())
    ]
    assert offenders == [], "pynetdicom is imported outside pacsflow.dicom (DESIGN.md)"
