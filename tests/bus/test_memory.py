"""The in-memory bus passes the contract too (it is the embedded bus on ``:memory:``)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from pacsflow.bus import BusOptions, EventBus, MemoryBus, queue_name
from pacsflow.config import BusSettings
from tests.bus.contract import FAST, BusContract


class _Factory:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.buses: list[MemoryBus] = []

    async def __call__(
        self,
        *,
        prefetch: int = 4,
        delivery_limit: int = 3,
        options: BusOptions = FAST,
        registry: CollectorRegistry | None = None,
    ) -> EventBus:
        settings = BusSettings(
            queue_prefix=self.prefix, prefetch=prefetch, delivery_limit=delivery_limit
        )
        bus = MemoryBus(
            settings,
            registry=CollectorRegistry() if registry is None else registry,
            options=options,
        )
        await bus.start()
        self.buses.append(bus)
        return bus


class TestMemoryBus(BusContract):
    @pytest.fixture
    async def make_bus(self, unique_prefix: str) -> AsyncIterator[_Factory]:
        factory = _Factory(unique_prefix)
        yield factory
        for bus in factory.buses:
            await bus.close()

    async def inject_raw(self, bus: EventBus, service: str, event_type: str, body: bytes) -> None:
        assert isinstance(bus, MemoryBus)
        async with bus._transaction() as db:
            await db.execute(
                "INSERT INTO bus_messages "
                "(queue, service, event_type, message_id, body, published_at, available_at) "
                "VALUES (?, ?, ?, NULL, ?, ?, ?)",
                (
                    queue_name(bus._settings.queue_prefix, service, event_type),
                    service, event_type, body, time.time(), time.time(),
                ),
            )
        bus._wake(None)

    # Nothing outlives a memory bus, so a second bus cannot see the first one's messages.
    test_a_message_in_flight_when_the_bus_closes_is_delivered_again = None  # type: ignore[assignment]
