"""The bus package's surface: ``create_bus`` picks the backend, ``__all__`` is honest."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry
from pydantic import SecretStr

import pacsflow.bus
from pacsflow.bus import BusOptions, EmbeddedBus, RabbitBus, create_bus
from pacsflow.config import BusSettings, Settings, StateSettings


def test_every_exported_name_exists() -> None:
    for name in pacsflow.bus.__all__:
        assert hasattr(pacsflow.bus, name), name


def test_create_bus_defaults_to_the_embedded_bus_in_the_state_file(tmp_path: Path) -> None:
    settings = Settings(state=StateSettings(path=tmp_path / "state.db"))
    bus = create_bus(settings, CollectorRegistry())
    assert isinstance(bus, EmbeddedBus)
    assert bus._path == str(tmp_path / "state.db")


def test_create_bus_gives_rabbitmq_when_configured() -> None:
    settings = Settings(
        bus=BusSettings(backend="rabbitmq", url=SecretStr("amqp://u:p@broker:5672/"))
    )
    assert isinstance(create_bus(settings, CollectorRegistry()), RabbitBus)


def test_options_take_fields_the_settings_define() -> None:
    """Timings move into BusSettings one by one; until then the defaults apply."""
    assert BusOptions.from_settings(BusSettings()) == BusOptions()


def test_retry_delay_grows_and_is_capped() -> None:
    options = BusOptions(retry_delay=0.5, retry_delay_max=3.0)
    assert [options.retry_delay_for(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
