"""The file ledger: every file the watcher has seen, and its delivery to each destination.

Two tables (core migration ``0001_ledger``): ``ledger_files``, one row per file as seen on disk
(path, size and modification time identify it; content hash and DICOM UIDs describe it), and
``ledger_deliveries``, one row per file and destination with the outcome of sending it there.
A third, ``ledger_announcing`` (``0003``), holds the watcher's batches whose ``file-ready``
events the bus has not confirmed yet (:meth:`Ledger.record_for_announcing`).

A file's ``status`` is one of :data:`FILE_STATUSES`:

* ``ready``: recorded and valid, waiting to be sent (or with a delivery still pending);
* ``sending``: ready, and some destination is being sent to right now (read from the
  deliveries, never stored: claiming work for a sender rewrites no file row);
* ``sent``: every destination confirmed it (DIMSE success or warning): it may be archived;
* ``failed``: some destination failed for good and none is still pending;
* ``invalid``: not DICOM, or damaged (``reason`` says why), never sent;
* ``duplicate``: the same SOP Instance with the same content was already sent, so skipped;
* ``archived``: moved out of the import folder (``archive_path``).

The first four follow from the deliveries: ``sending`` when read, the others kept up to date
by :meth:`Ledger.add_deliveries` and :meth:`Ledger.record_outcomes`. Every method works on a
batch in a few statements, whatever its size: no statement per file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from pacsflow.errors import StoreError
from pacsflow.store.base import Database, Row

__all__ = [
    "DELIVERY_STATUSES",
    "FILE_STATUSES",
    "Announcing",
    "Delivery",
    "DeliveryStatus",
    "FileDetails",
    "FileStatus",
    "Ledger",
    "LedgerFile",
    "Outcome",
    "Recorded",
    "SeenFile",
    "SentCopy",
]

FileStatus = Literal["ready", "sending", "sent", "failed", "invalid", "duplicate", "archived"]
DeliveryStatus = Literal["pending", "sending", "sent", "warning", "failed", "unsupported"]

#: every status of a file
FILE_STATUSES: tuple[FileStatus, ...] = get_args(FileStatus)
#: every status of a delivery of a file to one destination
DELIVERY_STATUSES: tuple[DeliveryStatus, ...] = get_args(DeliveryStatus)

# Statuses that end one attempt to send (and so count as one).
_ATTEMPT_RESULTS = frozenset({"sent", "warning", "failed", "unsupported"})

# Parameters per statement (both allow over 32,000). Measured on 10,000 files: statements this
# small are faster on PostgreSQL (asyncpg keeps them prepared: under 15 KiB of text) and as fast
# on SQLite; a batch still takes a few dozen statements, not one per file.
_MAX_PARAMETERS = 2_000

_FILE_COLUMN_NAMES = (
    "id", "path", "size", "mtime", "sha256", "sop_instance_uid", "series_instance_uid",
    "study_instance_uid", "sop_class_uid", "transfer_syntax_uid", "batch_key", "status",
    "reason", "archive_path", "created_at", "updated_at", "announced_at",
)  # fmt: skip
# A stored "ready" reads as "sending" while one of the file's deliveries is being sent (one
# primary-key lookup per ready file). Every file row a claim rewrote would cost an entry in
# each of the table's indexes: about a fifth of the database's work per file sent.
_BEING_SENT = (
    "EXISTS (SELECT 1 FROM ledger_deliveries d"
    " WHERE d.file_id = ledger_files.id AND d.status = 'sending')"
)
_STATUS = (
    f"CASE WHEN status = 'ready' THEN CASE WHEN {_BEING_SENT} THEN 'sending' ELSE 'ready' END"
    " ELSE status END"
)
_FILE_COLUMNS = ", ".join(
    f"{_STATUS} AS status" if name == "status" else name for name in _FILE_COLUMN_NAMES
)
_DELIVERY_COLUMNS = (
    "file_id, destination, status, dimse_status, attempts, last_error, created_at, updated_at"
)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class SeenFile:
    """A file found in an import folder, as the watcher records it."""

    path: str | os.PathLike[str]
    size: int
    mtime: float
    sha256: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    sop_class_uid: str | None = None
    transfer_syntax_uid: str | None = None
    batch_key: str | None = None


@dataclass(frozen=True, slots=True)
class FileDetails:
    """What reading a recorded file found: its content hash and DICOM identifiers."""

    file_id: int
    sha256: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    sop_class_uid: str | None = None
    transfer_syntax_uid: str | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    """The ledger row of a seen file; ``new`` when this call created it.

    ``new`` is for information: a file recorded before a crash comes back with ``new`` False,
    so what to do next is decided by ``status``.
    """

    id: int
    path: str
    size: int
    mtime: float
    status: FileStatus
    new: bool


@dataclass(frozen=True, slots=True)
class LedgerFile:
    """A row of ``ledger_files``."""

    id: int
    path: str
    size: int
    mtime: float
    sha256: str | None
    sop_instance_uid: str | None
    series_instance_uid: str | None
    study_instance_uid: str | None
    sop_class_uid: str | None
    transfer_syntax_uid: str | None
    batch_key: str | None
    status: FileStatus
    reason: str | None
    archive_path: str | None
    created_at: float
    updated_at: float
    # When the watcher recorded it for announcing (or, before migration 0003, when the bus
    # confirmed its file-ready event). The ledger answers None while a ledger_announcing
    # batch still names the file: announced_at is set only once the bus confirmed.
    announced_at: float | None = None


@dataclass(frozen=True, slots=True)
class Announcing:
    """What :meth:`Ledger.record_for_announcing` recorded: every file's row, and the batch of
    new files whose announcement :meth:`Ledger.mark_announced` confirms."""

    rows: list[LedgerFile]
    #: the ``ledger_announcing`` row (None: no new file to announce)
    batch_id: int | None
    #: the ids that batch names
    file_ids: frozenset[int]


@dataclass(frozen=True, slots=True)
class SentCopy:
    """A file some destination confirmed, as a new file with its SOP Instance UID is compared
    with it."""

    file_id: int
    sop_instance_uid: str
    #: None when it was not hashed (large files are hashed only when a copy turns up)
    sha256: str | None
    #: where its content is now: the archive once archived, else where it was found
    location: str | None
    destinations: frozenset[str]


@dataclass(frozen=True, slots=True)
class Delivery:
    """A row of ``ledger_deliveries``: one file and one destination."""

    file_id: int
    destination: str
    status: DeliveryStatus
    dimse_status: int | None
    attempts: int
    last_error: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened when sending one file to one destination.

    ``attempts`` None counts one more attempt when ``status`` ends one (sent, warning, failed,
    unsupported) and leaves the count alone otherwise (pending, sending).
    """

    file_id: int
    destination: str
    status: DeliveryStatus
    dimse_status: int | None = None
    error: str | None = None
    attempts: int | None = None


def _chunks(items: Sequence[_T], columns: int) -> Iterable[Sequence[_T]]:
    size = max(1, _MAX_PARAMETERS // columns)
    for start in range(0, len(items), size):
        yield items[start : start + size]


@functools.lru_cache(maxsize=256)
def _placeholders(count: int, start: int = 1) -> str:
    return ", ".join(f"${n}" for n in range(start, start + count))


@functools.lru_cache(maxsize=64)
def _values(rows: int, columns: int) -> str:
    return ", ".join(f"({_placeholders(columns, 1 + row * columns)})" for row in range(rows))


def find_sent_query(dialect: str, uids: Sequence[str]) -> tuple[str, list[Any]]:
    """The statement (and its arguments) :meth:`Ledger.sent_copies` runs for a chunk of UIDs.

    Both tables are probed by index, one UID at a time, whatever the planner believes about
    their size: on PostgreSQL each UID of an array looks up its files by
    ``ledger_files_sop_instance`` and each file its deliveries by the primary key, in
    subqueries that cannot be flattened (``OFFSET 0``) into a join the planner could turn
    into two full scans (as it does for a long ``IN`` list when a table has no statistics
    yet). SQLite always looks up each value of an ``IN`` list in the index.
    """
    if dialect == "postgres":
        return (
            "SELECT f.id, f.sop_instance_uid, f.sha256, f.path, f.status, f.archive_path,"
            " d.destination"
            " FROM unnest($1::text[]) AS wanted (uid)"
            " CROSS JOIN LATERAL (SELECT id, sop_instance_uid, sha256, path, status,"
            "  archive_path FROM ledger_files WHERE sop_instance_uid = wanted.uid OFFSET 0) AS f"
            " CROSS JOIN LATERAL (SELECT destination FROM ledger_deliveries"
            "  WHERE file_id = f.id AND status IN ('sent', 'warning') OFFSET 0) AS d",
            [list(uids)],
        )  # fmt: skip
    return (
        "SELECT f.id, f.sop_instance_uid, f.sha256, f.path, f.status, f.archive_path,"
        " d.destination"
        " FROM ledger_files f JOIN ledger_deliveries d ON d.file_id = f.id"
        f" WHERE f.sop_instance_uid IN ({_placeholders(len(uids))})"
        " AND d.status IN ('sent', 'warning')",
        list(uids),
    )


def _check_status(status: str, allowed: Sequence[str], what: str) -> None:
    if status not in allowed:
        raise ValueError(f"{status!r} is not a {what} status (one of: {', '.join(allowed)})")


def _file(row: Row) -> LedgerFile:
    return LedgerFile(**row)


def _delivery(row: Row) -> Delivery:
    return Delivery(**row)


class Ledger:
    """The file ledger on a :class:`~pacsflow.store.base.Database` (after core migrations)."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock

    async def record_seen(
        self, files: Sequence[SeenFile], *, look_up_first: bool = False
    ) -> list[Recorded]:
        """Record files seen on disk, once per path+size+mtime; one result per input, in order.

        ``look_up_first``: most of these files are recorded already (the uploader, after the
        watcher): one read finds them, and only the others are inserted.
        """
        return (await self._record_seen(files, look_up_first=look_up_first))[0]

    async def record_seen_rows(self, files: Sequence[SeenFile]) -> list[LedgerFile]:
        """:meth:`record_seen`, answered with each file's whole row, in input order: a row
        this call created is what it inserted (no second round trip to read it), the
        others are read back."""
        return (await self.record_for_announcing(files, [False] * len(files))).rows

    async def record_for_announcing(
        self, files: Sequence[SeenFile], announce: Sequence[bool]
    ) -> Announcing:
        """:meth:`record_seen_rows` for the watcher: the new files flagged in ``announce`` are
        recorded as being announced, in one ``ledger_announcing`` batch written in the same
        transaction. :meth:`mark_announced` with that batch confirms them once the bus did.

        Until then (a crash, a bus that refused) the rows come back with ``announced_at``
        None, so the next pass announces them again.
        """
        recorded, now, batch_id, batch_ids = await self._record_seen(files, announce=announce)
        known = {row.id: row for row in await self.get_files(r.id for r in recorded if not r.new)}
        if any(row.announced_at is not None and row.status == "ready" for row in known.values()):
            unconfirmed = {i for _, ids in await self._announcing_batches(self._db) for i in ids}
            for file_id, row in known.items():
                if file_id in unconfirmed:
                    known[file_id] = dataclasses.replace(row, announced_at=None)
        rows = []
        for result, seen in zip(recorded, files, strict=True):
            if not result.new:
                rows.append(known[result.id])
                continue
            rows.append(LedgerFile(
                id=result.id, path=result.path, size=result.size, mtime=result.mtime,
                sha256=seen.sha256, sop_instance_uid=seen.sop_instance_uid,
                series_instance_uid=seen.series_instance_uid,
                study_instance_uid=seen.study_instance_uid, sop_class_uid=seen.sop_class_uid,
                transfer_syntax_uid=seen.transfer_syntax_uid, batch_key=seen.batch_key,
                status="ready", reason=None, archive_path=None, created_at=now,
                updated_at=now, announced_at=None,
            ))  # fmt: skip
        return Announcing(rows, batch_id, batch_ids)

    async def _record_seen(
        self, files: Sequence[SeenFile], *, look_up_first: bool = False,
        announce: Sequence[bool] | None = None,
    ) -> tuple[list[Recorded], float, int | None, frozenset[int]]:
        """The results, the time recorded, and the ``ledger_announcing`` batch (its id and
        file ids) of the new files flagged in ``announce``."""
        keys = [(os.fspath(f.path), int(f.size), float(f.mtime)) for f in files]
        unique: dict[tuple[str, int, float], SeenFile] = {}
        announced: set[tuple[str, int, float]] = set()
        for index, (key, seen) in enumerate(zip(keys, files, strict=True)):
            unique.setdefault(key, seen)
            if announce is not None and announce[index]:
                announced.add(key)
        now = self._clock()
        if not unique:
            return [], now, None, frozenset()
        found: dict[tuple[str, int, float], tuple[int, FileStatus]] = {}
        created: set[tuple[str, int, float]] = set()
        if look_up_first:
            await self._look_up(self._db, unique, found)
        columns = 14
        # In key order, so that two writers of overlapping batches lock rows in the same order
        # (PostgreSQL would otherwise end one of them as a deadlock).
        ordered = sorted(((k, v) for k, v in unique.items() if k not in found),
                         key=lambda item: item[0])  # fmt: skip
        if not ordered:
            return self._results(keys, found, created), now, None, frozenset()
        batch_id: int | None = None
        batch_ids: frozenset[int] = frozenset()
        async with self._db.transaction() as tx:
            for chunk in _chunks(ordered, columns):
                args: list[Any] = []
                for key, seen in chunk:
                    args += [
                        *key, seen.sha256, seen.sop_instance_uid,
                        seen.series_instance_uid, seen.study_instance_uid, seen.sop_class_uid,
                        seen.transfer_syntax_uid, seen.batch_key, "ready", now, now,
                        now if key in announced else None,
                    ]  # fmt: skip
                rows = await tx.fetch(
                    "INSERT INTO ledger_files (path, size, mtime, sha256, sop_instance_uid,"
                    " series_instance_uid, study_instance_uid, sop_class_uid,"
                    " transfer_syntax_uid, batch_key, status, created_at, updated_at,"
                    " announced_at)"
                    f" VALUES {_values(len(chunk), columns)}"
                    " ON CONFLICT (path, size, mtime) DO NOTHING"
                    " RETURNING id, path, size, mtime",
                    *args,
                )
                for row in rows:
                    key = (row["path"], row["size"], row["mtime"])
                    found[key] = (row["id"], "ready")
                    created.add(key)
            batch_ids = frozenset(found[key][0] for key in created & announced)
            if batch_ids:
                batch_id = await tx.fetchval(
                    "INSERT INTO ledger_announcing (file_ids, created_at) VALUES ($1, $2)"
                    " RETURNING id",
                    json.dumps(sorted(batch_ids)), now,
                )
            # The others were recorded before.
            await self._look_up(tx, unique, found)
        return self._results(keys, found, created), now, batch_id, batch_ids

    @staticmethod
    async def _look_up(
        db: Database, wanted: Mapping[tuple[str, int, float], object],
        found: dict[tuple[str, int, float], tuple[int, FileStatus]],
    ) -> None:
        """Add the recorded rows of ``wanted`` keys not in ``found`` yet, looked up by path
        (the unique index's prefix)."""
        missing = sorted({key[0] for key in wanted if key not in found})
        for paths in _chunks(missing, 1):
            rows = await db.fetch(
                "SELECT id, path, size, mtime, status FROM ledger_files"
                f" WHERE path IN ({_placeholders(len(paths))})",
                *paths,
            )
            for row in rows:
                key = (row["path"], row["size"], row["mtime"])
                if key in wanted and key not in found:
                    found[key] = (row["id"], row["status"])

    @staticmethod
    def _results(
        keys: Sequence[tuple[str, int, float]],
        found: Mapping[tuple[str, int, float], tuple[int, FileStatus]],
        created: set[tuple[str, int, float]],
    ) -> list[Recorded]:
        results = []
        for key in keys:
            if key not in found:
                raise StoreError(f"ledger: {key[0]} was neither inserted nor found")
            file_id, status = found[key]
            new = key in created
            # The same file twice in one batch: only its first mention created the row.
            created.discard(key)
            results.append(Recorded(file_id, key[0], key[1], key[2], status, new))
        return results

    async def set_details(self, details: Sequence[FileDetails]) -> None:
        """Store content hashes and DICOM identifiers found by reading recorded files."""
        now = self._clock()
        await self._db.executemany(
            "UPDATE ledger_files SET sha256 = $2, sop_instance_uid = $3,"
            " series_instance_uid = $4, study_instance_uid = $5, sop_class_uid = $6,"
            " transfer_syntax_uid = $7, updated_at = $8 WHERE id = $1",
            [
                (
                    d.file_id, d.sha256, d.sop_instance_uid, d.series_instance_uid,
                    d.study_instance_uid, d.sop_class_uid, d.transfer_syntax_uid, now,
                )
                for d in details
            ],
        )  # fmt: skip

    async def mark_invalid(self, reasons: Mapping[int, str]) -> None:
        """Mark files (id -> reason) as not DICOM or damaged; they are never sent."""
        await self._set_status(reasons, "invalid")

    async def mark_duplicate(self, reasons: Mapping[int, str]) -> None:
        """Mark files (id -> reason) as copies of instances already sent; they are skipped."""
        await self._set_status(reasons, "duplicate")

    async def _set_status(self, reasons: Mapping[int, str], status: FileStatus) -> None:
        now = self._clock()
        await self._db.executemany(
            "UPDATE ledger_files SET status = $2, reason = $3, updated_at = $4 WHERE id = $1",
            [(file_id, status, reason, now) for file_id, reason in reasons.items()],
        )

    async def sent_copies(
        self, uids: Iterable[str], *, exclude_file_ids: Iterable[int] = ()
    ) -> dict[str, list[SentCopy]]:
        """The files with these SOP Instance UIDs that some destination confirmed (sent or
        warning), by UID, each with those destinations.

        Files in ``exclude_file_ids`` do not count: a file is no copy of itself."""
        excluded = set(exclude_file_ids)
        files: dict[int, Row] = {}
        destinations: dict[int, set[str]] = {}
        for chunk in _chunks(sorted(set(uids)), 1):
            sql, args = find_sent_query(self._db.dialect, chunk)
            for row in await self._db.fetch(sql, *args):
                if row["id"] not in excluded:
                    files.setdefault(row["id"], row)
                    destinations.setdefault(row["id"], set()).add(row["destination"])
        found: dict[str, list[SentCopy]] = {}
        for file_id, row in sorted(files.items()):
            location = row["archive_path"] if row["status"] == "archived" else row["path"]
            found.setdefault(row["sop_instance_uid"], []).append(SentCopy(
                file_id, row["sop_instance_uid"], row["sha256"], location,
                frozenset(destinations[file_id])))  # fmt: skip
        return found

    async def set_hashes(self, hashes: Mapping[int, str]) -> None:
        """Store content hashes (file id -> SHA-256) computed after the files were recorded."""
        await self._db.executemany(
            "UPDATE ledger_files SET sha256 = $2 WHERE id = $1", list(hashes.items()))

    async def add_deliveries(self, file_ids: Iterable[int], destinations: Iterable[str]) -> None:
        """Create a pending delivery of each file to each destination (existing ones stay)."""
        ids = list(dict.fromkeys(file_ids))
        targets = list(dict.fromkeys(destinations))
        if not ids or not targets:
            return
        now = self._clock()
        async with self._db.transaction() as tx:
            if tx.dialect == "postgres":
                # One statement for the batch, not one execution per row.
                await tx.execute(
                    "INSERT INTO ledger_deliveries (file_id, destination, status, attempts,"
                    " created_at, updated_at)"
                    " SELECT f, d, 'pending', 0, $3, $3 FROM unnest($1::bigint[]) AS f"
                    " CROSS JOIN unnest($2::text[]) AS d"
                    " ON CONFLICT (file_id, destination) DO NOTHING",
                    ids, targets, now,
                )  # fmt: skip
            else:
                await tx.executemany(
                    "INSERT INTO ledger_deliveries (file_id, destination, status, attempts,"
                    " created_at, updated_at) VALUES ($1, $2, 'pending', 0, $3, $3)"
                    " ON CONFLICT (file_id, destination) DO NOTHING",
                    [(file_id, target, now) for file_id in ids for target in targets],
                )
            # A new pending delivery leaves a ready file as it is: only a sent or failed file
            # changes status.
            await self._refresh(tx, ids, now, only=("sent", "failed"))

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        """Record send outcomes per file and destination; update the files' statuses."""
        for outcome in outcomes:
            _check_status(outcome.status, DELIVERY_STATUSES, "delivery")
        if not outcomes:
            return
        now = self._clock()
        rows = []
        for o in outcomes:
            counted = 1 if o.status in _ATTEMPT_RESULTS else 0
            first = counted if o.attempts is None else o.attempts
            rows.append(
                (o.file_id, o.destination, o.status, o.dimse_status, o.attempts, o.error, now,
                 counted, first)
            )  # fmt: skip
        async with self._db.transaction() as tx:
            # $5 (attempts given) wins; else $8 (0 or 1) is added; $9 is the count of a new row.
            await tx.executemany(
                "INSERT INTO ledger_deliveries (file_id, destination, status, dimse_status,"
                " attempts, last_error, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $9, $6, $7, $7)"
                " ON CONFLICT (file_id, destination) DO UPDATE SET"
                " status = excluded.status, dimse_status = excluded.dimse_status,"
                " attempts = COALESCE($5, ledger_deliveries.attempts + $8),"
                " last_error = excluded.last_error, updated_at = excluded.updated_at",
                rows,
            )
            await self._refresh(tx, list(dict.fromkeys(o.file_id for o in outcomes)), now)

    async def _refresh(
        self, tx: Database, file_ids: Sequence[int], now: float,
        only: Sequence[FileStatus] = ("ready", "sent", "failed"),
    ) -> None:
        # The file's status follows from its deliveries: ready while one is waiting or being
        # sent (read as sending then), failed when one failed for good, sent only when every
        # destination confirmed. ``only``: the statuses that can change (every row rewritten
        # costs an index entry in each index).
        statuses = ", ".join(f"'{status}'" for status in only if status in FILE_STATUSES)
        for chunk in _chunks(file_ids, 1):
            await tx.execute(
                "UPDATE ledger_files SET status = (SELECT CASE"
                " WHEN count(*) = 0 THEN 'ready'"
                " WHEN count(*) FILTER (WHERE d.status IN ('pending', 'sending')) > 0"
                " THEN 'ready'"
                " WHEN count(*) FILTER (WHERE d.status IN ('sent', 'warning')) < count(*)"
                " THEN 'failed'"
                " ELSE 'sent' END"
                " FROM ledger_deliveries d WHERE d.file_id = ledger_files.id),"
                " updated_at = $1"
                f" WHERE id IN ({_placeholders(len(chunk), 2)})"
                f" AND status IN ({statuses})",
                now,
                *chunk,
            )

    async def deliveries(self, file_ids: Iterable[int]) -> list[Delivery]:
        """The deliveries of these files, by file and destination."""
        ids = sorted(set(file_ids))
        found: list[Delivery] = []
        for chunk in _chunks(ids, 1):
            rows = await self._db.fetch(
                f"SELECT {_DELIVERY_COLUMNS} FROM ledger_deliveries"
                f" WHERE file_id IN ({_placeholders(len(chunk))})"
                " ORDER BY file_id, destination",
                *chunk,
            )
            found += map(_delivery, rows)
        return found

    async def get_files(self, file_ids: Iterable[int]) -> list[LedgerFile]:
        """These files (those that exist), by id."""
        ids = sorted(set(file_ids))
        found: list[LedgerFile] = []
        for chunk in _chunks(ids, 1):
            rows = await self._db.fetch(
                f"SELECT {_FILE_COLUMNS} FROM ledger_files"
                f" WHERE id IN ({_placeholders(len(chunk))}) ORDER BY id",
                *chunk,
            )
            found += map(_file, rows)
        return found

    async def list_confirmed(
        self, file_ids: Iterable[int] | None = None, *, limit: int = 1000
    ) -> list[LedgerFile]:
        """Files confirmed by every destination, not archived (among ``file_ids`` if given)."""
        condition = (
            "f.status = 'sent'"
            " AND EXISTS (SELECT 1 FROM ledger_deliveries d WHERE d.file_id = f.id)"
            " AND NOT EXISTS (SELECT 1 FROM ledger_deliveries d WHERE d.file_id = f.id"
            " AND d.status NOT IN ('sent', 'warning'))"
        )
        query = "SELECT " + ", ".join(f"f.{name}" for name in _FILE_COLUMN_NAMES)
        if file_ids is None:
            rows = await self._db.fetch(
                f"{query} FROM ledger_files f WHERE {condition}"
                " ORDER BY f.updated_at, f.id LIMIT $1",
                limit,
            )
            return [_file(row) for row in rows]
        found: list[LedgerFile] = []
        for chunk in _chunks(sorted(set(file_ids)), 1):
            rows = await self._db.fetch(
                f"{query} FROM ledger_files f WHERE {condition}"
                f" AND f.id IN ({_placeholders(len(chunk))})",
                *chunk,
            )
            found += map(_file, rows)
        found.sort(key=lambda f: (f.updated_at, f.id))
        return found[:limit]

    async def mark_announced(
        self, file_ids: Iterable[int], batch: Announcing | None = None
    ) -> None:
        """Record that the bus confirmed file-ready events naming these files.

        The files of ``batch`` were marked when recorded: its ``ledger_announcing`` row goes
        (also when none of them was announced: invalid or duplicate files are not). Other
        files (announced again after a crash) get ``announced_at`` and leave any batch left
        behind by the crash.
        """
        now = self._clock()
        in_batch = batch.file_ids if batch is not None else frozenset()
        others = sorted(set(file_ids) - in_batch)
        if (batch is None or batch.batch_id is None) and not others:
            return
        async with self._db.transaction() as tx:
            if batch is not None and batch.batch_id is not None:
                await tx.execute("DELETE FROM ledger_announcing WHERE id = $1", batch.batch_id)
            for chunk in _chunks(others, 1):
                await tx.execute(
                    f"UPDATE ledger_files SET announced_at = $1"
                    f" WHERE id IN ({_placeholders(len(chunk), 2)})",
                    now,
                    *chunk,
                )
            if others:
                await self._leave_batches(tx, set(others))

    async def prune_announcing(self) -> int:
        """Drop from left-behind batches the files no longer waiting to be announced (sent,
        invalid, archived... meanwhile), and the batches left empty; the files still named."""
        async with self._db.transaction() as tx:
            named = {i for _, ids in await self._announcing_batches(tx) for i in ids}
            waiting: set[int] = set()
            for chunk in _chunks(sorted(named), 1):
                rows = await tx.fetch(
                    f"SELECT id FROM ledger_files WHERE status = 'ready' AND NOT {_BEING_SENT}"
                    f" AND id IN ({_placeholders(len(chunk))})",
                    *chunk,
                )
                waiting.update(row["id"] for row in rows)
            await self._leave_batches(tx, named - waiting)
        return len(waiting)

    @staticmethod
    async def _announcing_batches(db: Database) -> list[tuple[int, set[int]]]:
        # Only batches in flight or left behind by a crash: a few rows at most.
        rows = await db.fetch("SELECT id, file_ids FROM ledger_announcing ORDER BY id")
        return [(row["id"], set(json.loads(row["file_ids"]))) for row in rows]

    async def _leave_batches(self, tx: Database, file_ids: set[int]) -> None:
        """Take these files out of every ``ledger_announcing`` batch; drop emptied batches."""
        if not file_ids:
            return
        for batch_id, ids in await self._announcing_batches(tx):
            if ids & file_ids:
                left = ids - file_ids
                if left:
                    await tx.execute("UPDATE ledger_announcing SET file_ids = $2 WHERE id = $1",
                                     batch_id, json.dumps(sorted(left)))
                else:
                    await tx.execute("DELETE FROM ledger_announcing WHERE id = $1", batch_id)

    async def mark_archived(self, archive_paths: Mapping[int, str | None]) -> None:
        """Mark files (id -> where they were moved, None when deleted) as archived."""
        now = self._clock()
        if self._db.dialect == "postgres":
            # One statement for the batch, not one execution per row.
            await self._db.execute(
                "UPDATE ledger_files f SET status = 'archived', archive_path = a.path,"
                " updated_at = $3 FROM unnest($1::bigint[], $2::text[]) AS a (id, path)"
                " WHERE f.id = a.id",
                list(archive_paths), list(archive_paths.values()), now,
            )  # fmt: skip
            return
        await self._db.executemany(
            "UPDATE ledger_files SET status = 'archived', archive_path = $2, updated_at = $3"
            " WHERE id = $1",
            [(file_id, path, now) for file_id, path in archive_paths.items()],
        )

    async def list_files(
        self,
        *,
        status: FileStatus | Sequence[FileStatus] | None = None,
        since: float | None = None,
        # (updated_at, id) of the last file of the previous page
        after: tuple[float, int] | None = None,
        limit: int = 1000,
    ) -> list[LedgerFile]:
        """Files by last change, filtered by status (one or several) and ``since``, from
        after the cursor."""
        where, args = self._filter(status, since)
        if after is not None:
            args += [after[0], after[1]]
            where.append(f"(updated_at, id) > (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        rows = await self._db.fetch(
            f"SELECT {_FILE_COLUMNS} FROM ledger_files"
            f"{' WHERE ' + ' AND '.join(where) if where else ''}"
            f" ORDER BY updated_at, id LIMIT ${len(args)}",
            *args,
        )
        return [_file(row) for row in rows]

    async def iter_files(
        self,
        *,
        status: FileStatus | Sequence[FileStatus] | None = None,
        since: float | None = None,
        page_size: int = 1000,
    ) -> AsyncIterator[LedgerFile]:
        """Every file :meth:`list_files` selects, fetched a page at a time (for exports)."""
        after: tuple[float, int] | None = None
        while True:
            page = await self.list_files(status=status, since=since, after=after, limit=page_size)
            for item in page:
                yield item
            if len(page) < page_size:
                return
            after = (page[-1].updated_at, page[-1].id)

    async def count_by_status(self, *, since: float | None = None) -> dict[FileStatus, int]:
        """Files per status (every status, zero included), changed at or after ``since``."""
        where, args = self._filter(None, since)
        rows = await self._db.fetch(
            f"SELECT {_STATUS} AS status, count(*) AS n FROM ledger_files"
            f"{' WHERE ' + ' AND '.join(where) if where else ''} GROUP BY 1",
            *args,
        )
        counts: dict[FileStatus, int] = dict.fromkeys(FILE_STATUSES, 0)
        for row in rows:
            counts[row["status"]] = row["n"]
        return counts

    async def count_files(
        self, *, status: FileStatus | Sequence[FileStatus] | None = None,
        since: float | None = None,
    ) -> int:
        """How many files have this status (any when None), changed at or after ``since``."""
        where, args = self._filter(status, since)
        return int(
            await self._db.fetchval(
                "SELECT count(*) FROM ledger_files"
                f"{' WHERE ' + ' AND '.join(where) if where else ''}",
                *args,
            )
        )

    @staticmethod
    def _filter(
        status: str | Sequence[str] | None, since: float | None
    ) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            # One status, or several (``sent`` and ``archived``: every file that was sent).
            wanted = [status] if isinstance(status, str) else list(dict.fromkeys(status))
            if not wanted:
                raise ValueError("no file status given")
            for one in wanted:
                _check_status(one, FILE_STATUSES, "file")
            either = []
            stored = [one for one in wanted if one not in ("ready", "sending")]
            if stored:
                first = len(args) + 1
                args += stored
                either.append(f"status IN ({_placeholders(len(stored), first)})")
            if "ready" in wanted and "sending" in wanted:
                either.append("status = 'ready'")
            elif "ready" in wanted:
                either.append(f"(status = 'ready' AND NOT {_BEING_SENT})")
            elif "sending" in wanted:
                either.append(f"(status = 'ready' AND {_BEING_SENT})")
            where.append(either[0] if len(either) == 1 else f"({' OR '.join(either)})")
        if since is not None:
            args.append(float(since))
            where.append(f"updated_at >= ${len(args)}")
        return where, args
