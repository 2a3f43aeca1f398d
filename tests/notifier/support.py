"""Test helpers for the notifier: a real SMTP server (aiosmtpd), a webhook receiver, events,
settings with short timings, and a running notifier service."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from prometheus_client import CollectorRegistry

from pacsflow.bus import EventBus
from pacsflow.config import Settings
from pacsflow.events import (
    FileFailed,
    FileOutcome,
    FileOutcomePayload,
    Source,
    StudyComplete,
    StudyCompletePayload,
)
from pacsflow.http import HealthServer
from pacsflow.runtime import ServiceContext
from pacsflow.store import Database

from pacsflow_notifier.service import CONSUMES, run

ROUTE = "CT_RESEARCH"
ROUTE_EMAIL = "research@hospital.example"
ALERT_EMAIL = "pacs-admin@hospital.example"
SOURCE = Source(service="router-scp", instance="test")
T0 = datetime(2026, 11, 23, 8, 0, 0, tzinfo=UTC)


def free_port() -> int:
    """A TCP port nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def eventually(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]], timeout: float = 15.0
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


# --- SMTP ----------------------------------------------------------------------------------


class Mailbox:
    """An aiosmtpd handler that keeps every accepted mail."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.envelopes: list[tuple[str, list[str], bytes]] = []
        #: seconds to wait before accepting a mail (a slow server)
        self.delay = 0.0
        #: set once a mail's data has arrived, before the server answers
        self.receiving = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.receiving.set()
        await asyncio.sleep(self.delay)
        with self._lock:
            self.envelopes.append(
                (envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content))
            )
        return "250 OK"

    @property
    def mails(self) -> list[EmailMessage]:
        """The accepted mails, parsed."""
        with self._lock:
            raw = [data for _, _, data in self.envelopes]
        return [
            email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[misc]
            for data in raw
        ]


def subject(mail: EmailMessage) -> str:
    """The subject as a mail client shows it (folded headers unfolded, RFC 5322 2.2.3)."""
    return " ".join(str(mail["Subject"]).split())


class SmtpServer:
    """A real SMTP server on 127.0.0.1 that a test can stop and start again on its port."""

    def __init__(self, port: int | None = None, **smtp_options: Any) -> None:
        self.port = port or free_port()
        self.mailbox = Mailbox()
        self._options = smtp_options
        self._controller: Controller | None = None

    def start(self) -> None:
        # A Controller cannot be started twice: each start is a new one on the same port.
        self._controller = Controller(
            self.mailbox, hostname="127.0.0.1", port=self.port, **self._options
        )
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


# --- webhooks ------------------------------------------------------------------------------


class WebhookReceiver:
    """A tiny HTTP server that records JSON POSTs and answers with ``status``."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        #: the bodies of the POSTs answered with a 2xx status
        self.accepted: list[Any] = []
        self.status = 200
        self.redirect_to: str | None = None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server naming
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"null")
                receiver.requests.append((self.path, dict(self.headers.items()), body))
                if receiver.redirect_to is not None:
                    self.send_response(307)
                    self.send_header("Location", receiver.redirect_to)
                else:
                    self.send_response(receiver.status)
                    if 200 <= receiver.status < 300:
                        receiver.accepted.append(body)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802
                receiver.requests.append((self.path, dict(self.headers.items()), "GET"))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks/secret-token"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()



# --- settings and events -------------------------------------------------------------------


def make_settings(
    tmp_path: Path, *, state: dict[str, Any] | None = None, **notifier: Any
) -> Settings:
    """Settings with one route that has an e-mail address, and notifier timings in
    fractions of a second."""
    values: dict[str, Any] = {
        "mail_folder": tmp_path / "mail",
        "retry_initial_seconds": 0.05,
        "retry_max_seconds": 0.3,
        "poll_seconds": 0.2,
        "alert_window_seconds": 1.0,
        "dead_letter_check_seconds": 0.2,
        "timezone": "Europe/Zurich",
    }
    values.update(notifier)
    return Settings(
        instance="test-host",
        state=state or {"path": tmp_path / "state.db"},
        router={
            "routes": {
                ROUTE: {"path": tmp_path / "storage", "emails": [ROUTE_EMAIL]},
                "QUIET": {"path": tmp_path / "quiet"},
            }
        },
        notifier=values,
    )


def smtp_settings(server: SmtpServer, **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1", "port": server.port, "sender": "pacsflow@hospital.example", **extra
    }


def study_complete(**payload: Any) -> StudyComplete:
    values: dict[str, Any] = {
        "route": ROUTE,
        "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "patient_id": "PAT-0042",
        "study_description": "CT THORAX MIT KM",
        "files_received": 4707,
        "files_new": 4707,
        "completion": 1,
        "storage_path": "/data/storage/CT_RESEARCH/1.2.826.0.1.3680043.8.498.1",
        "first_received": T0,
        "last_received": T0 + timedelta(minutes=12, seconds=5),
    }
    values.update(payload)
    return StudyComplete(source=SOURCE, payload=StudyCompletePayload(**values))


def file_failed(index: int, destination: str = "PACS_MAIN", error: str | None = None) -> FileFailed:
    return FileFailed(
        source=Source(service="uploader", instance="test"),
        payload=FileOutcomePayload(
            files=[
                FileOutcome(
                    path=f"/data/inbox/batch/{index:05d}.dcm",
                    sop_instance_uid=f"1.2.3.{index}",
                    destination=destination,
                    status=0xA700 if error is None else None,
                    attempts=5,
                    error=error,
                )
            ]
        ),
    )


# --- the service ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_notifier(
    settings: Settings, db: Database, bus: EventBus, registry: CollectorRegistry | None = None
) -> AsyncIterator[ServiceContext]:
    """The notifier service running as ``pacsflow run`` would run it, until the block ends.
    Its queues are declared first, so every event published in the block reaches it."""
    registry = registry or CollectorRegistry()
    ctx = ServiceContext(
        "notifier", settings, bus, db, registry, HealthServer(registry, "127.0.0.1", 0)
    )
    await bus.declare("notifier", CONSUMES)
    task = asyncio.create_task(run(ctx), name="notifier-under-test")
    await asyncio.sleep(0.05)
    if task.done():
        task.result()  # raises what stopped it
    try:
        yield ctx
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
