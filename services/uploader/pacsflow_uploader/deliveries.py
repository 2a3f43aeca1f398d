"""The uploader's work queue: pending deliveries in the file ledger, claimed in batches.

Sending is driven from the ledger, never from bus messages held open. ``file-ready`` adds
pending deliveries (:meth:`DeliveryQueue.schedule`: existing deliveries stay as they are, so
a confirmed one is never sent again, whatever is redelivered); each destination's sender
claims due pending deliveries (:meth:`~DeliveryQueue.claim` marks them ``sending`` and names
this process as their owner) and settles them in batches (:meth:`~DeliveryQueue.settle`:
outcomes, the next attempt's time, and the ``file-sent`` / ``file-failed`` events that report
them, written to an outbox in the same transaction). On PostgreSQL a schedule, a claim and a
settlement are one statement each (one round trip, whatever the batch size); SQLite, in
process, runs the same steps as a few statements in one transaction.

At least once, and how far "twice" can reach: a process that stops between sending a file
and settling it leaves the delivery ``sending``. :meth:`~DeliveryQueue.take_back` returns
such claims to ``pending`` and marks them *in doubt* (the destination may hold the file):
at start-up for this host's processes that are gone, and for any owner whose claim was not
renewed for ``claim_timeout_seconds`` (another host's crash). The window is what one process
holds claimed: at most two chunks per association in flight, the work claimed ahead (about
one chunk per association, never sent yet, but in doubt after a crash all the same) and the
batch being settled. In-doubt deliveries can be checked with C-FIND before they are sent
again (``verify_in_doubt``).

The columns this adds to ``ledger_deliveries`` come from the uploader's own migration.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pacsflow.events import Event, ReadyFile, encode_event
from pacsflow.store import Database, Ledger, Outcome, SeenFile
from pacsflow.store.ledger import DeliveryStatus

__all__ = [
    "Claim",
    "DeliveryQueue",
    "Scheduled",
    "Settlement",
    "owner_id",
    "owner_is_gone",
    "requeue_failed",
]

# Parameters per statement, as in the ledger: a batch is a few statements, never one per row.
_IDS_PER_STATEMENT = 1000
# Files a ledger row can no longer be sent for.
_NOT_SENDABLE = frozenset({"invalid", "duplicate", "archived"})
_FILE_COLUMNS = (
    "id, path, size, sop_class_uid, sop_instance_uid, transfer_syntax_uid,"
    " study_instance_uid, series_instance_uid, batch_key"
)


def owner_id(instance: str) -> str:
    """A name for this process's claims: instance, host, process id and a random token."""
    return f"{instance}|{socket.gethostname()}|{os.getpid()}|{uuid.uuid4().hex[:8]}"


def owner_is_gone(owner: str | None, me: str) -> bool:
    """True when ``owner`` is an earlier process on this host that no longer runs."""
    if owner is None:
        return True
    parts = owner.split("|")
    mine = me.split("|")
    if len(parts) != 4 or owner == me or parts[1] != mine[1]:
        return False
    pid = int(parts[2]) if parts[2].isdigit() else -1
    if pid == int(mine[2]):
        # Our own process id with another token: our previous life (a container restarts
        # with the same pid).
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False


@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery claimed for sending, with what the sender needs to know about its file."""

    file_id: int
    destination: str
    attempts: int
    in_doubt: bool
    #: when the delivery was created (for the queue-lag metric)
    queued_at: float
    path: str
    size: int
    sop_class_uid: str | None
    sop_instance_uid: str | None
    transfer_syntax_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    batch_key: str | None
    #: the previous attempt's answer and error, kept when the claim is given back unsent
    dimse_status: int | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Settlement:
    """How a claimed delivery ends: a final status, or ``pending`` again for later."""

    claim: Claim
    status: DeliveryStatus
    dimse_status: int | None = None
    error: str | None = None
    #: the delivery's attempt count from now on
    attempts: int = 0
    #: for ``pending``: not claimed again before this time (epoch seconds)
    next_attempt_at: float = 0.0
    in_doubt: bool = False


@dataclass(frozen=True, slots=True)
class Scheduled:
    """What :meth:`DeliveryQueue.schedule` did with a file-ready event's files."""

    file_ids: list[int]
    #: recorded as invalid, duplicate or archived: nothing to send
    skipped: int
    #: neither on disk nor in the ledger
    missing: int


# PostgreSQL claims in one statement (one round trip): the deliveries and what the sender
# needs. The files' rows stay as they are (a ready file reads as sending meanwhile).
_CLAIM_POSTGRES = (
    "WITH claimed AS ("
    " UPDATE ledger_deliveries SET status = 'sending', claimed_by = $1, claimed_at = $2,"
    " updated_at = $2"
    " WHERE destination = $3 AND file_id IN ("
    "  SELECT file_id FROM ledger_deliveries"
    "  WHERE destination = $3 AND status = 'pending' AND next_attempt_at <= $2"
    "  ORDER BY file_id LIMIT $4 FOR UPDATE SKIP LOCKED)"
    " RETURNING file_id, attempts, in_doubt, created_at, dimse_status, last_error)"
    " SELECT c.file_id, c.attempts, c.in_doubt, c.created_at, c.dimse_status, c.last_error,"
    f" {', '.join('f.' + c.strip() for c in _FILE_COLUMNS.split(','))}"
    " FROM claimed c JOIN ledger_files f ON f.id = c.file_id ORDER BY c.file_id"
)
# PostgreSQL settles a batch in one statement (one round trip, atomic on its own): the
# deliveries' outcomes, their files' statuses (as Ledger.record_outcomes derives them: the
# new outcomes plus the file's other deliveries), and the events for the outbox. Every table
# is reached by index whatever the planner knows of its size: deliveries through the
# conflict target (the primary key, per row), a file's other deliveries by one lookup per
# file (a subquery that cannot be flattened: OFFSET 0), files by primary key.
_SETTLE_POSTGRES = (
    "WITH outcome AS ("
    " SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[], $5::int[],"
    "  $6::text[], $7::float8[], $8::int[])"
    "  AS o (file_id, destination, status, dimse_status, attempts, last_error,"
    "  next_attempt_at, in_doubt)),"
    " updated AS ("
    " INSERT INTO ledger_deliveries AS d (file_id, destination, status, dimse_status,"
    " attempts, last_error, created_at, updated_at, next_attempt_at, in_doubt)"
    " SELECT file_id, destination, status, dimse_status, attempts, last_error, $9, $9,"
    " next_attempt_at, in_doubt FROM outcome"
    " ON CONFLICT (file_id, destination) DO UPDATE SET status = excluded.status,"
    " dimse_status = excluded.dimse_status, attempts = excluded.attempts,"
    " last_error = excluded.last_error, updated_at = excluded.updated_at,"
    " next_attempt_at = excluded.next_attempt_at, in_doubt = excluded.in_doubt,"
    " claimed_by = NULL, claimed_at = NULL"
    " RETURNING d.file_id, d.destination, d.status),"
    " files AS (SELECT DISTINCT file_id FROM updated),"
    " statuses AS ("
    " SELECT file_id, status FROM updated"
    " UNION ALL"
    " SELECT f.file_id, d.status FROM files f CROSS JOIN LATERAL ("
    "  SELECT destination, status FROM ledger_deliveries WHERE file_id = f.file_id OFFSET 0) d"
    " WHERE NOT EXISTS ("
    "  SELECT 1 FROM updated u WHERE u.file_id = f.file_id AND u.destination = d.destination)),"
    " refreshed AS ("
    " UPDATE ledger_files f SET status = s.status, updated_at = $9"
    " FROM (SELECT file_id, CASE"
    "  WHEN count(*) FILTER (WHERE status IN ('pending', 'sending')) > 0 THEN 'ready'"
    "  WHEN count(*) FILTER (WHERE status IN ('sent', 'warning')) < count(*) THEN 'failed'"
    "  ELSE 'sent' END AS status"
    "  FROM statuses GROUP BY file_id) s"
    " WHERE f.id = ANY (ARRAY(SELECT file_id FROM files)) AND f.id = s.file_id"
    # Written as "not one of the others" (ready, sent or failed), so that the planner
    # neither reads the status index for it nor takes it for a rare match.
    " AND f.status NOT IN ('invalid', 'duplicate', 'archived')),"
    " outbox AS ("
    " INSERT INTO uploader_outbox (event, created_at)"
    " SELECT body, $9 FROM unnest($10::text[]) WITH ORDINALITY AS e (body, n) ORDER BY n"
    " RETURNING id)"
    " SELECT id FROM outbox"
)


# PostgreSQL schedules a file-ready batch in one statement (one round trip, atomic on its
# own), doing what Ledger.record_seen(look_up_first=True) and Ledger.add_deliveries do in
# several: find each file's row (the watcher recorded it, as a rule) by the unique index,
# insert the rows not found, add a pending delivery per destination to every sendable file
# (existing deliveries stay), and make a sent or failed file that got a new one ready again.
# A row another writer inserted after this statement's snapshot is neither found nor
# inserted: the caller sees it missing and takes the general path.
_SCHEDULE_POSTGRES = (
    "WITH seen AS ("
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::float8[], $4::text[], $5::text[],"
    "  $6::text[], $7::text[], $8::text[])"
    "  AS s (path, size, mtime, sop_instance_uid, series_instance_uid, study_instance_uid,"
    "  sop_class_uid, transfer_syntax_uid)),"
    " known AS ("
    " SELECT f.id, f.path, f.size, f.mtime, f.status FROM seen s CROSS JOIN LATERAL ("
    "  SELECT id, path, size, mtime, status FROM ledger_files"
    "  WHERE path = s.path AND size = s.size AND mtime = s.mtime OFFSET 0) f),"
    " inserted AS ("
    " INSERT INTO ledger_files (path, size, mtime, sop_instance_uid, series_instance_uid,"
    " study_instance_uid, sop_class_uid, transfer_syntax_uid, batch_key, status, created_at,"
    " updated_at)"
    " SELECT s.path, s.size, s.mtime, s.sop_instance_uid, s.series_instance_uid,"
    " s.study_instance_uid, s.sop_class_uid, s.transfer_syntax_uid, $9, 'ready', $10, $10"
    " FROM seen s WHERE NOT EXISTS ("
    "  SELECT 1 FROM known k WHERE k.path = s.path AND k.size = s.size AND k.mtime = s.mtime)"
    # In key order, as the ledger inserts: two writers lock rows in the same order.
    " ORDER BY s.path, s.size, s.mtime"
    " ON CONFLICT (path, size, mtime) DO NOTHING"
    " RETURNING id, path, size, mtime, status),"
    " files AS (SELECT * FROM known UNION ALL SELECT * FROM inserted),"
    " added AS ("
    " INSERT INTO ledger_deliveries (file_id, destination, status, attempts, created_at,"
    " updated_at)"
    " SELECT f.id, d, 'pending', 0, $10, $10 FROM files f CROSS JOIN unnest($11::text[]) AS d"
    f" WHERE f.status NOT IN ({', '.join(repr(s) for s in sorted(_NOT_SENDABLE))})"
    " ORDER BY f.id, d"
    " ON CONFLICT (file_id, destination) DO NOTHING"
    " RETURNING file_id),"
    # A new pending delivery leaves a ready file as it is: only a sent or failed one changes. Its
    # status is checked again on the row found by id (archived meanwhile: left alone), as
    # "status || ''" so that the planner never reads the status index, which lists every
    # sent file, for it.
    " reopened AS ("
    " UPDATE ledger_files SET status = 'ready', updated_at = $10"
    " WHERE id = ANY (ARRAY(SELECT k.id FROM known k WHERE k.status IN ('sent', 'failed')"
    "  AND k.id IN (SELECT file_id FROM added)))"
    " AND status || '' IN ('sent', 'failed'))"
    " SELECT id, path, size, mtime, status FROM files"
)


def _claim(destination: str, delivery: Any, file: Any) -> Claim:
    return Claim(
        file_id=int(delivery["file_id"]) if "file_id" in delivery else int(file["id"]),
        destination=destination,
        attempts=int(delivery["attempts"]), in_doubt=bool(delivery["in_doubt"]),
        queued_at=float(delivery["created_at"]), path=file["path"],
        size=int(file["size"]), sop_class_uid=file["sop_class_uid"],
        sop_instance_uid=file["sop_instance_uid"],
        transfer_syntax_uid=file["transfer_syntax_uid"],
        study_instance_uid=file["study_instance_uid"],
        series_instance_uid=file["series_instance_uid"],
        batch_key=file["batch_key"], dimse_status=delivery["dimse_status"],
        last_error=delivery["last_error"],
    )  # fmt: skip


def _chunks(items: Sequence[Any], size: int = _IDS_PER_STATEMENT) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _placeholders(count: int, start: int) -> str:
    return ", ".join(f"${n}" for n in range(start, start + count))


class DeliveryQueue:
    """Claiming, settling and taking back deliveries; the uploader's event outbox."""

    def __init__(
        self, db: Database, *, owner: str, clock: Callable[[], float] = time.time
    ) -> None:
        self._db = db
        self.owner = owner
        self._clock = clock
        self.ledger = Ledger(db, clock=clock)
        # Deliveries this process claimed and has not settled. A claim whose commit reached
        # the database but whose answer was lost (a crash or reset mid-statement) is ours
        # in the table but not here: release_orphans() gives it back.
        self._held: set[tuple[int, str]] = set()
        self._claiming = asyncio.Lock()

    # --- scheduling ---------------------------------------------------------------------

    async def schedule(
        self, files: Sequence[ReadyFile], destinations: Sequence[str], batch_key: str | None
    ) -> Scheduled:
        """Make sure each file has a delivery to each destination (pending when new)."""
        stats = await asyncio.to_thread(_stat_all, [f.path for f in files])
        present = [(f, st) for f, st in zip(files, stats, strict=True) if st is not None]
        gone = [f.path for f, st in zip(files, stats, strict=True) if st is None]
        seen = [
            SeenFile(
                path=f.path, size=st[0], mtime=st[1],
                sop_instance_uid=f.sop_instance_uid,
                series_instance_uid=f.series_instance_uid,
                study_instance_uid=f.study_instance_uid,
                sop_class_uid=f.sop_class_uid,
                transfer_syntax_uid=f.transfer_syntax_uid,
                batch_key=batch_key,
            )
            for f, st in present
        ]  # fmt: skip
        statuses = None
        if self._db.dialect == "postgres" and seen:
            statuses = await self._schedule_postgres(seen, destinations, batch_key)
        scheduled_ids: set[int] = set()  # their deliveries exist already
        if statuses is None:
            # The watcher recorded them before it announced them, as a rule.
            recorded = await self.ledger.record_seen(seen, look_up_first=True)
            statuses = [(r.id, r.status) for r in recorded]
        else:
            scheduled_ids = {file_id for file_id, _ in statuses}
        ids = [file_id for file_id, status in statuses if status not in _NOT_SENDABLE]
        skipped = len(statuses) - len(ids)
        missing = 0
        if gone:
            # Gone from disk: sent and archived already (a redelivered event), or removed.
            # A ledger row still waiting gets its delivery; sending it will fail and say so.
            found = await self._latest_rows(gone)
            for path in gone:
                row = found.get(path)
                if row is None:
                    missing += 1
                elif row["status"] in _NOT_SENDABLE:
                    skipped += 1
                else:
                    ids.append(row["id"])
        await self.ledger.add_deliveries([i for i in ids if i not in scheduled_ids], destinations)
        return Scheduled(ids, skipped, missing)

    async def _schedule_postgres(
        self, seen: Sequence[SeenFile], destinations: Sequence[str], batch_key: str | None
    ) -> list[tuple[int, str]] | None:
        """Each file's (id, status) in order, its deliveries added, in one statement; None
        when a row came in from another writer meanwhile (the general path sorts it out)."""
        unique = list({(f.path, f.size, f.mtime): f for f in seen}.values())
        rows = await self._db.fetch(
            _SCHEDULE_POSTGRES,
            [f.path for f in unique], [f.size for f in unique], [f.mtime for f in unique],
            [f.sop_instance_uid for f in unique], [f.series_instance_uid for f in unique],
            [f.study_instance_uid for f in unique], [f.sop_class_uid for f in unique],
            [f.transfer_syntax_uid for f in unique], batch_key, self._clock(),
            list(dict.fromkeys(destinations)),
        )  # fmt: skip
        found = {(row["path"], row["size"], row["mtime"]): (row["id"], row["status"])
                 for row in rows}  # fmt: skip
        try:
            return [found[(f.path, f.size, f.mtime)] for f in seen]
        except KeyError:
            return None

    async def _latest_rows(self, paths: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for chunk in _chunks(sorted(set(paths))):
            rows = await self._db.fetch(
                "SELECT id, path, status FROM ledger_files"
                f" WHERE path IN ({_placeholders(len(chunk), 1)}) ORDER BY id",
                *chunk,
            )
            for row in rows:
                found[row["path"]] = row  # the newest row of a path wins
        return found

    # --- claiming and settling ----------------------------------------------------------

    async def claim(self, destination: str, limit: int) -> list[Claim]:
        """Mark up to ``limit`` due pending deliveries to ``destination`` as ours, sending."""
        async with self._claiming:
            claims = await self._claim(destination, limit)
            self._held.update((c.file_id, destination) for c in claims)
        return claims

    async def _claim(self, destination: str, limit: int) -> list[Claim]:
        now = self._clock()
        if self._db.dialect == "postgres":
            rows = await self._db.fetch(_CLAIM_POSTGRES, self.owner, now, destination, limit)
            return [_claim(destination, row, row) for row in rows]
        # Two uploaders on PostgreSQL never claim the same row: the second skips locked ones.
        lock = " FOR UPDATE SKIP LOCKED" if self._db.dialect == "postgres" else ""
        async with self._db.transaction() as tx:
            rows = await tx.fetch(
                "UPDATE ledger_deliveries SET status = 'sending', claimed_by = $1,"
                " claimed_at = $2, updated_at = $2"
                " WHERE destination = $3 AND file_id IN ("
                "  SELECT file_id FROM ledger_deliveries"
                "  WHERE destination = $3 AND status = 'pending' AND next_attempt_at <= $2"
                f"  ORDER BY file_id LIMIT $4{lock})"
                " RETURNING file_id, attempts, in_doubt, created_at, dimse_status, last_error",
                self.owner, now, destination, limit,
            )  # fmt: skip
            if not rows:
                return []
            by_id = {row["file_id"]: row for row in rows}
            ids = sorted(by_id)
            files: dict[int, Any] = {}
            for chunk in _chunks(ids):
                for row in await tx.fetch(
                    f"SELECT {_FILE_COLUMNS} FROM ledger_files"
                    f" WHERE id IN ({_placeholders(len(chunk), 1)})",
                    *chunk,
                ):
                    files[row["id"]] = row
        return [_claim(destination, by_id[file_id], files[file_id]) for file_id in ids]

    async def settle(self, settlements: Sequence[Settlement], events: Sequence[Event]) -> list[int]:
        """Record outcomes and put the events reporting them in the outbox, atomically.

        Returns the outbox ids of the events, for :meth:`published` once the bus has them.
        """
        if not settlements and not events:
            return []
        outbox = await self._settle(settlements, events)
        self._held.difference_update((s.claim.file_id, s.claim.destination) for s in settlements)
        return outbox

    async def _settle(self, settlements: Sequence[Settlement], events: Sequence[Event]) -> list[int]:
        now = self._clock()
        if self._db.dialect == "postgres":
            # One outcome per delivery (the last), as one row of the statement updates it.
            settlements = list(
                {(s.claim.file_id, s.claim.destination): s for s in settlements}.values()
            )
            rows = await self._db.fetch(
                _SETTLE_POSTGRES,
                [s.claim.file_id for s in settlements],
                [s.claim.destination for s in settlements],
                [s.status for s in settlements],
                [s.dimse_status for s in settlements],
                [s.attempts for s in settlements],
                [s.error for s in settlements],
                [s.next_attempt_at for s in settlements],
                [1 if s.in_doubt else 0 for s in settlements],
                now,
                [encode_event(event).decode() for event in events],
            )  # fmt: skip
            return sorted(int(row["id"]) for row in rows)
        outbox: list[int] = []
        async with self._db.transaction() as tx:
            if settlements:
                await Ledger(tx, clock=self._clock).record_outcomes(
                    [
                        Outcome(
                            s.claim.file_id, s.claim.destination, s.status,
                            dimse_status=s.dimse_status, error=s.error, attempts=s.attempts,
                        )
                        for s in settlements
                    ]
                )  # fmt: skip
                await tx.executemany(
                    "UPDATE ledger_deliveries SET next_attempt_at = $3, in_doubt = $4,"
                    " claimed_by = NULL, claimed_at = NULL"
                    " WHERE file_id = $1 AND destination = $2",
                    [
                        (s.claim.file_id, s.claim.destination, s.next_attempt_at,
                         1 if s.in_doubt else 0)
                        for s in settlements
                    ],
                )  # fmt: skip
            for event in events:
                event_id = await tx.fetchval(
                    "INSERT INTO uploader_outbox (event, created_at) VALUES ($1, $2) RETURNING id",
                    encode_event(event).decode(),
                    now,
                )
                outbox.append(int(event_id))
        return outbox

    async def renew(self) -> None:
        """Renew this process's claims, so no other uploader takes them back."""
        await self._db.execute(
            "UPDATE ledger_deliveries SET claimed_at = $1"
            " WHERE claimed_by = $2 AND status = 'sending'",
            self._clock(), self.owner,
        )  # fmt: skip

    async def release_orphans(self) -> int:
        """Give back, as pending and untouched, deliveries claimed in this process's name that
        it never received (the claim's answer was lost): never handed to a sender, never sent.
        """
        async with self._claiming:
            rows = await self._db.fetch(
                "SELECT file_id, destination, attempts FROM ledger_deliveries"
                " WHERE status = 'sending' AND claimed_by = $1",
                self.owner,
            )
            orphans = [r for r in rows if (r["file_id"], r["destination"]) not in self._held]
            if not orphans:
                return 0
            now = self._clock()
            async with self._db.transaction() as tx:
                await tx.executemany(
                    "UPDATE ledger_deliveries SET status = 'pending', claimed_by = NULL,"
                    " claimed_at = NULL, updated_at = $1"
                    " WHERE file_id = $2 AND destination = $3 AND status = 'sending'"
                    " AND claimed_by = $4",
                    [(now, r["file_id"], r["destination"], self.owner) for r in orphans],
                )
                # Outcomes with the same values, so the files' statuses follow.
                await Ledger(tx, clock=self._clock).record_outcomes(
                    [Outcome(r["file_id"], r["destination"], "pending", attempts=r["attempts"])
                     for r in orphans]
                )  # fmt: skip
        return len(orphans)

    async def take_back(self, claim_timeout: float) -> dict[str, int]:
        """Return abandoned claims to pending, in doubt; how many per destination.

        Abandoned: claimed by a process of this host that is gone, or not renewed for
        ``claim_timeout`` seconds by anyone.
        """
        rows = await self._db.fetch(
            "SELECT claimed_by, max(claimed_at) AS renewed FROM ledger_deliveries"
            " WHERE status = 'sending' GROUP BY claimed_by"
        )
        cutoff = self._clock() - claim_timeout
        owners = [
            row["claimed_by"] for row in rows
            if row["claimed_by"] != self.owner and (
                owner_is_gone(row["claimed_by"], self.owner)
                or (row["renewed"] is not None and row["renewed"] < cutoff)
            )
        ]  # fmt: skip
        taken: dict[str, int] = {}
        for owner in owners:
            for destination in await self._take_back_owner(owner):
                taken[destination] = taken.get(destination, 0) + 1
        return taken

    async def _take_back_owner(self, owner: str | None) -> list[str]:
        error = "the uploader stopped while sending it; it may have arrived"
        async with self._db.transaction() as tx:
            # Conditional on the claim still standing, so a late settle is never undone.
            condition = "claimed_by IS NULL" if owner is None else "claimed_by = $3"
            args: list[Any] = [self._clock(), error] + ([] if owner is None else [owner])
            rows = await tx.fetch(
                "UPDATE ledger_deliveries SET status = 'pending', in_doubt = 1,"
                " next_attempt_at = 0, claimed_by = NULL, claimed_at = NULL,"
                " last_error = $2, updated_at = $1"
                f" WHERE status = 'sending' AND {condition}"
                " RETURNING file_id, destination, attempts",
                *args,
            )
            if rows:
                # Outcomes with the same values, so the files' statuses follow.
                await Ledger(tx, clock=self._clock).record_outcomes(
                    [
                        Outcome(r["file_id"], r["destination"], "pending", error=error,
                                attempts=r["attempts"])
                        for r in rows
                    ]
                )  # fmt: skip
        return [r["destination"] for r in rows]

    # --- what there is to do -------------------------------------------------------------

    async def destinations_with_work(self) -> list[str]:
        """Destinations with pending or in-flight deliveries."""
        rows = await self._db.fetch(
            "SELECT DISTINCT destination FROM ledger_deliveries"
            " WHERE status IN ('pending', 'sending') ORDER BY destination"
        )
        return [row["destination"] for row in rows]

    async def next_due(self, destination: str) -> float | None:
        """When the next pending delivery to ``destination`` is due (None: none pending)."""
        value = await self._db.fetchval(
            "SELECT min(next_attempt_at) FROM ledger_deliveries"
            " WHERE destination = $1 AND status = 'pending'",
            destination,
        )
        return None if value is None else float(value)

    async def backlog(self) -> dict[str, tuple[int, float]]:
        """Per destination: pending deliveries and when the oldest of them was created."""
        rows = await self._db.fetch(
            "SELECT destination, count(*) AS n, min(created_at) AS oldest"
            " FROM ledger_deliveries WHERE status = 'pending' GROUP BY destination"
        )
        return {row["destination"]: (int(row["n"]), float(row["oldest"])) for row in rows}

    # --- the outbox -----------------------------------------------------------------------

    async def unpublished(self, limit: int = 100) -> list[tuple[int, bytes]]:
        """Events written but not yet confirmed by the bus, oldest first."""
        rows = await self._db.fetch(
            "SELECT id, event FROM uploader_outbox ORDER BY id LIMIT $1", limit
        )
        return [(int(row["id"]), row["event"].encode()) for row in rows]

    async def published(self, ids: Sequence[int]) -> None:
        """Forget events the bus has confirmed."""
        for chunk in _chunks(sorted(set(ids))):
            await self._db.execute(
                f"DELETE FROM uploader_outbox WHERE id IN ({_placeholders(len(chunk), 1)})",
                *chunk,
            )


async def requeue_failed(
    db: Database,
    file_ids: Sequence[int],
    *,
    destination: str | None = None,
    clock: Callable[[], float] = time.time,
) -> list[tuple[int, str]]:
    """Queue the failed deliveries of these failed files again, as new: (file, destination).

    Deliveries that ``failed`` or were ``unsupported`` become ``pending`` with no attempts
    and due now; their last error stays until the next outcome replaces it. Only files whose
    status is ``failed`` are touched (one archived meanwhile is never sent again). A running
    uploader finds them on its next look at the queue (within seconds).
    """
    requeued: list[tuple[int, str]] = []
    for chunk in _chunks(sorted(set(file_ids))):
        args: list[Any] = [clock(), *chunk]
        only = ""
        if destination is not None:
            args.append(destination)
            only = f" AND destination = ${len(args)}"
        async with db.transaction() as tx:
            rows = await tx.fetch(
                "UPDATE ledger_deliveries SET status = 'pending', attempts = 0,"
                " next_attempt_at = 0, in_doubt = 0, claimed_by = NULL, claimed_at = NULL,"
                " updated_at = $1"
                " WHERE status IN ('failed', 'unsupported')"
                f" AND file_id IN (SELECT id FROM ledger_files"
                f"  WHERE status = 'failed' AND id IN ({_placeholders(len(chunk), 2)})){only}"
                " RETURNING file_id, destination, last_error",
                *args,
            )
            if rows:
                # The same values as outcomes, so the files' statuses follow (ready again).
                await Ledger(tx, clock=clock).record_outcomes(
                    [
                        Outcome(r["file_id"], r["destination"], "pending",
                                error=r["last_error"], attempts=0)
                        for r in rows
                    ]
                )  # fmt: skip
        requeued += [(int(r["file_id"]), str(r["destination"])) for r in rows]
    return requeued


def _stat_all(paths: Sequence[str]) -> list[tuple[int, float] | None]:
    found: list[tuple[int, float] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            found.append(None)
        else:
            found.append((st.st_size, st.st_mtime))
    return found
