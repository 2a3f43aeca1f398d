"""Fixtures for the DICOM networking tests: synthetic files, options and real peers.

A missing DCMTK or Orthanc fails the test that needs it (peers.py raises), never skips it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pacsflow.dicom import NetworkOptions
from tests.dicom.synthetic import write_ct_series
from tests.peers import OrthancProcess, StoreSCPProcess


@pytest.fixture
def options() -> NetworkOptions:
    """Options with timeouts short enough that a lost response fails a test quickly."""
    return NetworkOptions(
        ae_title="PFTEST", connect_timeout=5, acse_timeout=10, dimse_timeout=10, network_timeout=30
    )


@pytest.fixture(scope="session")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """2,000 CT images of 64 x 64 (about 9 kB each), written once per test session."""
    return write_ct_series(tmp_path_factory.mktemp("small-series"), 2000)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCPProcess]:
    """DCMTK storescp +xa on a free port, writing into tmp_path/received."""
    with StoreSCPProcess(tmp_path / "received") as peer:
        yield peer


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """Orthanc on free ports; modalities are added by the tests that need them."""
    with OrthancProcess(tmp_path_factory.mktemp("orthanc")) as pacs:
        yield pacs
