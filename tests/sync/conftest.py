"""Fixtures of the sync tests: the state store on both backends, and two Orthanc instances as
remote and local PACS with the acceptance studies.

The remote Orthanc knows the local one as the C-MOVE destination ``LOCAL`` through a counting
proxy, so a test can count the C-MOVEs that reached the local PACS (Orthanc opens one
association per C-MOVE) and can refuse them to make moves fail.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from pacsflow.config import StateSettings
from pacsflow.store import Database, open_database, upgrade

from tests.peers import OrthancProcess

from .support import LOCAL_AE, REMOTE_AE, CountingProxy, Scenario, reset_local


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_settings(request: pytest.FixtureRequest, tmp_path: Path) -> StateSettings:
    """The state store's settings, once for SQLite and once for PostgreSQL."""
    if request.param == "postgres":
        dsn = request.getfixturevalue("pg_dsn")
        return StateSettings(backend="postgres", dsn=SecretStr(dsn), pool_size=4)
    return StateSettings(backend="sqlite", path=tmp_path / "state.db")


@pytest.fixture
async def db(state_settings: StateSettings) -> AsyncIterator[Database]:
    """A migrated state store (both backends)."""
    database = await open_database(state_settings)
    await upgrade(database)
    yield database
    await database.close()


@pytest.fixture
async def second_db(state_settings: StateSettings, db: Database) -> AsyncIterator[Database]:
    """A second connection (pool) to the same store, as another process would have."""
    database = await open_database(state_settings)
    yield database
    await database.close()


@pytest.fixture
def sqlite_state(tmp_path: Path) -> StateSettings:
    return StateSettings(backend="sqlite", path=tmp_path / "state.db")


@pytest.fixture(scope="session")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """The acceptance studies, written once per test session."""
    return Scenario.write(tmp_path_factory.mktemp("studies"))


@pytest.fixture(scope="session")
def local_pacs(
    tmp_path_factory: pytest.TempPathFactory, scenario: Scenario
) -> Iterator[OrthancProcess]:
    """The local PACS: an Orthanc holding one of the remote's studies."""
    with OrthancProcess(tmp_path_factory.mktemp("local"), ae_title=LOCAL_AE) as pacs:
        pacs.upload(scenario.local_paths())
        yield pacs


@pytest.fixture(scope="session")
def move_proxy(local_pacs: OrthancProcess) -> Iterator[CountingProxy]:
    """Where the remote's C-MOVE sub-operations go on their way to the local PACS."""
    with CountingProxy(local_pacs.dicom_port) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def remote_pacs(
    tmp_path_factory: pytest.TempPathFactory, scenario: Scenario, move_proxy: CountingProxy
) -> Iterator[OrthancProcess]:
    """The remote PACS: an Orthanc with every acceptance study; LOCAL is a move destination."""
    modalities = {"local": (LOCAL_AE, "127.0.0.1", move_proxy.port)}
    folder = tmp_path_factory.mktemp("remote")
    with OrthancProcess(folder, ae_title=REMOTE_AE, modalities=modalities) as pacs:
        pacs.upload(scenario.remote_paths())
        yield pacs


@pytest.fixture
def pacs_pair(
    remote_pacs: OrthancProcess,
    local_pacs: OrthancProcess,
    move_proxy: CountingProxy,
    scenario: Scenario,
) -> Iterator[tuple[OrthancProcess, OrthancProcess]]:
    """Remote and local PACS as the scenario starts: the local holds only its one study."""
    reset_local(local_pacs, scenario)
    move_proxy.reset()
    yield remote_pacs, local_pacs
    move_proxy.refusing = False
