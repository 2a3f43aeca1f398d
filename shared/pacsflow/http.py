"""The observability endpoint of a process: ``/metrics``, ``/healthz`` and ``/readyz``.

A small asyncio HTTP/1.1 server, so readiness checks can await the bus and the state store.
``/healthz`` says the process is alive; ``/readyz`` says the bus and state store answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["HealthServer", "ReadinessCheck"]

ReadinessCheck = Callable[[], Awaitable[bool]]

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


@dataclass
class HealthServer:
    """Serves metrics and health for one process on one port."""

    registry: CollectorRegistry
    host: str = "0.0.0.0"
    port: int = 9400
    checks: dict[str, ReadinessCheck] = field(default_factory=dict)
    check_timeout: float = 5.0
    _server: asyncio.Server | None = None

    def add_check(self, name: str, check: ReadinessCheck) -> None:
        """Make ``/readyz`` depend on ``check`` returning True."""
        self.checks[name] = check

    @property
    def bound_port(self) -> int:
        """The port actually listened on (useful when configured as 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info("metrics and health on http://%s:%d", self.host, self.bound_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def readiness(self) -> dict[str, bool]:
        """Run every readiness check; a check that raises or times out counts as not ready."""
        results: dict[str, bool] = {}
        # A copy: a service may add a check while /readyz is being answered.
        for name, check in list(self.checks.items()):
            try:
                async with asyncio.timeout(self.check_timeout):
                    results[name] = bool(await check())
            except Exception as err:  # noqa: BLE001 - any failure means "not ready"
                log.warning("readiness check %s failed: %s", name, err)
                results[name] = False
        return results

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose a cancellation.
            async with asyncio.timeout(10):
                request_line = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # headers are not needed
            parts = request_line.decode("latin-1").split()
            if len(parts) < 2:
                return
            method, path = parts[0], parts[1].split("?", 1)[0]
            status, content_type, body = await self._route(method, path)
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
                f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            results = await self.readiness()
            status = 200 if all(results.values()) else 503
            return status, "application/json", json.dumps(results).encode() + b"\n"
        return 404, "text/plain", b"not found\n"
