"""Fixtures of the notifier tests: the state store on both backends, a bus, an SMTP server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from pacsflow.bus import BusOptions, EmbeddedBus
from pacsflow.config import BusSettings, StateSettings
from pacsflow.store import Database, open_database, upgrade

from .support import SmtpServer, WebhookReceiver

# Retries and polls of the bus in tens of milliseconds, so redeliveries show up quickly.
FAST_BUS = BusOptions(retry_delay=0.02, retry_delay_max=0.2, poll_interval=0.05, close_timeout=5)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_settings(request: pytest.FixtureRequest, tmp_path: Path) -> StateSettings:
    """The state store's settings, once for SQLite and once for PostgreSQL."""
    if request.param == "postgres":
        dsn = request.getfixturevalue("pg_dsn")
        return StateSettings(backend="postgres", dsn=SecretStr(dsn), pool_size=4)
    return StateSettings(backend="sqlite", path=tmp_path / "state.db")


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> StateSettings:
    return StateSettings(backend="sqlite", path=tmp_path / "state.db")


@pytest.fixture
async def db(state_settings: StateSettings) -> AsyncIterator[Database]:
    """A migrated state store (both backends)."""
    database = await open_database(state_settings)
    await upgrade(database)
    yield database
    await database.close()


@pytest.fixture
async def sqlite_db(sqlite_settings: StateSettings) -> AsyncIterator[Database]:
    """A migrated SQLite state store (tests that do not depend on the backend)."""
    database = await open_database(sqlite_settings)
    await upgrade(database)
    yield database
    await database.close()


@pytest.fixture
def registry() -> CollectorRegistry:
    """One registry for the bus and the notifier of a test, as in one process."""
    return CollectorRegistry()


@pytest.fixture
async def bus(tmp_path: Path, registry: CollectorRegistry) -> AsyncIterator[EmbeddedBus]:
    """The embedded bus in its own SQLite file, with short retry and poll times."""
    embedded = EmbeddedBus(
        tmp_path / "bus.db", BusSettings(delivery_limit=3), registry=registry, options=FAST_BUS,
    )
    await embedded.start()
    yield embedded
    await embedded.close()


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    """A running aiosmtpd server on 127.0.0.1."""
    server = SmtpServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    receiver.start()
    yield receiver
    receiver.stop()

