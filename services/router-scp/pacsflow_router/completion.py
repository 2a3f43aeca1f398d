"""Study completion: find quiet studies, claim each completion once, publish ``study-complete``.

Any router process may sweep; the claim in the store decides who publishes (one wins). The
order is claim (with the event and its id), publish, mark published. A crash between claim
and mark leaves a claim that the next sweep of any process publishes again after
``claim_timeout`` with the same event id, so consumers can drop the repeat by id.

Counts come from the files on disk, not from what the receivers reported: instances
reported in the last flush before a crash, and instances received twice, would make the
reported count wrong; the folder is right (one file per SOP Instance UID).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from pacsflow.bus import EventBus
from pacsflow.errors import BusError, EventError, StoreError
from pacsflow.events import Source, StudyComplete, StudyCompletePayload, decode_event, encode_event
from pacsflow.store import Row

from pacsflow_router.metrics import RouterMetrics
from pacsflow_router.studies import Claim, StudyStore

__all__ = ["Completer", "count_files", "remove_stale_temporaries"]

log = logging.getLogger(__name__)


def count_files(folders: Iterable[str]) -> int:
    """Instances on disk in these series folders (temporary files are not counted)."""
    total = 0
    for folder in folders:
        try:
            with os.scandir(folder) as entries:
                total += sum(
                    1
                    for entry in entries
                    if entry.name.endswith(".dcm")
                    and not entry.name.startswith(".")
                    and entry.is_file(follow_symlinks=False)
                )
        except FileNotFoundError:
            continue  # removed by an operator: what is left is what counts
    return total


def remove_stale_temporaries(folders: Iterable[str], older_than: float) -> int:
    """Remove temporary files (``.<name>.part``) last written before ``older_than`` from
    these series folders; how many. A write in progress renews its file's time; one left
    behind by a killed process never completes."""
    removed = 0
    for folder in folders:
        try:
            with os.scandir(folder) as entries:
                stale = [
                    entry.path
                    for entry in entries
                    if entry.name.startswith(".") and entry.name.endswith(".part")
                    and entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < older_than
                ]  # fmt: skip
        except FileNotFoundError:
            continue
        for path in stale:
            try:
                os.unlink(path)
                removed += 1
            except FileNotFoundError:
                continue
    return removed


def _time(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class Completer:
    """Runs completion sweeps against the study table and the bus."""

    def __init__(
        self,
        store: StudyStore,
        bus: EventBus,
        source: Source,
        metrics: RouterMetrics,
        *,
        quiet_seconds: float,
        claim_timeout: float,
        owner: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.bus = bus
        self.source = source
        self.metrics = metrics
        self.quiet_seconds = quiet_seconds
        self.claim_timeout = claim_timeout
        self.owner = owner
        self.clock = clock
        # Claims this process won but could not publish yet (bus down): retried each sweep.
        self._unpublished: dict[str, StudyComplete] = {}

    async def sweep(self) -> int:
        """One pass: retry, take over stale claims, complete quiet studies; events published."""
        published = 0
        published += await self._retry_own()
        published += await self._take_over_stale()
        now = self.clock()
        for row in await self.store.quiet(now - self.quiet_seconds):
            if await self._complete(row):
                published += 1
        self.metrics.studies_open.set(await self.store.open_count())
        return published

    async def _complete(self, row: Row) -> bool:
        folders = await self.store.series_folders(row["route"], row["study_uid"])
        if folders:
            # The study has been quiet this long: a temporary file as old is a write that a
            # crash interrupted (the instance was never acknowledged).
            removed = await asyncio.to_thread(
                remove_stale_temporaries, folders, self.clock() - self.quiet_seconds
            )
            if removed:
                log.warning(
                    "study %s on route %s: removed %d temporary file(s) of writes interrupted"
                    " by a crash", row["study_uid"], row["route"], removed,
                )  # fmt: skip
        files = await asyncio.to_thread(count_files, folders) if folders else 0
        if files == 0:
            # Nothing on disk (folders removed): report what the receivers saw.
            files = int(row["instances"])
        completion = int(row["completion"]) + 1
        files_new = files - int(row["notified_files"])
        now = self.clock()
        if completion > 1 and files_new <= 0:
            # Re-opened by instances that were already there (re-sent): nothing new to tell.
            if await self.store.settle_without_event(row, files, now):
                log.info(
                    "study %s on route %s re-opened by instances it already had: no notification",
                    row["study_uid"], row["route"],
                )  # fmt: skip
            return False
        event = StudyComplete(
            id=uuid.uuid4(),
            source=self.source,
            correlation_id=row["study_uid"],
            payload=StudyCompletePayload(
                route=row["route"],
                study_instance_uid=row["study_uid"],
                patient_id=row["patient_id"],
                study_description=row["study_description"],
                files_received=files,
                files_new=files_new if completion > 1 else files,
                completion=completion,
                storage_path=row["storage_path"],
                first_received=_time(row["first_received"]),
                last_received=_time(row["last_received"]),
            ),
        )
        claim_id = str(event.id)
        won = await self.store.claim(
            row,
            claim_id=claim_id,
            claim_event=encode_event(event).decode(),
            owner=self.owner,
            now=now,
        )
        if not won:
            return False  # another process claimed it, or an instance arrived meanwhile
        return await self._publish(event)

    async def _publish(self, event: StudyComplete) -> bool:
        claim_id = str(event.id)
        payload = event.payload
        try:
            await self.bus.publish(event)
        except BusError as err:
            log.error(
                "study-complete for %s on route %s not published yet: %s",
                payload.study_instance_uid, payload.route, err,
                extra={"event_id": claim_id},
            )  # fmt: skip
            self._unpublished[claim_id] = event
            return False
        self._unpublished.pop(claim_id, None)
        try:
            await self.store.published(claim_id, payload.files_received, self.clock())
        except StoreError as err:
            # Published but not marked: after claim_timeout it is published again, same id.
            log.error("could not mark study-complete %s published: %s", claim_id, err)
        kind = "first" if payload.completion == 1 else "reopened"
        self.metrics.studies_completed.labels(payload.route, kind).inc()
        log.info(
            "study complete: %s on route %s, %d files%s",
            payload.study_instance_uid, payload.route, payload.files_received,
            f" ({payload.files_new} more, notification {payload.completion})"
            if payload.completion > 1 else "",
            extra={"event_id": claim_id, "correlation_id": event.correlation_id},
        )  # fmt: skip
        return True

    async def _retry_own(self) -> int:
        published = 0
        for event in list(self._unpublished.values()):
            if await self._publish(event):
                published += 1
        return published

    async def _take_over_stale(self) -> int:
        published = 0
        now = self.clock()
        for claim in await self.store.stale_claims(now - self.claim_timeout):
            if claim.claim_id in self._unpublished:
                continue  # ours, retried above
            if not await self.store.retake(claim, self.owner, now):
                continue
            event = self._event_of(claim)
            if event is None:
                continue
            log.warning(
                "publishing study-complete %s again: its claim was never confirmed",
                claim.claim_id, extra={"event_id": claim.claim_id},
            )  # fmt: skip
            if await self._publish(event):
                published += 1
        return published

    def _event_of(self, claim: Claim) -> StudyComplete | None:
        try:
            event = decode_event(claim.claim_event)
        except EventError as err:
            log.error("claim %s holds no usable event: %s", claim.claim_id, err)
            return None
        if not isinstance(event, StudyComplete):
            log.error("claim %s holds a %s event", claim.claim_id, event.type)
            return None
        return event
