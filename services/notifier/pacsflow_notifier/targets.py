"""Who hears about what: recipients per kind of message, and the outbox rows for each channel.

E-mail recipients of ``study-complete`` are the route's ``emails`` (the called AE title's entry
in ``router.routes``, or in ``router.routes_file`` when one is set, read again when it changes)
plus ``notifier.recipients["study-complete"]``; every other kind goes to
``notifier.recipients[<kind>]``. Each webhook gets the kinds it lists. Without an SMTP host,
mails become files in ``notifier.mail_folder``, so there a mail is written even when nobody is
named (that is what the single-machine demo shows).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable

from pacsflow.config import Settings, WebhookSettings, check_email_address
from pacsflow.routes import RoutesSource

from pacsflow_notifier.messages import Rendered
from pacsflow_notifier.outbox import NewMessage, message_id

__all__ = ["Targets", "valid_address"]

log = logging.getLogger(__name__)


def valid_address(value: str) -> bool:
    """True for an address that can safely go into a header and the SMTP envelope."""
    try:
        check_email_address(value)
    except ValueError:
        return False
    return True


class Targets:
    """Turns a rendered message into outbox rows for every channel that wants its kind."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._notifier = settings.notifier
        self._mail_to_files = settings.notifier.smtp.host is None
        self._routes = RoutesSource(settings.router)

    def recipients(self, kind: str, route: str | None = None) -> list[str]:
        """E-mail recipients of ``kind`` (and of the route), each address once."""
        found: list[str] = []
        if route is not None:
            entry = self._routes.current().get(route)
            if entry is None:
                log.warning(
                    "route %r is not among the router's routes: only notifier.recipients are told",
                    route,
                )
            else:
                for address in entry.emails:
                    if valid_address(address):
                        found.append(address.strip())
                    else:
                        log.error("route %r: %r is not a usable e-mail address", route, address)
        found.extend(self._notifier.recipients.get(kind, []))  # type: ignore[call-overload]
        unique: dict[str, str] = {}
        for address in found:
            unique.setdefault(address.lower(), address)
        return list(unique.values())

    def webhooks(self, kind: str) -> dict[str, WebhookSettings]:
        """The webhooks that want ``kind``."""
        return {
            name: hook for name, hook in self._notifier.webhooks.items() if kind in hook.kinds
        }

    def anyone(self, kind: str) -> bool:
        """True when a message of ``kind`` would reach somebody (or the mail folder)."""
        return bool(self._mail_to_files or self.recipients(kind) or self.webhooks(kind))

    def messages(
        self, rendered: Rendered, source: str, recipients: Iterable[str]
    ) -> list[NewMessage]:
        """The outbox rows of one message: one e-mail to all recipients, one per webhook."""
        to = tuple(recipients)
        rows = []
        if to or self._mail_to_files:
            rows.append(
                NewMessage(
                    channel="email",
                    target="",
                    kind=rendered.kind,
                    source=source,
                    recipients=to,
                    subject=rendered.subject,
                    text=rendered.text,
                    html=rendered.html,
                )
            )
        for name, hook in self.webhooks(rendered.kind).items():
            rows.append(
                NewMessage(
                    channel="webhook",
                    target=name,
                    kind=rendered.kind,
                    source=source,
                    recipients=(),
                    subject=rendered.subject,
                    text=rendered.text,
                    json_body=_webhook_body(hook, rendered, message_id(source, "webhook", name)),
                )
            )
        return rows


def _webhook_body(hook: WebhookSettings, rendered: Rendered, id: str) -> str:
    if hook.format == "chat":
        # Teams, Slack and Mattermost incoming webhooks all show "text".
        return json.dumps({"text": f"{rendered.subject}\n\n{rendered.text}"}, ensure_ascii=False)
    return json.dumps(
        {
            "id": id,
            "kind": rendered.kind,
            "subject": rendered.subject,
            "text": rendered.text,
            "facts": rendered.facts,
        },
        ensure_ascii=False,
    )
