"""The watcher: import folders in, validated ``file-ready`` events out, sent files archived.

For each import unit that has been quiet for the debounce time (see :mod:`.folders`):

1. skip it while any file is still open for writing;
2. validate every file (header only), rewriting PatientID/PatientName from the folder name
   when configured, and hash it;
3. record every file in the ledger (a rescan finds the same rows, so nothing is handled twice);
4. move invalid files to quarantine and copies of instances already sent to the archive, each
   with its reason in the ledger; DICOMDIR files go to the archive with the rest of the medium;
5. emit ``file-ready`` in batches for the files still waiting to be sent.

Steps 2 to 5 run on one batch at a time (16 files first, then twice as many each time up to
``batch_size``): the uploader sends the first batch while the watcher validates the next, and
each batch costs one ledger transaction and one confirmed publish.

On ``file-sent`` (and on a timer, which also catches up after a crash) files that every
destination confirmed are moved to ``<archive>/<yyyymmdd_hhmmss>/<path in the import folder>``
and emptied folders are removed. A file is never archived or deleted before that.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pacsflow.bus import EventBus
from pacsflow.config import WatcherSettings
from pacsflow.errors import BusError, InvalidDicom, StoreError
from pacsflow.events import FileReady, FileReadyPayload, ReadyFile, Source
from pacsflow.store.ledger import Announcing, Ledger, LedgerFile, SeenFile, SentCopy
from pacsflow.topology import CONSUMES
from pacsflow_watcher.folders import (
    FolderWatcher,
    QuietTracker,
    files_open_for_writing,
    newest_change,
    walk_files,
)
from pacsflow_watcher.naming import PatientIdentity, identity_from_folder, rewrite_identity
from pacsflow_watcher.validate import Verdict, validate_file

__all__ = ["Watcher", "WatcherMetrics"]

log = logging.getLogger(__name__)

_STAMP_FORMAT = "%Y%m%d_%H%M%S"


class WatcherMetrics:
    """The watcher's metrics, registered on the process's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.files = Counter(
            "pacsflow_watcher_files", "Files handled in import folders, by outcome",
            ["outcome"], registry=registry,
        )
        self.archived = Counter(
            "pacsflow_watcher_files_archived", "Files moved to the archive after every "
            "destination confirmed them", registry=registry,
        )
        self.folders_pending = Gauge(
            "pacsflow_watcher_folders_pending", "Import units waiting for their quiet period",
            registry=registry,
        )
        self.debounce_wait = Histogram(
            "pacsflow_watcher_debounce_wait_seconds",
            "From a unit's first change to its handling",
            buckets=(1, 5, 15, 30, 60, 120, 180, 300, 600, 1800, 3600), registry=registry,
        )
        self.unit_seconds = Histogram(
            "pacsflow_watcher_unit_seconds", "Time to validate, record and announce one unit",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300), registry=registry,
        )
        self.ledger_files = Gauge(
            "pacsflow_watcher_ledger_files", "Files in the ledger, by status", ["status"],
            registry=registry,
        )
        self.errors = Counter(
            "pacsflow_watcher_errors", "Units or files the watcher could not handle, by stage",
            ["stage"], registry=registry,
        )


@dataclass(frozen=True)
class _Checked:
    """One file after validation (and rewrite): what the ledger and the event need."""

    path: Path
    verdict: Verdict
    size: int
    mtime: float
    sha256: str | None


# Files up to this size are read once into memory: validated and hashed from the same bytes.
# Larger ones are validated from the file (headers only, through its 8 KiB buffer) and hashed
# only when an instance with their SOP Instance UID was sent before, as only then does their
# content matter (a copy or a corrected image): hashing every 0.5 MB image was half of the
# watcher's work. They are hashed through one reusable buffer per thread: a fresh buffer of
# their size for every file would cost a page fault per 4 KiB.
_READ_WHOLE_UP_TO = 64 << 10
_HASH_BLOCK = 1 << 20
_hash_buffers = threading.local()
# Files in the first batch of a unit; the batches after it double up to batch_size.
_FIRST_BATCH = 16


def _inspect(path: Path) -> tuple[Verdict, os.stat_result, str | None]:
    """The file's verdict, its stat and, when it is valid and small enough to be read whole,
    the SHA-256 of its content."""
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        if stat.st_size <= _READ_WHOLE_UP_TO:
            content = handle.read()
            verdict = validate_file(path, io.BytesIO(content))
            digest = hashlib.sha256(content).hexdigest() if verdict.outcome == "valid" else None
            return verdict, stat, digest
        return validate_file(path, handle), stat, None


def _hash_file(path: str) -> str | None:
    """The SHA-256 of a file's content; None when it is gone or cannot be read."""
    buffer = getattr(_hash_buffers, "view", None)
    if buffer is None:
        buffer = _hash_buffers.view = memoryview(bytearray(_HASH_BLOCK))
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while count := handle.readinto(buffer):
                digest.update(buffer[:count])
    except OSError:
        return None
    return digest.hexdigest()


def _move(source: str | os.PathLike[str], target: str | os.PathLike[str],
          made: set[str] | None = None) -> str:  # fmt: skip
    """Move a file, never overwriting: a name already taken gets a counter; where it went.

    ``made``: folders this caller has already created, so a batch makes each folder once.
    Strings and ``os.path``, not ``pathlib``: this runs for every archived file.
    """
    source, target = os.fspath(source), os.fspath(target)
    folder = os.path.dirname(target)
    if made is None or folder not in made:
        os.makedirs(folder, exist_ok=True)
        if made is not None:
            made.add(folder)
    candidate, counter = target, 1
    stem, suffix = os.path.splitext(target)
    while os.path.lexists(candidate):
        candidate = f"{stem}.{counter}{suffix}"
        counter += 1
    # Same file system: an atomic rename; otherwise copy then delete the source.
    try:
        os.rename(source, candidate)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        shutil.move(source, candidate)
    return candidate


class Watcher:
    """Turns import folders into ``file-ready`` events and archives what was sent."""

    def __init__(
        self,
        settings: WatcherSettings,
        *,
        ledger: Ledger,
        bus: EventBus,
        source: Source,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.bus = bus
        self.source = source
        self.clock = clock
        self.metrics = WatcherMetrics(registry)
        self.folders = FolderWatcher(settings.import_folders)
        self.tracker = QuietTracker(settings.debounce_seconds)
        self._first_change: dict[Path, float] = {}
        self._pattern = re.compile(settings.rename_pattern) if settings.rename_pattern else None
        self._archive_lock = asyncio.Lock()
        # Set while a file-sent pass waits for the lock: later file-sent events need no pass
        # of their own.
        self._archive_waiting: object | None = None
        self._wake = asyncio.Event()
        # "<root>/" of each import folder, to find a file's place below its root by prefix.
        self._root_prefixes = [os.path.join(root, "") for root in self.folders.roots]

    # --- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """Watch, handle due units and archive, until cancelled."""
        self.folders.start()
        loop = asyncio.get_running_loop()
        loop.add_reader(self.folders.fileno(), self._on_inotify)
        try:
            await self._prune_announcing()
            self.rescan()
            await self.bus.subscribe("watcher", CONSUMES["watcher"], self._on_file_sent)
            archiver = asyncio.create_task(self._archive_periodically())
            try:
                while True:
                    await self.handle_due_units()
                    wait = self.tracker.next_due_in(self.clock())
                    self._wake.clear()
                    try:
                        async with asyncio.timeout(min(wait or 5.0, 5.0)):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
            finally:
                archiver.cancel()
        finally:
            loop.remove_reader(self.folders.fileno())
            self.folders.close()

    async def _prune_announcing(self) -> None:
        """Tidy the batches a crash left unconfirmed; the rescan announces their files again."""
        try:
            waiting = await self.ledger.prune_announcing()
        except StoreError as err:
            log.warning("cannot tidy unconfirmed announcements (tried again at the next start):"
                        " %s", err)
            return
        if waiting:
            log.info("%d file(s) recorded before a restart wait to be announced again", waiting)

    def rescan(self) -> None:
        """Find every unit present now, dated by its newest change (start-up, lost events)."""
        for unit in self.folders.existing_units():
            changed = newest_change(unit)
            if changed is not None:
                self._touch(unit, min(changed, self.clock()))
        log.info("rescan found %d import unit(s)", len(self.tracker))

    def _touch(self, unit: Path, at: float) -> None:
        self.tracker.touch(unit, at)
        self._first_change.setdefault(unit, at)
        self.metrics.folders_pending.set(len(self.tracker))

    def _on_inotify(self) -> None:
        units, overflow = self.folders.read_changes()
        now = self.clock()
        for unit in units:
            self._touch(unit, now)
        if overflow:
            log.warning("inotify queue overflowed: rescanning the import folders")
            self.rescan()
        self._wake.set()

    async def handle_due_units(self) -> None:
        """Handle every unit whose quiet period is over."""
        for unit in self.tracker.due(self.clock()):
            started = self.clock()
            try:
                done = await self.handle_unit(unit)
            except OSError as err:
                # A unit that cannot be read now (permissions, a vanished disk) is tried again
                # after another quiet period; the rest go on.
                log.error("cannot handle import unit %s: %s", unit, err)
                self.metrics.errors.labels(stage="unit").inc()
                self.tracker.touch(unit, self.clock())
                continue
            except (StoreError, BusError) as err:
                # The state store or the bus is down (a restart): the unit is handled again
                # after another quiet period; what was recorded or announced is not repeated.
                log.error("state store or event bus unavailable while handling %s: %s",
                          unit, err)
                self.metrics.errors.labels(stage="unit").inc()
                self.tracker.touch(unit, self.clock())
                continue
            if done:
                self.tracker.forget(unit)
                first = self._first_change.pop(unit, started)
                self.metrics.debounce_wait.observe(max(0.0, started - first))
                self.metrics.unit_seconds.observe(self.clock() - started)
        self.metrics.folders_pending.set(len(self.tracker))

    # --- one unit ------------------------------------------------------------------------

    async def handle_unit(self, unit: Path) -> bool:
        """Validate, record and announce one unit; False when it must wait longer."""
        files = await asyncio.to_thread(lambda: list(walk_files(unit)))
        if not files:
            return True
        busy = await asyncio.to_thread(files_open_for_writing, files)
        if busy:
            log.info("%d file(s) in %s are still being written; waiting", len(busy), unit.name)
            self.tracker.touch(unit, self.clock())
            return False

        identity: PatientIdentity | None = None
        if self._pattern is not None and unit.is_dir():
            identity = identity_from_folder(unit.name, self._pattern)
            if identity is None:
                return await self._unmatched(unit, files)

        stamp = datetime.fromtimestamp(self.clock()).strftime(_STAMP_FORMAT)
        batch_key = f"{unit.name}@{stamp}"
        # Batches start small and double, so the first images are on their way after a few
        # files were read, not after a whole batch_size of them.
        start, size = 0, min(_FIRST_BATCH, self.settings.batch_size)
        while start < len(files):
            await self._handle_files(files[start:start + size], identity, stamp, batch_key)
            start += size
            size = min(2 * size, self.settings.batch_size)
        return True

    async def _handle_files(self, files: Sequence[Path], identity: PatientIdentity | None,
                            stamp: str, batch_key: str) -> None:  # fmt: skip
        """Validate, record and announce files of one unit (or move them aside)."""
        checked = await asyncio.to_thread(self._check_files, files, identity)
        # Valid new files are recorded as being announced, so that confirming the events
        # costs one statement per batch rather than one more row version per file.
        announcing = await self.ledger.record_for_announcing([
            SeenFile(
                path=str(c.path), size=c.size, mtime=c.mtime, sha256=c.sha256,
                sop_instance_uid=c.verdict.file.sop_instance_uid if c.verdict.file else None,
                series_instance_uid=c.verdict.file.series_instance_uid if c.verdict.file else None,
                study_instance_uid=c.verdict.file.study_instance_uid if c.verdict.file else None,
                sop_class_uid=c.verdict.file.sop_class_uid if c.verdict.file else None,
                transfer_syntax_uid=c.verdict.file.transfer_syntax_uid if c.verdict.file else None,
                batch_key=batch_key,
            )
            for c in checked
        ], [c.verdict.outcome == "valid" for c in checked])
        recorded = announcing.rows
        by_path = {r.path: r for r in recorded}
        ledger_rows = {r.id: r for r in recorded}

        invalid: dict[int, str] = {}
        handled_before: dict[int, str] = {}
        dicomdirs: list[LedgerFile] = []
        candidates: list[tuple[LedgerFile, _Checked]] = []
        for item in checked:
            row = by_path[str(item.path)]
            if row.status == "invalid" or item.verdict.outcome == "invalid":
                invalid[row.id] = row.reason or item.verdict.reason
            elif item.verdict.outcome == "dicomdir":
                dicomdirs.append(row)
            elif row.status == "ready" and row.announced_at is None:
                candidates.append((row, item))
            elif row.status in ("duplicate", "archived"):
                # Recorded as handled, yet in the import folder: a crash before the move, or
                # the same file copied in again with its old timestamp.
                handled_before[row.id] = f"handled before ({row.status})"
            # Files being sent, sent or failed stay where they are until the uploader is done.

        await self._quarantine(invalid, ledger_rows, stamp)
        await self._set_aside_duplicates(handled_before, ledger_rows, stamp)
        await self._archive_files(dicomdirs, count=False)
        to_announce = await self._drop_duplicates(candidates, stamp)
        await self._announce(to_announce, batch_key, announcing)
        self.metrics.files.labels(outcome="dicomdir").inc(len(dicomdirs))

    def _check_files(
        self, files: Sequence[Path], identity: PatientIdentity | None
    ) -> list[_Checked]:
        """Validate (and rewrite) files; runs in a worker thread."""
        checked: list[_Checked] = []
        for path in files:
            try:
                verdict, stat, sha = _inspect(path)
                if (
                    identity is not None
                    and verdict.file is not None
                    and (verdict.file.patient_id, verdict.file.patient_name)
                    != (identity.patient_id, identity.patient_name)
                ):
                    rewrite_identity(path, identity)
                    verdict, stat, sha = _inspect(path)
            except InvalidDicom as err:
                stat = path.stat()
                verdict, sha = Verdict("invalid", err.reason), None
            except FileNotFoundError:
                continue  # removed while we looked: nothing to record
            checked.append(_Checked(path, verdict, stat.st_size, stat.st_mtime, sha))
        return checked

    async def _unmatched(self, unit: Path, files: Sequence[Path]) -> bool:
        self.metrics.files.labels(outcome="unmatched_folder").inc(len(files))
        if self.settings.unmatched_folders == "leave":
            log.warning("folder %r does not match the rename pattern: left alone (%d files)",
                        unit.name, len(files))
            return True
        stamp = datetime.fromtimestamp(self.clock()).strftime(_STAMP_FORMAT)
        reason = f"folder name {unit.name!r} does not match the rename pattern"
        stats = [(p, p.stat()) for p in files]
        recorded = await self.ledger.record_seen_rows([
            SeenFile(path=str(p), size=s.st_size, mtime=s.st_mtime, batch_key=f"{unit.name}@{stamp}")
            for p, s in stats
        ])
        rows = {r.id: r for r in recorded}
        await self._quarantine({r.id: reason for r in recorded}, rows, stamp)
        log.warning("%s: quarantined %d file(s)", reason, len(recorded))
        return True

    # --- moving files out -----------------------------------------------------------------

    def _target(self, folder: Path, path: str | Path, stamp: str) -> str:
        """``<folder>/<stamp>/<path below its import folder>``."""
        text = os.fspath(path)
        for prefix in self._root_prefixes:
            if text.startswith(prefix):
                return os.path.join(folder, stamp, text[len(prefix):])
        raise AssertionError(f"{path} is outside the import folders")

    async def _quarantine(self, reasons: dict[int, str], rows: dict[int, LedgerFile],
                          stamp: str) -> None:
        if not reasons:
            return
        moved: dict[int, str] = {}
        for file_id, reason in reasons.items():
            path = Path(rows[file_id].path)
            target = self._target(self.settings.quarantine_folder, path, stamp)
            try:
                where = await asyncio.to_thread(_move, path, target)
            except FileNotFoundError:
                where = None
            except OSError as err:
                log.error("cannot quarantine %s: %s", path, err)
                self.metrics.errors.labels(stage="quarantine").inc()
                where = None
            moved[file_id] = f"{reason} (quarantined as {where})" if where else reason
            log.warning("invalid file %s: %s", path, reason)
        await self.ledger.mark_invalid(moved)
        self.metrics.files.labels(outcome="invalid").inc(len(reasons))
        await self._remove_empty_folders(Path(rows[i].path) for i in reasons)

    async def _drop_duplicates(
        self, candidates: list[tuple[LedgerFile, _Checked]], stamp: str
    ) -> list[tuple[LedgerFile, _Checked]]:
        uids = {row.sop_instance_uid for row, _ in candidates if row.sop_instance_uid}
        # A candidate's own deliveries may be confirmed meanwhile: it is no copy of itself.
        copies = await self.ledger.sent_copies(
            uids, exclude_file_ids=[row.id for row, _ in candidates])
        if not copies:
            return candidates
        hashes = await self._content_hashes(candidates, copies)
        duplicates: dict[int, str] = {}
        keep: list[tuple[LedgerFile, _Checked]] = []
        rows: dict[int, LedgerFile] = {}
        for row, item in candidates:
            own = hashes.get(row.id)
            where: set[str] = set()
            for copy in copies.get(row.sop_instance_uid or "", ()):
                if own is not None and hashes.get(copy.file_id) == own:
                    where |= copy.destinations
                elif copy.file_id not in hashes:
                    log.info("%s has the SOP Instance UID of file %d, sent before, whose"
                             " content is gone (%s): it cannot be compared, so it is sent",
                             row.path, copy.file_id, copy.location)
            if where:
                duplicates[row.id] = ("already sent (same SOP Instance UID and content) to "
                                      + ", ".join(sorted(where)))
                rows[row.id] = row
            else:
                keep.append((row, item))
        await self._set_aside_duplicates(duplicates, rows, stamp)
        return keep

    async def _content_hashes(
        self, candidates: list[tuple[LedgerFile, _Checked]], copies: dict[str, list[SentCopy]]
    ) -> dict[int, str]:
        """SHA-256 by file id of the candidates with a sent copy, and of those copies: the
        ledger's, else read now (a candidate where it lies, a copy where it is now) and kept."""
        hashes: dict[int, str] = {}
        to_read: dict[int, str] = {}
        for row, _ in candidates:
            if row.sop_instance_uid in copies:
                if row.sha256:
                    hashes[row.id] = row.sha256
                else:
                    to_read[row.id] = row.path
        for copy in (c for found in copies.values() for c in found):
            if copy.sha256:
                hashes[copy.file_id] = copy.sha256
            elif copy.location:
                to_read[copy.file_id] = copy.location
        if to_read:
            read = await asyncio.to_thread(
                lambda: {file_id: _hash_file(path) for file_id, path in to_read.items()})
            computed = {file_id: digest for file_id, digest in read.items() if digest}
            await self.ledger.set_hashes(computed)
            hashes.update(computed)
        return hashes

    async def _set_aside_duplicates(self, reasons: dict[int, str], rows: dict[int, LedgerFile],
                                    stamp: str) -> None:
        if not reasons:
            return
        marked: dict[int, str] = {}
        for file_id, reason in reasons.items():
            path = Path(rows[file_id].path)
            target = self._target(self.settings.archive_folder, path, stamp)
            try:
                where = await asyncio.to_thread(_move, path, target)
                marked[file_id] = f"{reason}; moved to {where}"
            except FileNotFoundError:
                continue  # archived meanwhile: its ledger row already says so
            except OSError as err:
                log.error("cannot move %s out of the import folder: %s", path, err)
                self.metrics.errors.labels(stage="duplicate").inc()
                marked[file_id] = reason
            log.info("skipped %s: %s", path, reason)
        await self.ledger.mark_duplicate(marked)
        self.metrics.files.labels(outcome="duplicate").inc(len(reasons))
        await self._remove_empty_folders(Path(rows[i].path) for i in reasons)

    async def _announce(self, files: list[tuple[LedgerFile, _Checked]], batch_key: str,
                        announcing: Announcing) -> None:  # fmt: skip
        if not files:
            # Nothing valid and new after all (invalid, duplicates): the batch goes.
            await self.ledger.mark_announced([], announcing)
            return
        events = []
        size = self.settings.batch_size
        for start in range(0, len(files), size):
            chunk = files[start:start + size]
            events.append(FileReady(
                source=self.source,
                correlation_id=batch_key,
                payload=FileReadyPayload(
                    files=[
                        ReadyFile(
                            path=row.path, size=row.size,
                            sop_instance_uid=item.verdict.file.sop_instance_uid,
                            series_instance_uid=item.verdict.file.series_instance_uid,
                            study_instance_uid=item.verdict.file.study_instance_uid,
                            sop_class_uid=item.verdict.file.sop_class_uid,
                            transfer_syntax_uid=item.verdict.file.transfer_syntax_uid,
                        )
                        for row, item in chunk
                        if item.verdict.file is not None
                    ],
                    destinations=self.settings.destinations,
                    batch_key=batch_key,
                ),
            ))
        await self.bus.publish(*events)
        # A crash between the publish and this line announces these files once more after a
        # restart; the uploader keeps one delivery per file and destination, so none is sent twice.
        await self.ledger.mark_announced((row.id for row, _ in files), announcing)
        self.metrics.files.labels(outcome="valid").inc(len(files))
        log.info("announced %d file(s) of %s in %d event(s)", len(files), batch_key, len(events))

    # --- archiving -----------------------------------------------------------------------

    async def _on_file_sent(self, _event: object) -> None:
        # A pass that has not begun yet reads the ledger after this event's outcomes were
        # committed (the uploader commits before it publishes): it archives them too, so one
        # waiting pass serves every file-sent that arrives meanwhile.
        # (A crash before that pass runs is caught up by the timer's pass at start.)
        if self._archive_waiting is not None:
            return
        token = self._archive_waiting = object()
        try:
            await self.archive_confirmed()
        finally:
            if self._archive_waiting is token:  # cancelled before the pass began
                self._archive_waiting = None

    async def _archive_periodically(self) -> None:
        while True:
            try:
                await self.archive_confirmed()
                # Counting scans the whole ledger: on this timer, not per unit.
                await self._refresh_ledger_gauge()
            except Exception as err:  # noqa: BLE001 - retried on the next tick; never fatal
                log.error("archiving failed: %s", err)
                self.metrics.errors.labels(stage="archive").inc()
            await asyncio.sleep(self.settings.archive_interval_seconds)

    async def archive_confirmed(self) -> int:
        """Move every file all destinations confirmed to the archive; how many were moved."""
        total = 0
        async with self._archive_lock:
            self._archive_waiting = None
            limit = 500
            while True:
                confirmed = await self.ledger.list_confirmed(limit=limit)
                if not confirmed:
                    break
                moved = await self._archive_files(confirmed)
                total += moved
                if moved < len(confirmed):
                    break  # some could not be moved now: try again on the next round
                if len(confirmed) < limit:
                    # That was all of them; files confirmed since come with their own
                    # file-sent (or the timer), so no query just to find none.
                    break
        return total

    async def _archive_files(self, files: Sequence[LedgerFile], *, count: bool = True) -> int:
        if not files:
            return 0
        now = datetime.fromtimestamp(self.clock()).strftime(_STAMP_FORMAT)
        targets = [(row, row.path, (row.batch_key or "").rpartition("@")[2] or now)
                   for row in files]  # fmt: skip

        def move_all() -> dict[int, str | None]:
            # One worker-thread hand-off for the whole batch, not one per file.
            archived: dict[int, str | None] = {}
            made: set[str] = set()
            for row, path, stamp in targets:
                try:
                    target = self._target(self.settings.archive_folder, path, stamp)
                    archived[row.id] = _move(path, target, made)
                except FileNotFoundError:
                    # Moved before a crash (the target is there) or removed by someone else.
                    log.warning("confirmed file %s is no longer in the import folder", path)
                    archived[row.id] = None
                except (OSError, AssertionError) as err:
                    log.error("cannot archive %s: %s", path, err)
                    self.metrics.errors.labels(stage="archive").inc()
            return archived

        archived = await asyncio.to_thread(move_all)
        await self.ledger.mark_archived(archived)
        if count:
            self.metrics.archived.inc(len(archived))
        await self._remove_empty_folders(row.path for row in files)
        return len(archived)

    async def _remove_empty_folders(self, paths: Iterable[str | Path]) -> None:
        folders = {Path(folder) for folder in {os.path.dirname(p) for p in paths}}

        def remove() -> None:
            for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
                root = self.folders.root_of(folder)
                current = folder
                while root is not None and current != root and root in current.parents:
                    try:
                        current.rmdir()  # only succeeds when empty
                    except OSError:
                        break
                    current = current.parent

        await asyncio.to_thread(remove)

    async def _refresh_ledger_gauge(self) -> None:
        for status, count in (await self.ledger.count_by_status()).items():
            self.metrics.ledger_files.labels(status=status).set(count)
