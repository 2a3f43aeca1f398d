"""The notifier service end to end: events on a real bus, the real state store, a real SMTP
server (aiosmtpd), the mail folder and a webhook receiver."""

from __future__ import annotations

import asyncio
import email
import email.policy
from pathlib import Path

import aio_pika
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from pacsflow.bus import EmbeddedBus, RabbitBus, RejectEvent, queue_name
from pacsflow.config import SERVICES, BusSettings, Settings, StateSettings
from pacsflow.events import (
    EVENT_TYPES,
    Event,
    FileReady,
    FileReadyPayload,
    PatientComplete,
    PatientCompletePayload,
    ReadyFile,
    Source,
)
from pacsflow.runtime import run_services
from pacsflow.store import Database, open_database, upgrade

from pacsflow_notifier.alerts import Incidents
from pacsflow_notifier.outbox import Outbox

from .conftest import FAST_BUS
from .support import (
    ALERT_EMAIL,
    ROUTE_EMAIL,
    SmtpServer,
    WebhookReceiver,
    eventually,
    file_failed,
    make_settings,
    metric,
    running_notifier,
    smtp_settings,
    study_complete,
    subject,
)

HANDLED = "pacsflow_bus_events_handled_total"
ATTEMPTS = "pacsflow_notifier_delivery_attempts_total"


def failed_attempts(registry: CollectorRegistry, channel: str = "email") -> float:
    return metric(registry, ATTEMPTS, channel=channel, status="failed")


def handled(registry: CollectorRegistry, event_type: str) -> float:
    return metric(registry, HANDLED, service="notifier", event_type=event_type, outcome="ack")


async def quiet(seconds: float) -> None:
    """Give the notifier time to do anything more it would (wrongly) do."""
    await asyncio.sleep(seconds)


class TestStudyComplete:
    async def test_one_event_sends_one_mail_with_subject_and_body(
        self, db: Database, bus: EmbeddedBus, smtp: SmtpServer, registry: CollectorRegistry,
        tmp_path: Path,
    ) -> None:
        settings = make_settings(
            tmp_path, smtp=smtp_settings(smtp), recipients={"study-complete": [ALERT_EMAIL]}
        )
        async with running_notifier(settings, db, bus, registry):
            await bus.publish(study_complete())
            await eventually(lambda: smtp.mailbox.mails)
            await eventually(
                lambda: metric(registry, "pacsflow_notifier_notifications_pending", channel="email")
                == 0
            )
            await quiet(0.5)
        (sender, rcpts, _), = smtp.mailbox.envelopes
        assert sender == "pacsflow@hospital.example"
        assert rcpts == [ROUTE_EMAIL, ALERT_EMAIL]
        mail, = smtp.mailbox.mails
        assert subject(mail) == (
            "CT_RESEARCH TRANSFER SUCCESS for 4707 files "
            "(total number of files received: 4707) CT THORAX MIT KM"
        )
        body = mail.get_content()
        assert "Study:              CT THORAX MIT KM" in body
        assert "Stored in:          /data/storage/CT_RESEARCH/" in body
        assert "First received:     2026-11-23 09:00:00 CET" in body
        assert "Duration:           12 min 05 s" in body
        assert metric(registry, ATTEMPTS, channel="email", status="sent") == 1
        assert failed_attempts(registry) == 0
        assert metric(
            registry, "pacsflow_notifier_notifications_queued_total",
            channel="email", kind="study-complete",
        ) == 1

    async def test_event_delivered_three_times_sends_one_mail(
        self, db: Database, bus: EmbeddedBus, smtp: SmtpServer, registry: CollectorRegistry,
        tmp_path: Path,
    ) -> None:
        event = study_complete()
        async with running_notifier(make_settings(tmp_path, smtp=smtp_settings(smtp)), db, bus,
                                    registry):
            await bus.publish(event)
            await eventually(lambda: smtp.mailbox.mails)
            # The same event again: after the mail went out, and twice at once.
            await bus.publish(event, event)
            await eventually(lambda: handled(registry, "study-complete") == 3)
            await quiet(0.5)
        assert len(smtp.mailbox.mails) == 1
        assert len(await Outbox(db).rows()) == 1

    async def test_mail_waits_for_a_stopped_smtp_server_and_arrives_once(
        self, db: Database, bus: EmbeddedBus, registry: CollectorRegistry, tmp_path: Path
    ) -> None:
        server = SmtpServer()  # not started: the port refuses connections
        settings = make_settings(
            tmp_path, smtp=smtp_settings(server, timeout=2), failing_after_attempts=3
        )
        async with running_notifier(settings, db, bus, registry):
            await bus.publish(study_complete())
            await eventually(lambda: failed_attempts(registry) >= 3)
            # The event itself was handled (acknowledged) at once; only the mail waits.
            assert handled(registry, "study-complete") == 1
            await eventually(
                lambda: metric(registry, "pacsflow_notifier_notifications_failing", channel="email")
                == 1
            )
            assert metric(registry, "pacsflow_notifier_notifications_pending", channel="email") == 1
            server.start()
            try:
                await eventually(lambda: server.mailbox.mails)
                await quiet(1.0)  # several retry periods
            finally:
                server.stop()
        assert len(server.mailbox.mails) == 1
        row, = await Outbox(db).rows()
        assert row["status"] == "sent" and row["attempts"] >= 3

    async def test_mails_waiting_for_the_server_go_as_soon_as_it_answers_again(
        self, sqlite_db: Database, bus: EmbeddedBus, registry: CollectorRegistry, tmp_path: Path
    ) -> None:
        server = SmtpServer()
        # A first retry only after a minute: the waiting mail must not need it.
        settings = make_settings(
            tmp_path, smtp=smtp_settings(server, timeout=2), retry_initial_seconds=60,
            retry_max_seconds=600,
        )
        async with running_notifier(settings, sqlite_db, bus, registry):
            await bus.publish(study_complete(study_instance_uid="1.1"))
            await eventually(lambda: failed_attempts(registry) == 1)
            server.start()
            try:
                # A new mail goes through at once, and shows the server is back.
                await bus.publish(study_complete(study_instance_uid="1.2"))
                await eventually(lambda: len(server.mailbox.mails) == 2, timeout=5)
            finally:
                server.stop()
        uids = sorted(
            line.split()[-1] for mail in server.mailbox.mails
            for line in mail.get_content().splitlines() if line.startswith("Study Instance UID:")
        )
        assert uids == ["1.1", "1.2"]

    async def test_stopping_during_a_send_finishes_it_and_sends_nothing_twice(
        self, sqlite_db: Database, bus: EmbeddedBus, smtp: SmtpServer, tmp_path: Path
    ) -> None:
        smtp.mailbox.delay = 0.5
        settings = make_settings(tmp_path, smtp=smtp_settings(smtp))
        async with running_notifier(settings, sqlite_db, bus):
            await bus.publish(study_complete())
            await eventually(smtp.mailbox.receiving.is_set)
            # The block ends here: the service is cancelled while the server holds the mail.
        assert len(smtp.mailbox.mails) == 1
        row, = await Outbox(sqlite_db).rows()
        assert row["status"] == "sent"
        async with running_notifier(settings, sqlite_db, bus):
            await quiet(0.5)
        assert len(smtp.mailbox.mails) == 1

    async def test_reopened_study_sends_a_second_marked_mail(
        self, sqlite_db: Database, bus: EmbeddedBus, smtp: SmtpServer, tmp_path: Path
    ) -> None:
        settings = make_settings(tmp_path, smtp=smtp_settings(smtp))
        async with running_notifier(settings, sqlite_db, bus):
            await bus.publish(study_complete())
            await eventually(lambda: smtp.mailbox.mails)
            await bus.publish(study_complete(files_received=4719, files_new=12, completion=2))
            await eventually(lambda: len(smtp.mailbox.mails) == 2)
        second = smtp.mailbox.mails[1]
        assert subject(second).startswith(
            "CT_RESEARCH TRANSFER SUCCESS for 12 more files (total number of files received: 4719)"
        )
        assert "RE-OPENED: 12 more files" in second.get_content()

    async def test_study_description_cannot_add_mail_headers(
        self, sqlite_db: Database, bus: EmbeddedBus, smtp: SmtpServer, tmp_path: Path
    ) -> None:
        description = "CT\r\nBcc: victim@evil.example\r\nX-Injected: yes\r\n\r\nfake body"
        settings = make_settings(tmp_path, smtp=smtp_settings(smtp))
        async with running_notifier(settings, sqlite_db, bus):
            await bus.publish(study_complete(study_description=description))
            await eventually(lambda: smtp.mailbox.mails)
        (_, rcpts, raw), = smtp.mailbox.envelopes
        assert rcpts == [ROUTE_EMAIL]
        head = raw.split(b"\r\n\r\n", 1)[0]
        injected = [line for line in head.split(b"\r\n") if line.startswith((b"Bcc", b"X-Inj"))]
        assert injected == []
        mail, = smtp.mailbox.mails
        assert mail["Bcc"] is None and mail["X-Injected"] is None
        assert subject(mail).endswith("CT Bcc: victim@evil.example X-Injected: yes fake body")

    async def test_without_smtp_host_the_mail_is_an_eml_file(
        self, sqlite_db: Database, bus: EmbeddedBus, tmp_path: Path
    ) -> None:
        settings = make_settings(tmp_path)
        harvested = PatientComplete(
            source=Source(service="harvester", instance="test"),
            payload=PatientCompletePayload(
                patient_id="PAT-7", series_count=3, instances=212, archive_path="/h/PAT-7.zip"
            ),
        )
        async with running_notifier(settings, sqlite_db, bus):
            # A route without e-mail addresses: the demo still shows its notification.
            await bus.publish(study_complete(route="QUIET"), harvested)
            folder = tmp_path / "mail"
            await eventually(lambda: len(list(folder.glob("*.eml"))) == 2)
            await quiet(0.3)
        files = list(folder.glob("*.eml"))
        # Only the finished files: no temporary file is left behind.
        assert len(list(folder.iterdir())) == 2
        mails = [
            email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            for path in files
        ]
        subjects = sorted(subject(mail) for mail in mails)  # type: ignore[arg-type]
        assert subjects[0] == "HARVEST COMPLETE for patient PAT-7: 3 series, 212 images"
        assert subjects[1].startswith("QUIET TRANSFER SUCCESS for 4707 files")
        assert {mail["To"] for mail in mails} == {"undisclosed-recipients:;"}

    async def test_pending_mail_survives_a_restart_and_is_sent_once(
        self, sqlite_db: Database, bus: EmbeddedBus, tmp_path: Path
    ) -> None:
        server = SmtpServer()
        settings = make_settings(tmp_path, smtp=smtp_settings(server, timeout=2))
        first = CollectorRegistry()
        async with running_notifier(settings, sqlite_db, bus, first):
            await bus.publish(study_complete())
            await eventually(lambda: failed_attempts(first) >= 2)
        server.start()
        try:
            second = CollectorRegistry()
            async with running_notifier(settings, sqlite_db, bus, second):
                await eventually(lambda: server.mailbox.mails)
                await quiet(0.5)
        finally:
            server.stop()
        assert len(server.mailbox.mails) == 1
        assert metric(second, ATTEMPTS, channel="email", status="sent") == 1


class TestAlerts:
    async def test_500_failed_files_make_one_aggregated_alert(
        self, db: Database, bus: EmbeddedBus, smtp: SmtpServer, registry: CollectorRegistry,
        tmp_path: Path,
    ) -> None:
        # Longer than handling 500 events takes (0.5 s on SQLite, 1.1 s on PostgreSQL here).
        window = 5.0
        settings = make_settings(
            tmp_path, smtp=smtp_settings(smtp), recipients={"file-failed": [ALERT_EMAIL]},
            alert_window_seconds=window,
        )
        events = [
            file_failed(i, "PACS_BACKUP" if i % 10 == 0 else "PACS_MAIN",
                        "connection refused" if i % 100 == 0 else None)
            for i in range(500)
        ]
        async with running_notifier(settings, db, bus, registry):
            for start in range(0, 500, 50):
                await bus.publish(*events[start:start + 50])
            await eventually(lambda: handled(registry, "file-failed") == 500, timeout=60)
            await eventually(lambda: smtp.mailbox.mails, timeout=30)
            # Every failure went into that alert: none is left for another one.
            assert await Incidents(db).oldest_open("file-failed") is None
            await quiet(0.5)
        (_, rcpts, _), = smtp.mailbox.envelopes
        assert rcpts == [ALERT_EMAIL]
        mail, = smtp.mailbox.mails
        assert subject(mail) == "FAILED: 500 files could not be sent to PACS_MAIN, PACS_BACKUP"
        body = mail.get_content()
        assert "By destination:\r\n  450  PACS_MAIN\r\n   50  PACS_BACKUP\r\n" in body
        assert "Most common errors:\r\n  495  DIMSE status 0xA700\r\n    5  connection refused" \
            in body
        assert "… and 490 more" in body
        assert metric(
            registry, "pacsflow_notifier_incidents_reported_total", kind="file-failed"
        ) == 500

    async def test_new_dead_letters_raise_one_alert(
        self, sqlite_db: Database, bus: EmbeddedBus, smtp: SmtpServer, tmp_path: Path
    ) -> None:
        async def refuse(event: Event) -> None:
            raise RejectEvent("the files are gone")

        await bus.subscribe("uploader", ["file-ready"], refuse)
        settings = make_settings(
            tmp_path, smtp=smtp_settings(smtp), recipients={"dead-letters": [ALERT_EMAIL]},
        )
        ready = [
            FileReady(
                source=Source(service="watcher", instance="test"),
                payload=FileReadyPayload(
                    files=[ReadyFile(path=f"/in/{i}.dcm", size=1, sop_instance_uid="1",
                                     series_instance_uid="2", study_instance_uid="3",
                                     sop_class_uid="4", transfer_syntax_uid="5")],
                    batch_key=f"b{i}",
                ),
            )
            for i in range(3)
        ]
        async with running_notifier(settings, sqlite_db, bus):
            await bus.publish(*ready)
            await eventually(lambda: smtp.mailbox.mails)
            await quiet(settings.notifier.alert_window_seconds + 0.5)  # known letters: no repeat
        mail, = smtp.mailbox.mails
        assert subject(mail) == (
            "DEAD LETTERS: 3 messages could not be handled (uploader file-ready)"
        )
        assert "rejected by the handler: the files are gone" in mail.get_content()


class TestWebhooks:
    async def test_each_message_is_posted_once_after_the_receiver_recovers(
        self, db: Database, bus: EmbeddedBus, webhook: WebhookReceiver,
        registry: CollectorRegistry, tmp_path: Path,
    ) -> None:
        webhook.status = 503
        settings = make_settings(
            tmp_path,
            webhooks={
                "chat": {"url": webhook.url, "kinds": ["study-complete"]},
                "ops": {"url": webhook.url, "kinds": ["study-complete"], "format": "json"},
            },
        )
        event = study_complete()
        async with running_notifier(settings, db, bus, registry):
            await bus.publish(event, event, event)
            await eventually(lambda: failed_attempts(registry, "webhook") >= 4)
            webhook.status = 200
            await eventually(lambda: len(webhook.accepted) >= 2)
            await eventually(lambda: handled(registry, "study-complete") == 3)
            await quiet(0.5)
        chat = [body for body in webhook.accepted if set(body) == {"text"}]
        ops = [body for body in webhook.accepted if "facts" in body]
        assert len(chat) == 1 and len(ops) == 1 and len(webhook.accepted) == 2
        assert chat[0]["text"].startswith("CT_RESEARCH TRANSFER SUCCESS for 4707 files")
        assert ops[0]["kind"] == "study-complete" and ops[0]["facts"]["files_received"] == 4707
        # The e-mail went to the mail folder alongside (no SMTP host configured).
        assert len(list((tmp_path / "mail").glob("*.eml"))) == 1


async def test_pacsflow_run_writes_the_demo_mail(tmp_path: Path) -> None:
    """The embedded deployment: one SQLite file for state and bus, migrations at start-up,
    and no SMTP host, so the study-complete notification is an .eml file."""
    settings = Settings(
        instance="demo",
        state={"path": tmp_path / "pacsflow.db"},
        http={"host": "127.0.0.1", "port": 0},
        notifier={"mail_folder": tmp_path / "mail", "poll_seconds": 0.2},
    )
    stop = asyncio.Event()
    service = asyncio.create_task(run_services(settings, ["notifier"], stop=stop))
    # Another process's view of the same file (the router would publish like this).
    publisher = EmbeddedBus(settings.state.path, settings.bus, registry=CollectorRegistry(),
                            options=FAST_BUS)
    try:
        await eventually(lambda: service.done() or settings.state.path.exists())
        await publisher.start()
        notifier_queue = queue_name(settings.bus.queue_prefix, "notifier", "study-complete")
        await eventually(
            lambda: service.done() or _has_queue(publisher, notifier_queue), timeout=15
        )
        assert not service.done()
        await publisher.publish(study_complete(route="PACSFLOW"))
        files = await eventually(lambda: list((tmp_path / "mail").glob("*.eml")), timeout=15)
    finally:
        await publisher.close()
        stop.set()
    assert await service == 0
    mail = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert subject(mail).startswith("PACSFLOW TRANSFER SUCCESS for 4707 files")


async def _has_queue(bus: EmbeddedBus, name: str) -> bool:
    return name in await bus.queue_depths()


@pytest.mark.rabbit
@pytest.mark.postgres
async def test_on_rabbitmq_and_postgresql_a_redelivered_event_sends_one_mail(
    rabbit_url: str, unique_prefix: str, pg_dsn: str, smtp: SmtpServer, tmp_path: Path
) -> None:
    """The distributed deployment: the same exactly-once behaviour on RabbitMQ and PostgreSQL."""
    registry = CollectorRegistry()
    bus_settings = BusSettings(
        backend="rabbitmq", url=SecretStr(rabbit_url), exchange=f"{unique_prefix}.events",
        queue_prefix=unique_prefix, delivery_limit=3,
    )
    state = StateSettings(backend="postgres", dsn=SecretStr(pg_dsn), pool_size=4)
    settings = make_settings(tmp_path, smtp=smtp_settings(smtp), state=state.model_dump())
    rabbit = RabbitBus(bus_settings, registry=registry, options=FAST_BUS)
    db = await open_database(state)
    try:
        await upgrade(db)
        await rabbit.start()
        event = study_complete()
        async with running_notifier(settings, db, rabbit, registry):
            await rabbit.publish(event)
            await eventually(lambda: smtp.mailbox.mails)
            await rabbit.publish(event, event)
            await eventually(lambda: handled(registry, "study-complete") == 3)
            await quiet(0.5)
        assert len(smtp.mailbox.mails) == 1
    finally:
        await rabbit.close()
        await db.close()
        await _delete_rabbit_namespace(rabbit_url, unique_prefix)


async def _delete_rabbit_namespace(url: str, prefix: str) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        for service in SERVICES:
            for event_type in EVENT_TYPES:
                await channel.queue_delete(queue_name(prefix, service, event_type))
            await channel.queue_delete(f"{prefix}.{service}.dead-letters")
        await channel.exchange_delete(f"{prefix}.events")
        await channel.exchange_delete(f"{prefix}.events.dead-letters")
    finally:
        await connection.close()
