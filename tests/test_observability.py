"""The health endpoint and the JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from prometheus_client import CollectorRegistry, Counter

from pacsflow.http import HealthServer
from pacsflow.logs import JsonFormatter, log_context


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


@pytest.fixture
async def server():  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    Counter("pacsflow_test_things", "things", ["service"], registry=registry).labels(
        service="watcher").inc(3)
    health = HealthServer(registry, "127.0.0.1", 0, check_timeout=0.5)
    await health.start()
    yield health
    await health.close()


class TestHealthServer:
    async def test_metrics_in_prometheus_text_format(self, server: HealthServer) -> None:
        status, body = await http_get(server.bound_port, "/metrics")
        assert status == 200
        assert 'pacsflow_test_things_total{service="watcher"} 3.0' in body

    async def test_healthz_is_alive_without_checks(self, server: HealthServer) -> None:
        assert await http_get(server.bound_port, "/healthz") == (200, "ok\n")

    async def test_readyz_follows_its_checks(self, server: HealthServer) -> None:
        state = {"bus": True}

        async def bus_ready() -> bool:
            return state["bus"]

        async def store_hangs() -> bool:
            await asyncio.sleep(10)
            return True

        server.add_check("bus", bus_ready)
        assert (await http_get(server.bound_port, "/readyz"))[0] == 200
        state["bus"] = False
        status, body = await http_get(server.bound_port, "/readyz")
        assert status == 503 and json.loads(body) == {"bus": False}
        state["bus"] = True
        server.add_check("state", store_hangs)  # a check that times out is "not ready"
        status, body = await http_get(server.bound_port, "/readyz")
        assert status == 503 and json.loads(body) == {"bus": True, "state": False}

    async def test_unknown_path(self, server: HealthServer) -> None:
        assert (await http_get(server.bound_port, "/nothing"))[0] == 404


class TestJsonLogs:
    def record(self, message: str, **extra: object) -> dict[str, object]:
        record = logging.makeLogRecord({"msg": message, "levelname": "INFO", "name": "t", **extra})
        return json.loads(JsonFormatter().format(record))

    def test_context_fields_are_on_every_line(self) -> None:
        with log_context(service="uploader", event_id="e-1", correlation_id="c-9"):
            entry = self.record("sent")
        assert entry["service"] == "uploader"
        assert entry["event_id"] == "e-1" and entry["correlation_id"] == "c-9"
        assert "event_id" not in self.record("outside")

    def test_extra_fields_are_kept(self) -> None:
        assert self.record("x", destination="pacs")["destination"] == "pacs"
