"""Retrieving one series completely, and proving it.

One attempt at a series:

1. what is already at the destination is read from disk (:mod:`.layout`);
2. nothing there yet: one SERIES-level C-MOVE (or C-GET) asks for all of it;
3. an IMAGE-level C-FIND of the series at the PACS lists the SOP Instance UIDs it holds
   (during step 2, on a second association, unless ``list_while_retrieving`` is off), and
   the list is compared with what arrived;
4. what is missing is requested at IMAGE level, exactly those UIDs (``refetch_batch`` at a
   time), up to ``refetch_rounds`` times; a series that already had instances on disk (an
   earlier attempt was cut off, or the PACS gained instances) gets one round more, since it
   skipped step 2. Nothing already there is asked for again.

The series is complete when every listed instance is on disk. The C-MOVE/C-GET final status
and sub-operation counts are kept with the outcome; a retrieve that reported success but
left instances missing (a silent partial retrieve) is counted as such. Anything else ends
the attempt with :class:`Incomplete` (instances still missing) or the DICOM error that broke
it; the caller decides on retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pacsflow.dicom import MoveResult, ReceivedInstance
from pacsflow.errors import PacsflowError

from pacsflow_harvester.layout import Present, Storage, file_key
from pacsflow_harvester.metrics import HarvesterMetrics
from pacsflow_harvester.pacs import Pacs
from pacsflow_harvester.state import SeriesJob, SeriesOutcome

__all__ = ["Incomplete", "Retriever", "SeriesResult"]

log = logging.getLogger(__name__)


class Incomplete(PacsflowError):
    """An attempt ended with instances still missing at the destination."""

    def __init__(self, message: str, outcome: SeriesOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True)
class SeriesResult:
    """A complete series: the outcome and the number of instances the PACS listed."""

    outcome: SeriesOutcome
    expected: int


class Retriever:
    """Retrieves series from the PACS into the storage tree and verifies them."""

    def __init__(
        self,
        pacs: Pacs,
        storage: Storage,
        metrics: HarvesterMetrics,
        *,
        method: Literal["move", "get"],
        destination_ae: str,
        refetch_rounds: int,
        refetch_batch: int,
        list_while_retrieving: bool = True,
        progress: Callable[[SeriesJob, Present], Any] | None = None,
    ) -> None:
        self.pacs = pacs
        self.storage = storage
        self.metrics = metrics
        self.method = method
        self.destination_ae = destination_ae
        self.refetch_rounds = refetch_rounds
        self.refetch_batch = refetch_batch
        self.list_while_retrieving = list_while_retrieving
        self.progress = progress

    async def _listed(self, job: SeriesJob) -> dict[str, str]:
        answers = await self.pacs.find(
            "IMAGE",
            {
                "StudyInstanceUID": job.study_uid,
                "SeriesInstanceUID": job.series_uid,
                "SOPInstanceUID": None,
            },
            patient_id=job.patient_id,
        )
        listed: dict[str, str] = {}
        for answer in answers:
            uid = str(answer.get("SOPInstanceUID", "") or "").strip(" \x00")
            if uid:
                listed[file_key(uid)] = uid
        return listed

    async def _present(self, job: SeriesJob, *, everywhere: bool) -> Present:
        return await asyncio.to_thread(
            self.storage.present, job.patient_id, job.series_uid, everywhere=everywhere
        )

    async def _retrieve(self, job: SeriesJob, uids: Sequence[str] | None) -> MoveResult:
        query: dict[str, Any] = {
            "StudyInstanceUID": job.study_uid,
            "SeriesInstanceUID": job.series_uid,
        }
        level = "SERIES"
        if uids is not None:
            level = "IMAGE"
            query["SOPInstanceUID"] = list(uids)
        if self.method == "move":
            return await self.pacs.move(
                self.destination_ae, level, query, patient_id=job.patient_id
            )
        return await self.pacs.get(level, query, self._file_arrival, patient_id=job.patient_id)

    def _file_arrival(self, instance: ReceivedInstance) -> int:
        # Runs in the C-GET association's thread; what arrived is counted from disk after.
        return self.storage.write(instance)[0]

    def _check(
        self, job: SeriesJob, result: MoveResult | None, wanted: set[str], present: Present
    ) -> None:
        """Count a retrieve that reported success yet left instances missing."""
        still = wanted - present.keys()
        if still and result is not None and result.ok:
            self.metrics.silent_losses.inc()
            log.warning(
                "series %s: the %s reported success (%d completed) but %d of %d "
                "instances are not at the destination",
                job.series_uid, "C-MOVE" if self.method == "move" else "C-GET",
                result.completed, len(still), len(wanted),
            )  # fmt: skip

    async def run(self, job: SeriesJob) -> SeriesResult:
        """One attempt; raises :class:`Incomplete` or a DICOM error when not complete."""
        started = time.monotonic()
        present = await self._present(job, everywhere=False)
        last: MoveResult | None = None
        listing: asyncio.Task[dict[str, str]] | None = None
        if not present.files:
            # Nothing of the series here yet: ask for all of it. Its instance list is only
            # needed to check what arrived, so it is asked for meanwhile, on a second
            # association, when allowed: the check then costs no time of its own.
            if self.list_while_retrieving:
                listing = asyncio.create_task(self._listed(job))
            try:
                last = await self._retrieve(job, None)
            except BaseException:
                if listing is not None:
                    listing.cancel()
                    await asyncio.gather(listing, return_exceptions=True)
                raise
            present = await self._present(job, everywhere=bool(last.completed))
        listed = await listing if listing is not None else await self._listed(job)
        if not listed:
            raise Incomplete(
                "the PACS lists no instances in this series",
                SeriesOutcome(0, 0, 0, None, None, None, None, 0.0),
            )
        if job.expected_instances is not None and job.expected_instances != len(listed):
            log.info(
                "series %s: the series query counted %d instances, the image query lists %d",
                job.series_uid, job.expected_instances, len(listed),
            )  # fmt: skip
        wanted = set(listed)
        arrived_before = set() if last is not None else present.keys() & wanted
        refetched = 0
        if last is not None:
            self._check(job, last, wanted, present)
        rounds = self.refetch_rounds + (1 if last is None else 0)
        for _round in range(rounds):
            missing = sorted(wanted - present.keys())
            if not missing:
                break
            if last is not None and last.category in ("failure", "cancel") and not last.completed:
                # Refused outright (unknown destination, out of resources): asking again for
                # the same UIDs in this attempt would only be refused again.
                break
            uids = [listed[key] for key in missing]
            refetched += len(uids)
            self.metrics.refetched.inc(len(uids))
            log.info("series %s: requesting %d missing instance(s) again",
                     job.series_uid, len(uids))  # fmt: skip
            for start in range(0, len(uids), self.refetch_batch):
                last = await self._retrieve(job, uids[start : start + self.refetch_batch])
            # A PACS whose headers disagree with its C-FIND answers files elsewhere: look
            # everywhere once the retrieve says instances went out.
            present = await self._present(job, everywhere=bool(last and last.completed))
            self._check(job, last, wanted, present)
        if self.progress is not None:
            await self.progress(job, present)

        have = present.keys() & wanted
        new = have - arrived_before
        self.metrics.instances.labels(self.method).inc(len(new))
        self.metrics.bytes.labels(self.method).inc(present.bytes_of(new))
        outcome = SeriesOutcome(
            instances=len(have),
            bytes=present.bytes_of(have),
            refetched=refetched,
            move_status=None if last is None else last.status,
            move_completed=None if last is None else last.completed,
            move_failed=None if last is None else last.failed,
            move_warning=None if last is None else last.warning,
            duration_seconds=time.monotonic() - started,
        )
        missing_count = len(wanted - have)
        if missing_count:
            status = "" if last is None else f", last status 0x{last.status:04X}"
            raise Incomplete(
                f"{missing_count} of {len(wanted)} instances missing after the retrieve and "
                f"{refetched} re-fetched{status}",
                outcome,
            )
        return SeriesResult(outcome, len(wanted))
