"""Fixtures for the uploader's tests: synthetic series, a state store, a bus, real peers."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pacsflow.bus import MemoryBus
from pacsflow.store import Database, SqliteDatabase, upgrade

from tests.dicom.synthetic import write_ct_series
from tests.peers import OrthancProcess


@pytest.fixture(scope="session")
def series_2000(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """2,000 CT images of 64 x 64 (about 9 kB each); read only: copy before moving them."""
    return write_ct_series(tmp_path_factory.mktemp("series-2000"), 2000)


@pytest.fixture
def inbox_copy(tmp_path: Path, series_2000: list[Path]) -> Path:
    """A private copy of the 2,000 images, in a folder of their own."""
    folder = tmp_path / "source" / "series"
    shutil.copytree(series_2000[0].parent, folder)
    return folder


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await SqliteDatabase.open(tmp_path / "state.db")
    await upgrade(database)
    yield database
    await database.close()


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    memory = MemoryBus()
    await memory.start()
    yield memory
    await memory.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancProcess]:
    """Orthanc on free ports (shared by a module's tests: count what each test adds)."""
    with OrthancProcess(tmp_path_factory.mktemp("orthanc")) as pacs:
        yield pacs
