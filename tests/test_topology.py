"""The queue topology: what each service consumes, declared before any service runs."""

from __future__ import annotations

import asyncio
import importlib

import pytest
from prometheus_client import CollectorRegistry

from pacsflow.bus import MemoryBus
from pacsflow.config import SERVICES
from pacsflow.events import Event, FileReady, FileReadyPayload, Source
from pacsflow.runtime import SERVICE_MODULES
from pacsflow.topology import CONSUMES, declare_queues

CONSUMER_CONSTANTS = {
    "uploader": "pacsflow_uploader.service",
    "sync": "pacsflow_sync.service",
    "notifier": "pacsflow_notifier.handlers",
}


def test_every_service_is_in_the_topology() -> None:
    assert set(CONSUMES) == set(SERVICES) == set(SERVICE_MODULES)


@pytest.mark.parametrize(("service", "module"), sorted(CONSUMER_CONSTANTS.items()))
def test_services_consume_what_the_topology_says(service: str, module: str) -> None:
    assert tuple(importlib.import_module(module).CONSUMES) == CONSUMES[service]


async def test_events_published_before_the_consumer_first_runs_are_kept() -> None:
    bus = MemoryBus(registry=CollectorRegistry())
    await bus.start()
    try:
        await declare_queues(bus, SERVICES)
        event = FileReady(source=Source(service="watcher", instance="t"),
                          payload=FileReadyPayload(files=[], batch_key="b"))
        await bus.publish(event)
        received: list[Event] = []

        async def handler(got: Event) -> None:
            received.append(got)

        await bus.subscribe("uploader", CONSUMES["uploader"], handler)
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.02)
        assert received == [event]
    finally:
        await bus.close()
