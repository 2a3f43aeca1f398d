"""Where messages go: e-mail (by SMTP, or as ``.eml`` files) and webhooks (a JSON POST).

A channel sends one outbox row or raises :class:`DeliveryError`; the delivery loop decides when
to try again. Blocking libraries (:mod:`smtplib`, :mod:`urllib`, file writes) run in a thread.

* SMTP: plain, STARTTLS or TLS from the start, certificates verified (``smtp.ca_file`` for a
  hospital's own CA), optional login. The password is read from its setting or its file at
  each connection and never logged.
* Files: without an SMTP host, each mail is written to ``notifier.mail_folder`` as a complete
  ``.eml`` file, atomically (a hidden temporary file, fsync, rename), named after the outbox row
  so a second attempt overwrites the same file.
* Webhooks: ``POST`` of the row's JSON, with an ``Idempotency-Key`` header; redirects are not
  followed (a redirected POST would arrive as a GET).
"""

from __future__ import annotations

import asyncio
import email.errors
import http.client
import json
import logging
import os
import smtplib
import socket
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Protocol

import pacsflow
from pacsflow.config import NotifierSettings, SmtpSettings, WebhookSettings
from pacsflow.errors import PacsflowError

from pacsflow_notifier.messages import clean_header
from pacsflow_notifier.outbox import OutboxMessage

__all__ = [
    "Channel",
    "DeliveryError",
    "EmailChannel",
    "FolderTransport",
    "SmtpTransport",
    "WebhookChannel",
    "build_email",
    "build_channels",
]

log = logging.getLogger(__name__)


class DeliveryError(PacsflowError):
    """A message could not be delivered this time.

    ``unreachable`` says the server (or folder) could not be reached at all, as opposed to
    refusing this one message: once it answers again, every waiting message is tried at once.
    """

    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class Channel(Protocol):
    """Sends outbox rows of one ``channel`` value."""

    name: str
    #: how long a claimed row stays reserved for one attempt (longer than any attempt takes)
    lease: float

    def describe(self, message: OutboxMessage) -> str:
        """Where ``message`` goes, for logs (no secrets)."""

    async def send(self, message: OutboxMessage) -> None:
        """Deliver the message or raise DeliveryError."""


# --- e-mail --------------------------------------------------------------------------------


def _address(value: str) -> str:
    return parseaddr(value)[1]


def _domain(sender: str) -> str:
    address = _address(sender)
    domain = address.rpartition("@")[2]
    return domain or "pacsflow.invalid"


def build_email(message: OutboxMessage, sender: str) -> EmailMessage:
    """The mail for an outbox row: stable ``Message-ID`` and ``Date`` (from the row), so a
    second attempt is the same mail; the subject is cleaned again as it enters the header."""
    mail = EmailMessage(policy=SMTP)
    mail["From"] = sender
    mail["To"] = ", ".join(message.recipients) if message.recipients else "undisclosed-recipients:;"
    mail["Subject"] = clean_header(message.subject)
    mail["Date"] = format_datetime(datetime.fromtimestamp(message.created_at, UTC).astimezone())
    mail["Message-ID"] = f"<{message.id}.notifier@{_domain(sender)}>"
    # RFC 3834: no out-of-office replies to a robot.
    mail["Auto-Submitted"] = "auto-generated"
    mail["X-Pacsflow-Kind"] = message.kind
    mail.set_content(message.text)
    if message.html:
        mail.add_alternative(message.html, subtype="html")
    return mail


class SmtpTransport:
    """Sends mails through one SMTP server, a new connection per mail."""

    def __init__(self, settings: SmtpSettings) -> None:
        assert settings.host is not None
        self.settings = settings
        self.host: str = settings.host
        self._local_hostname: str | None = None

    def describe(self) -> str:
        """The server, for logs."""
        mode = "tls" if self.settings.tls else "starttls" if self.settings.starttls else "plain"
        return f"smtp {self.host}:{self.settings.port} ({mode})"

    def _password(self) -> str:
        settings = self.settings
        if settings.password_file is not None:
            try:
                return settings.password_file.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as err:
                # Only the path goes into the message, never the content.
                raise DeliveryError(
                    f"cannot read smtp.password_file {settings.password_file}: {err.strerror}",
                    unreachable=False,
                ) from err
        if settings.password is not None:
            return settings.password.get_secret_value()
        return ""

    def _context(self) -> ssl.SSLContext:
        cafile = str(self.settings.ca_file) if self.settings.ca_file else None
        return ssl.create_default_context(cafile=cafile)

    def send_blocking(
        self, mail: EmailMessage, recipients: list[str]
    ) -> dict[str, tuple[int, bytes]]:
        """Connect, secure, log in and send; the recipients the server refused."""
        settings = self.settings
        if self._local_hostname is None:
            # getfqdn can wait on DNS; once per process is enough.
            self._local_hostname = socket.getfqdn()
        client: smtplib.SMTP
        if settings.tls:
            client = smtplib.SMTP_SSL(
                self.host, settings.port, local_hostname=self._local_hostname,
                timeout=settings.timeout, context=self._context(),
            )
        else:
            client = smtplib.SMTP(
                self.host, settings.port, local_hostname=self._local_hostname,
                timeout=settings.timeout,
            )
        with client:
            client.ehlo()
            if settings.starttls:
                client.starttls(context=self._context())
                client.ehlo()
            if settings.username:
                client.login(settings.username, self._password())
            return client.send_message(
                mail, from_addr=_address(settings.sender), to_addrs=recipients
            )

    async def send(self, mail: EmailMessage, recipients: list[str]) -> dict[str, tuple[int, bytes]]:
        """Send in a thread; DeliveryError on failure."""
        try:
            return await asyncio.to_thread(self.send_blocking, mail, recipients)
        except (smtplib.SMTPConnectError, smtplib.SMTPServerDisconnected) as err:
            raise DeliveryError(f"{self.describe()}: {_smtp_error(err)}", unreachable=True) from err
        except smtplib.SMTPException as err:
            # Refused sender or recipients, failed login, no STARTTLS: the server answers, but
            # not to this message. Retried all the same (4xx answers are often temporary).
            raise DeliveryError(
                f"{self.describe()}: {_smtp_error(err)}", unreachable=False
            ) from err
        except OSError as err:
            # Refused or timed-out connections, and TLS errors (ssl.SSLError is an OSError).
            raise DeliveryError(
                f"{self.describe()}: {type(err).__name__}: {err}", unreachable=True
            ) from err
        except ValueError as err:
            # An address or header the server's extensions cannot carry: this message only.
            raise DeliveryError(
                f"{self.describe()}: {type(err).__name__}: {err}", unreachable=False
            ) from err


def _smtp_error(err: smtplib.SMTPException) -> str:
    if isinstance(err, smtplib.SMTPRecipientsRefused):
        refused = ", ".join(f"{rcpt} ({code})" for rcpt, (code, _) in err.recipients.items())
        return f"every recipient was refused: {refused}"
    if isinstance(err, smtplib.SMTPResponseException):
        reply = err.smtp_error
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
        return f"{type(err).__name__}: {err.smtp_code} {' '.join(text.split())}"
    return f"{type(err).__name__}: {err}"


class FolderTransport:
    """Writes mails as ``.eml`` files into a folder (the embedded default: no mail server)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def describe(self) -> str:
        """The folder, for logs."""
        return f"folder {self.folder}"

    def path_for(self, message: OutboxMessage) -> Path:
        """The file of one outbox row: creation time first, so a listing sorts by time."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(message.created_at))
        return self.folder / f"{stamp}-{message.kind}-{message.id[:12]}.eml"

    def write_blocking(self, message: OutboxMessage, data: bytes) -> Path:
        """Write atomically: readers see the whole file or none."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path_for(message)
        temporary = final.with_name(f".{final.name}.tmp")
        try:
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, final)
        except OSError:
            # A full disk must not leave half a mail behind for the next attempt to trip on.
            temporary.unlink(missing_ok=True)
            raise
        # The rename itself must survive a power cut too.
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return final

    async def send(self, message: OutboxMessage, data: bytes) -> Path:
        """Write in a thread; DeliveryError on failure."""
        try:
            return await asyncio.to_thread(self.write_blocking, message, data)
        except OSError as err:
            raise DeliveryError(
                f"{self.describe()}: cannot write: {err.strerror or err}", unreachable=True
            ) from err


class EmailChannel:
    """E-mail: through the SMTP server when one is configured, else as files."""

    name = "email"

    def __init__(self, settings: NotifierSettings) -> None:
        self.sender = settings.smtp.sender
        self.smtp = SmtpTransport(settings.smtp) if settings.smtp.host else None
        self.folder = FolderTransport(settings.mail_folder)
        self.lease = 10 * settings.smtp.timeout + 30

    def describe(self, message: OutboxMessage) -> str:
        """Where the message goes, for logs."""
        return self._transport(message).describe()

    def _transport(self, message: OutboxMessage) -> SmtpTransport | FolderTransport:
        # A mail queued while mails went to files has no recipients: it stays a file.
        if self.smtp is not None and message.recipients:
            return self.smtp
        return self.folder

    async def send(self, message: OutboxMessage) -> None:
        """Send (or write) the mail of one outbox row."""
        try:
            mail = build_email(message, self.sender)
            recipients = [_address(r) for r in message.recipients]
        except (ValueError, TypeError, email.errors.MessageError) as err:
            raise DeliveryError(f"cannot build the mail: {err}", unreachable=False) from err
        transport = self._transport(message)
        if isinstance(transport, SmtpTransport):
            refused = await transport.send(mail, recipients)
            if refused:
                # The others have it: sending again would repeat it for them, so it counts as
                # sent, and the refused addresses are logged for the operator.
                log.warning(
                    "mail %s was delivered, but the server refused some recipients: %s",
                    message.id,
                    ", ".join(f"{r} ({code})" for r, (code, _) in refused.items()),
                    extra={"outbox_id": message.id},
                )
        else:
            await transport.send(message, mail.as_bytes())


# --- webhooks ------------------------------------------------------------------------------


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # the 3xx answer then raises HTTPError, and the POST is retried


@dataclass
class WebhookChannel:
    """JSON POSTs to the configured webhooks, one outbox row per webhook and message."""

    webhooks: dict[str, WebhookSettings]
    name: str = "webhook"

    def __post_init__(self) -> None:
        self._opener = urllib.request.build_opener(_NoRedirects)
        timeouts = [hook.timeout for hook in self.webhooks.values()] or [10.0]
        self.lease = 3 * max(timeouts) + 30

    def describe(self, message: OutboxMessage) -> str:
        """The webhook's name (its URL carries a token and is never logged)."""
        return f"webhook {message.target}"

    def post_blocking(self, url: str, body: bytes, timeout: float, key: str) -> int:
        """POST and return the HTTP status (2xx; anything else raises)."""
        request = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": f"pacsflow/{pacsflow.__version__}",
                # Receivers that know the header drop a repeated POST.
                "Idempotency-Key": key,
            },
        )
        with self._opener.open(request, timeout=timeout) as response:
            response.read(65536)
            return int(response.status)

    async def send(self, message: OutboxMessage) -> None:
        """POST one outbox row to its webhook."""
        hook = self.webhooks.get(message.target)
        if hook is None:
            raise DeliveryError(
                f"no webhook named {message.target!r} is configured (any more)", unreachable=False
            )
        body = (message.json_body or json.dumps({"text": message.text})).encode()
        try:
            await asyncio.to_thread(
                self.post_blocking, hook.url.get_secret_value(), body, hook.timeout, message.id
            )
        except urllib.error.HTTPError as err:
            # Server errors and rate limits pass; other answers refuse this message.
            busy = err.code >= 500 or err.code == 429
            raise DeliveryError(
                f"{self.describe(message)}: HTTP {err.code} {err.reason}", unreachable=busy
            ) from err
        except urllib.error.URLError as err:
            raise DeliveryError(
                f"{self.describe(message)}: {err.reason}", unreachable=True
            ) from err
        except OSError as err:
            raise DeliveryError(
                f"{self.describe(message)}: {type(err).__name__}: {err}", unreachable=True
            ) from err
        except (http.client.InvalidURL, ValueError) as err:
            # A URL urllib cannot use; the message names the error, not the URL and its token.
            raise DeliveryError(
                f"{self.describe(message)}: the URL is not usable ({type(err).__name__})",
                unreachable=False,
            ) from err
        except http.client.HTTPException as err:
            # A broken answer (bad status line, cut-off body): the server's trouble.
            raise DeliveryError(
                f"{self.describe(message)}: {type(err).__name__}", unreachable=True
            ) from err


def build_channels(settings: NotifierSettings) -> dict[str, Channel]:
    """Every channel, by the ``channel`` value of its outbox rows."""
    return {"email": EmailChannel(settings), "webhook": WebhookChannel(dict(settings.webhooks))}
