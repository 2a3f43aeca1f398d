"""Fixtures of the router tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dicom.synthetic import write_ct_series


@pytest.fixture(scope="module")
def series_50(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """50 CT images of 64 x 64 in one study and series."""
    return write_ct_series(tmp_path_factory.mktemp("series50"), 50)
