"""Fixtures of the harvester tests: the synthetic cohort, Orthanc loaded with it, the proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harvester.support import Cohort, DimseProxy, write_cohort
from tests.peers import OrthancProcess, free_port


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """5 patients x 2 studies x 3 series x 4 instances (8 x 8 pixels), written once."""
    return write_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture
def router_port() -> int:
    """The port the test's router will listen on (Orthanc's C-MOVE destination)."""
    return free_port()


@pytest.fixture
def loaded_orthanc(tmp_path: Path, cohort: Cohort, router_port: int) -> Iterator[OrthancProcess]:
    """Orthanc holding the cohort; it may C-MOVE to PACSFLOW at ``router_port``."""
    modalities = {"router": ("PACSFLOW", "127.0.0.1", router_port)}
    with OrthancProcess(tmp_path / "orthanc", modalities=modalities) as pacs:
        pacs.upload(cohort.files)
        yield pacs


@pytest.fixture
def proxy(loaded_orthanc: OrthancProcess) -> Iterator[DimseProxy]:
    """The DIMSE-counting proxy in front of the loaded Orthanc."""
    with DimseProxy(loaded_orthanc.dicom_port) as running:
        yield running
