"""The channels against real peers: aiosmtpd (plain, STARTTLS, TLS, login), the mail folder,
and a local HTTP server for webhooks."""

from __future__ import annotations

import email
import email.policy
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import AuthResult, LoginPassword

from pacsflow.config import NotifierSettings, load_settings

from pacsflow_notifier.channels import (
    DeliveryError,
    EmailChannel,
    FolderTransport,
    WebhookChannel,
)
from pacsflow_notifier.outbox import OutboxMessage

from ..conftest import require_tool
from .support import SmtpServer, WebhookReceiver, free_port, subject

PASSWORD = "c0rrect-h0rse"


def message(**fields: Any) -> OutboxMessage:
    values: dict[str, Any] = {
        "id": "5f1d0c6a9b2e4f7a8c3d1e0b9a8f7e6d",
        "channel": "email",
        "target": "",
        "kind": "study-complete",
        "source": "event:1",
        "recipients": ("research@hospital.example", "Dr. Who <who@hospital.example>"),
        "subject": "CT_RESEARCH TRANSFER SUCCESS for 3 files (total number of files received: 3)",
        "text": "body\n",
        "html": None,
        "json_body": None,
        "attempts": 0,
        "created_at": 1_790_000_000.0,
    }
    values.update(fields)
    return OutboxMessage(**values)


def webhook_message() -> OutboxMessage:
    return message(channel="webhook", target="teams", json_body="{}")


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def channel(**smtp: Any) -> EmailChannel:
    return EmailChannel(NotifierSettings(smtp={"sender": "pacsflow@hospital.example", **smtp}))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (the client trusts it through ca_file)."""
    openssl = require_tool("openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, certificate))
    return context


def authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, data: Any
) -> AuthResult:
    ok = (
        isinstance(data, LoginPassword)
        and data.login == b"pacsflow"
        and data.password == PASSWORD.encode()
    )
    # handled=False: aiosmtpd answers 535 itself.
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def starttls_server(certificate: tuple[Path, Path]) -> Iterator[SmtpServer]:
    server = SmtpServer(
        tls_context=server_context(certificate), require_starttls=True,
        authenticator=authenticator, auth_required=True,
    )
    server.start()
    yield server
    server.stop()


class TestSmtp:
    async def test_mail_has_stable_headers_and_goes_to_every_recipient(
        self, smtp: SmtpServer
    ) -> None:
        email_channel = channel(host="127.0.0.1", port=smtp.port)
        await email_channel.send(message())
        await email_channel.send(message())  # a second attempt is the same mail
        (sender, rcpts, _), _ = smtp.mailbox.envelopes
        assert sender == "pacsflow@hospital.example"
        assert rcpts == ["research@hospital.example", "who@hospital.example"]
        first, second = smtp.mailbox.mails
        assert first["Message-ID"] == second["Message-ID"] == (
            "<5f1d0c6a9b2e4f7a8c3d1e0b9a8f7e6d.notifier@hospital.example>"
        )
        assert first["Date"] == second["Date"]
        assert subject(first) == message().subject
        assert first["Auto-Submitted"] == "auto-generated"
        assert first["X-Pacsflow-Kind"] == "study-complete"
        assert first.get_content().splitlines() == ["body"]

    async def test_starttls_and_login_with_the_password_from_the_environment(
        self, starttls_server: SmtpServer, certificate: tuple[Path, Path],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv("PACSFLOW_NOTIFIER__SMTP__PASSWORD", PASSWORD)
        settings = load_settings(
            None,
            notifier={"smtp": {
                "host": "127.0.0.1", "port": starttls_server.port, "starttls": True,
                "ca_file": str(certificate[0]), "username": "pacsflow",
                "sender": "pacsflow@hospital.example",
            }},
        )
        await EmailChannel(settings.notifier).send(message())
        assert len(starttls_server.mailbox.mails) == 1

    async def test_password_from_a_file(
        self, starttls_server: SmtpServer, certificate: tuple[Path, Path], tmp_path: Path
    ) -> None:
        secret = tmp_path / "smtp_password"
        secret.write_text(PASSWORD + "\n")
        await channel(
            host="127.0.0.1", port=starttls_server.port, starttls=True,
            ca_file=certificate[0], username="pacsflow", password_file=secret,
        ).send(message())
        assert len(starttls_server.mailbox.mails) == 1

    async def test_wrong_password_is_refused_without_showing_it(
        self, starttls_server: SmtpServer, certificate: tuple[Path, Path]
    ) -> None:
        with pytest.raises(DeliveryError) as caught:
            await channel(
                host="127.0.0.1", port=starttls_server.port, starttls=True,
                ca_file=certificate[0], username="pacsflow", password="wrong-one",
            ).send(message())
        assert not caught.value.unreachable
        assert "535" in str(caught.value) and "wrong-one" not in str(caught.value)
        assert starttls_server.mailbox.mails == []

    async def test_server_requiring_starttls_refuses_a_plain_login(
        self, starttls_server: SmtpServer
    ) -> None:
        with pytest.raises(DeliveryError):
            await channel(
                host="127.0.0.1", port=starttls_server.port, username="pacsflow", password=PASSWORD,
            ).send(message())

    async def test_untrusted_certificate_is_refused(self, starttls_server: SmtpServer) -> None:
        with pytest.raises(DeliveryError, match="CERTIFICATE_VERIFY_FAILED") as caught:
            await channel(
                host="127.0.0.1", port=starttls_server.port, starttls=True,
                username="pacsflow", password=PASSWORD,
            ).send(message())
        assert caught.value.unreachable
        assert starttls_server.mailbox.mails == []

    async def test_tls_from_the_start(self, certificate: tuple[Path, Path]) -> None:
        server = SmtpServer(ssl_context=server_context(certificate))
        server.start()
        try:
            await channel(
                host="127.0.0.1", port=server.port, tls=True, ca_file=certificate[0]
            ).send(message())
        finally:
            server.stop()
        assert len(server.mailbox.mails) == 1

    async def test_server_down_is_unreachable(self) -> None:
        with pytest.raises(DeliveryError) as caught:
            await channel(host="127.0.0.1", port=free_port(), timeout=5).send(message())
        assert caught.value.unreachable
        assert "ConnectionRefusedError" in str(caught.value)

    async def test_mail_without_recipients_stays_a_file(
        self, smtp: SmtpServer, tmp_path: Path
    ) -> None:
        email_channel = EmailChannel(NotifierSettings(
            smtp={"host": "127.0.0.1", "port": smtp.port}, mail_folder=tmp_path / "mail",
        ))
        await email_channel.send(message(recipients=()))
        assert smtp.mailbox.envelopes == []
        assert len(list((tmp_path / "mail").glob("*.eml"))) == 1


class TestMailFolder:
    async def test_mail_is_written_atomically_as_an_eml_file(self, tmp_path: Path) -> None:
        folder = tmp_path / "mail"
        email_channel = EmailChannel(NotifierSettings(mail_folder=folder))
        await email_channel.send(message(html="<p>rich</p>"))
        await email_channel.send(message(html="<p>rich</p>"))  # same row: same file
        files = sorted(os.listdir(folder))
        assert files == ["20260921-141320-study-complete-5f1d0c6a9b2e.eml"]
        mail = parse((folder / files[0]).read_bytes())
        assert subject(mail) == message().subject
        assert mail["To"] == 'research@hospital.example, "Dr. Who" <who@hospital.example>'
        plain = mail.get_body(("plain",))
        assert plain is not None and plain.get_content().splitlines() == ["body"]

    async def test_no_recipients_is_a_valid_mail(self, tmp_path: Path) -> None:
        transport = FolderTransport(tmp_path / "mail")
        email_channel = EmailChannel(NotifierSettings(mail_folder=transport.folder))
        await email_channel.send(message(recipients=()))
        mail = parse(transport.path_for(message()).read_bytes())
        assert mail["To"] == "undisclosed-recipients:;"

    async def test_unwritable_folder_is_a_delivery_error(self, tmp_path: Path) -> None:
        blocked = tmp_path / "file"
        blocked.write_text("a file where the folder should be")
        with pytest.raises(DeliveryError, match="cannot write"):
            await EmailChannel(NotifierSettings(mail_folder=blocked / "mail")).send(message())


class TestWebhook:
    def hook(self, receiver: WebhookReceiver) -> WebhookChannel:
        return WebhookChannel({"teams": NotifierSettings(
            webhooks={"teams": {"url": receiver.url, "timeout": 5}}
        ).webhooks["teams"]})

    async def test_posts_the_rows_json_with_an_idempotency_key(
        self, webhook: WebhookReceiver
    ) -> None:
        await self.hook(webhook).send(
            message(channel="webhook", target="teams", json_body='{"text": "hello"}')
        )
        (path, headers, body), = webhook.requests
        assert path == "/hooks/secret-token" and body == {"text": "hello"}
        assert headers["Content-Type"] == "application/json"
        assert headers["Idempotency-Key"] == "5f1d0c6a9b2e4f7a8c3d1e0b9a8f7e6d"

    async def test_server_error_is_retried_and_never_shows_the_url(
        self, webhook: WebhookReceiver
    ) -> None:
        webhook.status = 503
        with pytest.raises(DeliveryError) as caught:
            await self.hook(webhook).send(webhook_message())
        assert caught.value.unreachable and "HTTP 503" in str(caught.value)
        assert "secret-token" not in str(caught.value)

    async def test_client_error_refuses_the_message(self, webhook: WebhookReceiver) -> None:
        webhook.status = 400
        with pytest.raises(DeliveryError) as caught:
            await self.hook(webhook).send(webhook_message())
        assert not caught.value.unreachable

    async def test_redirect_is_not_followed(self, webhook: WebhookReceiver) -> None:
        webhook.redirect_to = "/elsewhere"
        with pytest.raises(DeliveryError, match="HTTP 307"):
            await self.hook(webhook).send(webhook_message())
        assert [body for _, _, body in webhook.requests] == [{}]  # no GET followed

    async def test_unusable_url_is_a_delivery_error(self) -> None:
        hooks = NotifierSettings(webhooks={"bad": {"url": "http://bad host:x/T0KEN"}}).webhooks
        with pytest.raises(DeliveryError, match="not usable") as caught:
            await WebhookChannel(hooks).send(
                message(channel="webhook", target="bad", json_body="{}")
            )
        assert "T0KEN" not in str(caught.value)

    async def test_removed_webhook_is_a_delivery_error(self) -> None:
        with pytest.raises(DeliveryError, match="no webhook named 'gone'"):
            await WebhookChannel({}).send(message(channel="webhook", target="gone", json_body="{}"))
