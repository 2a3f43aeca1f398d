"""One sync cycle: compare the remote and the local PACS, request the missing series, wait for
their moves, report.

1. C-FIND the studies of the date range on the remote PACS and keep those in the time window;
   C-FIND the same range on the local PACS (the time just before is when "local" was known).
2. A study the local PACS lacks is missing; with ``include_incomplete``, one it has with fewer
   instances is incomplete.
3. Per study, C-FIND the remote's series with their image counts and choose series by the
   selection mode; of an incomplete study, the chosen series the local PACS lacks or has fewer
   instances of.
4. Each chosen series is requested in the state store (see :meth:`Transfers.request`: a
   series already requested or moving is left alone, a failed one waits for its backoff) and
   announced with a ``series-missing`` event.
5. The cycle waits until the series it requested are moved or failed (at most
   ``cycle_timeout_seconds``), then records and logs its statistics.

A cycle that cannot reach either PACS ends with an error naming it; nothing is requested
from a comparison it could not make.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from pacsflow.bus import EventBus
from pacsflow.config import SyncSettings
from pacsflow.errors import BusError, PacsflowError
from pacsflow.events import SeriesMissing, SeriesMissingPayload, Source

from pacsflow_sync.metrics import SyncMetrics
from pacsflow_sync.mover import MoverPool, correlation
from pacsflow_sync.pacs import Pacs, StudyInfo
from pacsflow_sync.report import CycleReport
from pacsflow_sync.runs import Runs
from pacsflow_sync.selection import SeriesInfo, choose_series
from pacsflow_sync.transfers import SeriesRequest, Transfer, Transfers
from pacsflow_sync.window import SearchWindow

__all__ = ["Cycle", "series_missing_event"]

log = logging.getLogger(__name__)

# Requests older than this whose series-missing was never published are published again
# (their cycle died between the commit and the publish).
_ANNOUNCE_GRACE = 30.0


def series_missing_event(transfer: Transfer, source: Source) -> SeriesMissing:
    """The ``series-missing`` event of one requested transfer."""
    return SeriesMissing(
        source=source,
        correlation_id=correlation(transfer.run_id),
        payload=SeriesMissingPayload(
            requested_by="sync",
            source_ae=transfer.source_ae,
            destination_ae=transfer.destination_ae,
            study_instance_uid=transfer.study_instance_uid,
            series_instance_uid=transfer.series_instance_uid,
            expected_images=transfer.expected_images,
            reason=transfer.reason,
        ),
    )


class Cycle:
    """Runs sync cycles between one remote and one local PACS."""

    def __init__(
        self,
        settings: SyncSettings,
        *,
        remote: Pacs,
        local: Pacs,
        destination_ae: str,
        transfers: Transfers,
        runs: Runs,
        bus: EventBus,
        movers: MoverPool,
        metrics: SyncMetrics,
        source: Source,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._remote = remote
        self._local = local
        self._destination_ae = destination_ae
        self._transfers = transfers
        self._runs = runs
        self._bus = bus
        self._movers = movers
        self._metrics = metrics
        self._source = source
        self._clock = clock

    async def run(self, *, drive: bool = False, retry_failed: bool = False) -> CycleReport:
        """One cycle; its report (also logged, recorded and counted).

        ``drive``: this call moves the cycle's series itself (``--once``) instead of leaving
        them to the running movers. ``retry_failed``: failed series are requested again now,
        whatever their backoff.
        """
        report = CycleReport(
            source=str(self._remote.node),
            destination_ae=self._destination_ae,
            started_at=self._clock(),
        )
        try:
            report.run_id = await self._runs.start(self._source.instance, report)
            requested = await self._compare_and_request(report, retry_failed)
            if requested:
                if drive:
                    await self._movers.drain(report.run_id)
                else:
                    self._movers.wake()
                await self._wait(report)
        except PacsflowError as err:
            report.error = str(err)
        report.finished_at = self._clock()
        await self._record(report)
        return report

    async def _compare_and_request(self, report: CycleReport, retry_failed: bool) -> int:
        settings = self._settings
        await self._announce_leftovers()
        window = SearchWindow.at(
            self._clock(),
            date_range_days=settings.date_range_days,
            window_hours=settings.window_hours,
            zone=settings.timezone,
            untimed=settings.untimed_studies,
        )
        report.date_range = window.study_date_range
        if window.start is not None:
            report.window = f"since {window.start:%Y-%m-%d %H:%M}"
        found = await asyncio.to_thread(self._remote.studies, window.study_date_range)
        remote = [s for s in found if window.contains(s.study_date, s.study_time)]
        local_checked_at = self._clock()
        local = {
            study.study_instance_uid: study
            for study in await asyncio.to_thread(self._local.studies, window.study_date_range)
        }
        report.remote_studies, report.local_studies = len(remote), len(local)

        wanted: list[tuple[SeriesInfo, str]] = []
        for study in remote:
            here = local.get(study.study_instance_uid)
            if here is None:
                report.missing_studies += 1
                wanted += [(s, "missing-study") for s in await self._choose(study)]
            elif settings.include_incomplete and _maybe_incomplete(study, here):
                lacking = await self._lacking(study)
                if lacking:
                    report.incomplete_studies += 1
                    wanted += [(s, "incomplete-series") for s in lacking]
        report.series_chosen = len(wanted)

        now = self._clock()
        requested: list[Transfer] = []
        for series, reason in wanted:
            decision, transfer = await self._transfers.request(
                SeriesRequest(
                    self._remote.node.ae_title,
                    self._destination_ae,
                    series.study_instance_uid,
                    series.series_instance_uid,
                    series.images,
                    reason,
                ),
                run_id=report.run_id,
                now=now,
                local_checked_at=local_checked_at,
                stale_before=now - settings.claim_timeout_seconds,
                retry_failed=retry_failed,
            )
            if decision == "requested":
                requested.append(transfer)
                report.images += series.images
            elif decision == "waiting":
                report.series_waiting += 1
            else:
                report.series_in_progress += 1
        report.series_requested = len(requested)
        await self._announce(requested)
        return len(requested)

    async def _choose(self, study: StudyInfo) -> list[SeriesInfo]:
        series = await asyncio.to_thread(self._remote.series, study.study_instance_uid)
        return choose_series(series, self._settings.selection, self._settings.max_images)

    async def _lacking(self, study: StudyInfo) -> list[SeriesInfo]:
        """The chosen series of a study that the local PACS lacks or has fewer images of."""
        chosen = await self._choose(study)
        if not chosen:
            return []
        local = {
            s.series_instance_uid: s.images
            for s in await asyncio.to_thread(self._local.series, study.study_instance_uid)
        }
        return [s for s in chosen if local.get(s.series_instance_uid, 0) < s.images]

    async def _announce(self, transfers: Sequence[Transfer]) -> None:
        if not transfers:
            return
        try:
            await self._bus.publish(*(series_missing_event(t, self._source) for t in transfers))
        except BusError as err:
            # The requests are committed and movers find them in the store; the events
            # follow once the bus is back (_announce_leftovers).
            log.error("publishing %d series-missing event(s) failed: %s", len(transfers), err)
            return
        await self._transfers.mark_announced(transfers, self._clock())

    async def _announce_leftovers(self) -> None:
        leftovers = await self._transfers.unannounced(self._clock() - _ANNOUNCE_GRACE)
        if leftovers:
            log.info("publishing %d series-missing event(s) left from before", len(leftovers))
            await self._announce(leftovers)

    async def _wait(self, report: CycleReport) -> None:
        """Until the cycle's series are moved or failed, or the cycle's time is up."""
        assert report.run_id is not None
        deadline = self._clock() + self._settings.cycle_timeout_seconds
        # Movers of this process notify; those of other processes are seen by polling.
        poll = min(self._settings.poll_seconds, 1.0)
        while True:
            now = self._clock()
            stale_before = now - self._settings.claim_timeout_seconds
            totals = await self._transfers.run_totals(report.run_id, stale_before)
            if totals.pending == 0 or now >= deadline:
                break
            async with self._movers.finished:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(poll):
                        await self._movers.finished.wait()
        report.series_pending = totals.pending + totals.stale
        report.series_moved, report.series_failed = totals.moved, totals.failed
        report.images_transferred = totals.completed + totals.warning
        report.images_failed = totals.failed_images
        report.failures = [
            f"series {item.series_instance_uid} (study {item.study_instance_uid}): "
            f"{item.last_error}"
            for item in await self._transfers.failed_in_run(report.run_id)
        ]

    async def _record(self, report: CycleReport) -> None:
        self._metrics.cycle_done(report)
        level = logging.INFO if report.ok else logging.ERROR
        summary = (
            f"sync cycle {report.status}: {report.remote_studies} remote, "
            f"{report.local_studies} local, {report.missing_studies} missing studies; "
            f"{report.series_chosen} series chosen, {report.series_requested} requested, "
            f"{report.images_transferred}/{report.images} images in {report.duration:.1f} s "
            f"({report.images_per_minute:.1f} per minute)"
        )
        if report.error:
            summary += f"; error: {report.error}"
        log.log(level, summary, extra=report.fields())
        try:
            await self._runs.finish(report)
        except PacsflowError as err:
            log.error("recording sync run %s failed: %s", report.run_id, err)


def _maybe_incomplete(remote: StudyInfo, local: StudyInfo) -> bool:
    # Without counts on both sides only a series-level comparison can tell.
    if remote.instances is None or local.instances is None:
        return True
    return local.instances < remote.instances
