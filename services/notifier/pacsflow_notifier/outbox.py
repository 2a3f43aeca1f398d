"""The outbox: every message the notifier owes, one row per message and channel.

Exactly once, as far as a mail server allows:

* a row's id is derived from what caused it (an event id, or the first incident of an alert),
  the channel and the target. Inserting is ``ON CONFLICT DO NOTHING``, in the same transaction
  as whatever else the event changes, so a redelivered event inserts nothing;
* a delivery loop *claims* a due row with a lease (``claimed_by``, ``claimed_until``) in one
  statement, so two processes never send the same row at the same time, sends it and marks it
  ``sent``; a failed attempt counts ``attempts`` and sets the next try (exponential backoff,
  capped). Rows are retried for ever and never dropped;
* the one window that cannot be closed: the server accepted a mail, and the process died before
  ``sent`` was committed (or the lease ran out meanwhile). The row is sent again after its
  lease, with the same ``Message-ID`` (derived from the row id), so mail clients show one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pacsflow.store import Database, Row

__all__ = ["ChannelStats", "NewMessage", "Outbox", "OutboxMessage", "message_id"]

# Fixed, so the same cause gives the same id in every process and release.
_NAMESPACE = uuid.UUID("3f0c8a4e-2d8b-5b7e-9a51-6c1f4e0d7a22")

_COLUMNS = (
    "id, channel, target, kind, source, recipients, subject, text_body, html_body, json_body, "
    "attempts, created_at"
)


def message_id(source: str, channel: str, target: str) -> str:
    """The outbox id of the message ``source`` causes on ``channel`` for ``target``."""
    return uuid.uuid5(_NAMESPACE, f"{source}\x00{channel}\x00{target}").hex


@dataclass(frozen=True)
class NewMessage:
    """A message to put into the outbox."""

    channel: str
    target: str
    kind: str
    source: str
    recipients: tuple[str, ...]
    subject: str
    text: str
    html: str | None = None
    json_body: str | None = None

    @property
    def id(self) -> str:
        """The row id; the same for every redelivery of the same cause."""
        return message_id(self.source, self.channel, self.target)


@dataclass(frozen=True)
class OutboxMessage:
    """A claimed outbox row, to be delivered."""

    id: str
    channel: str
    target: str
    kind: str
    source: str
    recipients: tuple[str, ...]
    subject: str
    text: str
    html: str | None
    json_body: str | None
    attempts: int
    created_at: float

    @classmethod
    def from_row(cls, row: Row) -> OutboxMessage:
        """The message of a database row."""
        return cls(
            id=row["id"],
            channel=row["channel"],
            target=row["target"],
            kind=row["kind"],
            source=row["source"],
            recipients=tuple(json.loads(row["recipients"])),
            subject=row["subject"],
            text=row["text_body"],
            html=row["html_body"],
            json_body=row["json_body"],
            attempts=int(row["attempts"]),
            created_at=float(row["created_at"]),
        )


@dataclass(frozen=True)
class ChannelStats:
    """Pending messages of one channel, for the metrics."""

    pending: int = 0
    failing: int = 0
    oldest_created_at: float | None = None


class Outbox:
    """The outbox table over a :class:`~pacsflow.store.Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def enqueue(
        self, messages: Iterable[NewMessage], now: float, *, db: Database | None = None
    ) -> list[NewMessage]:
        """Insert the messages that are not there yet (pass ``db`` to join a transaction);
        the ones inserted."""
        target = db or self._db
        inserted = []
        for message in messages:
            row = await target.fetchrow(
                "INSERT INTO notifier_outbox (id, channel, target, kind, source, recipients, "
                "subject, text_body, html_body, json_body, status, attempts, next_attempt_at, "
                "created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'pending', 0, "
                "$11, $11) ON CONFLICT (id) DO NOTHING RETURNING id",
                message.id,
                message.channel,
                message.target,
                message.kind,
                message.source,
                json.dumps(list(message.recipients)),
                message.subject,
                message.text,
                message.html,
                message.json_body,
                float(now),
            )
            if row is not None:
                inserted.append(message)
        return inserted

    async def claim(
        self, channel: str, owner: str, now: float, lease: float
    ) -> OutboxMessage | None:
        """Take the oldest due row of ``channel`` for ``lease`` seconds, or None."""
        # The conditions are repeated outside the sub-select: PostgreSQL re-checks them on a
        # row another process claimed meanwhile, so the second claimer gets nothing.
        row = await self._db.fetchrow(
            "UPDATE notifier_outbox SET claimed_by = $1, claimed_until = $2 "
            "WHERE id = (SELECT id FROM notifier_outbox WHERE channel = $3 "
            "AND status = 'pending' AND next_attempt_at <= $4 "
            "AND (claimed_until IS NULL OR claimed_until < $4) "
            "ORDER BY created_at, id LIMIT 1) "
            "AND status = 'pending' AND (claimed_until IS NULL OR claimed_until < $4) "
            f"RETURNING {_COLUMNS}",
            owner,
            float(now + lease),
            channel,
            float(now),
        )
        return None if row is None else OutboxMessage.from_row(row)

    async def mark_sent(self, id: str, now: float) -> None:
        """Record that the message was delivered (whoever holds the lease now)."""
        await self._db.execute(
            "UPDATE notifier_outbox SET status = 'sent', sent_at = $2, claimed_by = NULL, "
            "claimed_until = NULL, last_error = NULL WHERE id = $1 AND status = 'pending'",
            id,
            float(now),
        )

    async def mark_failed(
        self, id: str, owner: str, attempts: int, next_attempt_at: float, error: str
    ) -> None:
        """Record a failed attempt and when to try again; only while ``owner`` holds the row."""
        await self._db.execute(
            "UPDATE notifier_outbox SET attempts = $3, next_attempt_at = $4, last_error = $5, "
            "claimed_by = NULL, claimed_until = NULL "
            "WHERE id = $1 AND claimed_by = $2 AND status = 'pending'",
            id,
            owner,
            attempts,
            float(next_attempt_at),
            error[:2000],
        )

    async def expedite(self, channel: str, now: float) -> int:
        """Make every waiting row of ``channel`` due now (its server is back); how many."""
        rows = await self._db.fetch(
            "UPDATE notifier_outbox SET next_attempt_at = $2 "
            "WHERE channel = $1 AND status = 'pending' AND next_attempt_at > $2 RETURNING id",
            channel,
            float(now),
        )
        return len(rows)

    async def next_due(self, channel: str) -> float | None:
        """When the next pending row of ``channel`` can be claimed, or None if there is none."""
        value = await self._db.fetchval(
            "SELECT MIN(CASE WHEN claimed_until IS NOT NULL AND claimed_until > next_attempt_at "
            "THEN claimed_until ELSE next_attempt_at END) "
            "FROM notifier_outbox WHERE channel = $1 AND status = 'pending'",
            channel,
        )
        return None if value is None else float(value)

    async def stats(self, failing_after: int) -> dict[str, ChannelStats]:
        """Pending and failing counts, and the oldest pending message, per channel."""
        rows = await self._db.fetch(
            "SELECT channel, COUNT(*) AS pending, "
            "SUM(CASE WHEN attempts >= $1 THEN 1 ELSE 0 END) AS failing, "
            "MIN(created_at) AS oldest FROM notifier_outbox WHERE status = 'pending' "
            "GROUP BY channel",
            failing_after,
        )
        return {
            row["channel"]: ChannelStats(
                pending=int(row["pending"]),
                failing=int(row["failing"] or 0),
                oldest_created_at=None if row["oldest"] is None else float(row["oldest"]),
            )
            for row in rows
        }

    async def prune(self, sent_before: float) -> int:
        """Delete rows sent before ``sent_before``; how many."""
        rows = await self._db.fetch(
            "DELETE FROM notifier_outbox WHERE status = 'sent' AND sent_at < $1 RETURNING id",
            float(sent_before),
        )
        return len(rows)

    async def rows(self, *, channel: str | None = None) -> list[dict[str, Any]]:
        """Every row (of one channel), oldest first: for ``pacsflow status`` and tests."""
        where, args = ("WHERE channel = $1", [channel]) if channel is not None else ("", [])
        rows = await self._db.fetch(
            f"SELECT * FROM notifier_outbox {where} ORDER BY created_at, id", *args
        )
        return [dict(row) for row in rows]

