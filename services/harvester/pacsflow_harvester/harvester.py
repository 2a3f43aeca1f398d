"""The harvester: query stages, retrieval workers, the archiver and housekeeping, wired.

:class:`Harvester` takes its dependencies (settings, state store, bus, metrics registry, event
source) so tests run it on SQLite and the memory bus or on the real servers alike. Every loop
is driven from the state store, never by holding a bus message: a C-MOVE of a long series
may run for hours, past any broker's consumer timeout.

* one discovery loop (:mod:`.discovery`): patients, studies, series;
* ``workers`` retrieval loops (:mod:`.retrieve`): claim a series, retrieve and verify it,
  record the outcome; failures retry with backoff, up to ``max_attempts``;
* one archiver loop (:mod:`.archive`): a patient whose series are all complete gets its zip
  (again, when a series completes later) and a ``patient-complete`` event;
* housekeeping: renew leases, take back claims of harvesters that stopped, publish pending
  ``moved`` events, refresh the state gauges.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import zipfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Literal

from pacsflow.bus import EventBus
from pacsflow.config import Settings
from pacsflow.dicom import NetworkOptions
from pacsflow.errors import BusError, ConfigError, DicomError, StoreError
from pacsflow.events import (
    Moved,
    MovedPayload,
    PatientComplete,
    PatientCompletePayload,
    Source,
)
from pacsflow.routes import routes_from_settings
from pacsflow.store import Database
from prometheus_client import CollectorRegistry

from pacsflow_harvester.archive import build_archive
from pacsflow_harvester.criteria import Criteria
from pacsflow_harvester.discovery import Discovery, criteria_digest
from pacsflow_harvester.layout import Present, Storage
from pacsflow_harvester.metrics import HarvesterMetrics
from pacsflow_harvester.pacs import Pacs, classify, in_daemon_thread
from pacsflow_harvester.ratelimit import RateLimiter
from pacsflow_harvester.retrieve import Incomplete, Retriever
from pacsflow_harvester.state import (
    PATIENT_STATES,
    SERIES_STATES,
    STUDY_STATES,
    ArchiveJob,
    Claims,
    HarvestState,
    SeriesJob,
    owner_id,
)
from pacsflow_harvester.windows import Schedule

__all__ = ["Harvester", "storage_root"]

log = logging.getLogger(__name__)

# Names the ids of events about the same outcome, so a repeated publish repeats the id.
_EVENT_NAMESPACE = uuid.UUID("8d7c8f0e-5a7e-4c55-9d2c-3f0f6d2b9a41")


def storage_root(settings: Settings) -> Path:
    """Where instances land: ``harvester.storage_path`` or the path of the router's route."""
    harvester = settings.harvester
    if harvester.storage_path is not None:
        return harvester.storage_path
    title = (
        harvester.destination_ae or settings.router.ae_title
        if harvester.method == "move"
        else settings.router.ae_title
    )
    route = routes_from_settings(settings.router).get(title)
    if route is None:
        raise ConfigError(
            f"harvester.storage_path is not set and the router has no route {title!r} to "
            "take it from: set harvester.storage_path to where the destination files instances"
        )
    return route.path


class Harvester:
    """One harvester process: its loops over the shared state."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: Database,
        bus: EventBus,
        registry: CollectorRegistry,
        source: Source,
        clock: Callable[[], float] = time.time,
        schedule: Schedule | None = None,
    ) -> None:
        config = settings.harvester
        if config.source is None:
            raise ConfigError("harvester.source is not set: no PACS to harvest")
        self.settings = settings
        self.config = config
        self.node = settings.node(config.source)
        self.bus = bus
        self.source = source
        self.clock = clock
        self.metrics = HarvesterMetrics(registry)
        self.state = HarvestState(db, clock=clock)
        self.owner = owner_id(settings.instance)
        self.schedule = schedule or Schedule(
            config.pause_windows, config.work_windows, config.timezone
        )
        try:
            self.schedule.next_open()
        except ValueError as err:
            raise ConfigError(f"harvester.pause_windows / work_windows: {err}") from None
        self.criteria = Criteria.from_settings(config.criteria)
        self.destination_ae = config.destination_ae or settings.router.ae_title
        self.storage = Storage(storage_root(settings), fsync=settings.router.fsync)
        self.limiter = RateLimiter(
            db, config.requests_per_minute, margin_seconds=config.rate_margin_seconds
        )
        self.pacs = Pacs(
            self.node,
            NetworkOptions.from_settings(settings.dicom),
            limiter=self.limiter,
            schedule=self.schedule,
            metrics=self.metrics,
            model=config.query_model,
            engine=config.engine,
            retry_initial=config.retry_initial_seconds,
            retry_max=config.retry_max_seconds,
        )
        self.claims = Claims()
        self._series_ready = asyncio.Event()
        self._archive_due = asyncio.Event()
        self._events_due = asyncio.Event()
        self.discovery = Discovery(
            self.state,
            self.pacs,
            self.criteria,
            self.metrics,
            owner=self.owner,
            lease=config.lease_seconds,
            max_attempts=config.max_attempts,
            backoff=self.backoff,
            rescan_after=config.rescan_hours * 3600 if config.rescan_hours else None,
            claims=self.claims,
            series_added=self._series_ready.set,
        )
        self.retriever = Retriever(
            self.pacs,
            self.storage,
            self.metrics,
            method=config.method,
            destination_ae=self.destination_ae,
            refetch_rounds=config.refetch_rounds,
            refetch_batch=config.refetch_batch,
            list_while_retrieving=config.list_while_retrieving,
            progress=self._progress,
        )

    def backoff(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: doubling from retry_initial_seconds."""
        exponent = max(0, attempts - 1)
        return float(min(self.config.retry_max_seconds,
                         self.config.retry_initial_seconds * 2 ** min(exponent, 30)))  # fmt: skip

    # --- life cycle -------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Create the scan row (due again when the criteria changed), take back stale claims."""
        if await self.state.ensure_scan(criteria_digest(self.config.criteria)):
            log.info("the harvest criteria changed: the PACS is queried again")
        returned = await self.state.take_back(self.owner, self.config.max_attempts)
        if returned:
            log.info("took back claims of stopped harvesters: %s", returned)

    async def run(self) -> None:
        """Prepare, then run every loop until cancelled."""
        await self.prepare()
        log.info(
            "harvester: %s from %s %s %s, %d worker(s), %d requests/min, storage %s",
            "C-MOVE" if self.config.method == "move" else "C-GET",
            self.node,
            "to" if self.config.method == "move" else "into",
            self.destination_ae if self.config.method == "move" else "this process",
            self.config.workers,
            self.config.requests_per_minute,
            self.storage.root,
        )  # fmt: skip
        async with asyncio.TaskGroup() as group:
            group.create_task(self._forever("discovery", self._discover), name="harvest-discovery")
            for index in range(self.config.workers):
                group.create_task(
                    self._forever("worker", self._work), name=f"harvest-worker-{index}"
                )
            group.create_task(self._forever("archiver", self._archive), name="harvest-archiver")
            group.create_task(self._forever("housekeeping", self._housekeep),
                              name="harvest-housekeeping")  # fmt: skip

    async def _forever(self, name: str, step: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # A loop survives the state store or the bus going away for a while; what it had
        # claimed comes back through the leases.
        while True:
            try:
                await step()
            except (StoreError, BusError) as err:
                log.warning("harvest %s: %s; trying again in %.0f s",
                            name, err, self.config.poll_seconds)  # fmt: skip
                await asyncio.sleep(self.config.poll_seconds)

    async def _wait(self, event: asyncio.Event) -> None:
        try:
            async with asyncio.timeout(self.config.poll_seconds):
                await event.wait()
        except TimeoutError:
            pass
        event.clear()

    # --- discovery --------------------------------------------------------------------------

    async def _discover(self) -> None:
        if not await self.discovery.step():
            await asyncio.sleep(self.config.poll_seconds)

    # --- retrieval --------------------------------------------------------------------------

    async def _progress(self, job: SeriesJob, present: Present) -> None:
        await self.state.series_progress(
            job.series_uid, self.owner, len(present.files), present.bytes_of(present.files)
        )

    async def _work(self) -> None:
        job = await self.state.claim_series(self.owner, self.config.lease_seconds)
        if job is None:
            await self._wait(self._series_ready)
            return
        # Another worker may find work too (there was some).
        self._series_ready.set()
        self.claims.add("series", job.series_uid)
        try:
            await self._retrieve(job)
        finally:
            self.claims.discard("series", job.series_uid)

    async def _retrieve(self, job: SeriesJob) -> None:
        attempts = job.attempts
        try:
            result = await self.retriever.run(job)
        except asyncio.CancelledError:
            await asyncio.shield(
                self.state.fail_series(
                    job.series_uid, self.owner, "interrupted: the harvester stopped",
                    delay=0.0, max_attempts=self.config.max_attempts, refund=True,
                )
            )  # fmt: skip
            raise
        except Incomplete as err:
            await self._attempt_failed(job, "incomplete", str(err), err.outcome)
            return
        except DicomError as err:
            await self._attempt_failed(job, classify(err), str(err), None)
            return
        except StoreError:
            raise
        except Exception as err:
            log.exception("series %s: retrieve failed unexpectedly", job.series_uid)
            await self._attempt_failed(job, "error", f"{type(err).__name__}: {err}", None)
            return
        if await self.state.complete_series(
            job.series_uid, self.owner, result.outcome, expected=result.expected
        ):
            self.metrics.series_completed.inc()
            log.info(
                "series %s complete: %d instance(s), %.1f MB in %.1f s (attempt %d)",
                job.series_uid, result.outcome.instances, result.outcome.bytes / 1e6,
                result.outcome.duration_seconds, attempts,
            )  # fmt: skip
            self._archive_due.set()
            self._events_due.set()
        else:
            log.warning("series %s: completed, but its claim had been taken back", job.series_uid)

    async def _attempt_failed(self, job: SeriesJob, reason: str, error: str, outcome: Any) -> None:
        refund = reason == "unreachable"
        delay = 0.0 if refund else self.backoff(job.attempts)
        status = await self.state.fail_series(
            job.series_uid, self.owner, error, delay=delay,
            max_attempts=self.config.max_attempts, outcome=outcome, refund=refund,
        )  # fmt: skip
        if status == "failed":
            self.metrics.failed.labels("series").inc()
            self._events_due.set()
            log.error("series %s failed after %d attempts: %s",
                      job.series_uid, job.attempts, error)  # fmt: skip
        elif status is not None:
            self.metrics.retries.labels("series", reason).inc()
            log.warning("series %s: attempt %d did not complete (%s), next in %.0f s: %s",
                        job.series_uid, job.attempts, reason, delay, error)  # fmt: skip

    # --- archives ---------------------------------------------------------------------------

    async def _archive(self) -> None:
        job = await self.state.claim_archive(self.owner, self.config.lease_seconds)
        if job is None:
            await self._wait(self._archive_due)
            return
        self._archive_due.set()  # there may be more
        self.claims.add("archives", job.patient_id)
        try:
            await self._archive_patient(job)
        except asyncio.CancelledError:
            await asyncio.shield(self.state.release_archive(self.owner, job.patient_id))
            raise
        except OSError as err:
            log.error("archive of a patient could not be written: %s", err)
            await self.state.release_archive(self.owner, job.patient_id)
            await asyncio.sleep(self.config.poll_seconds)
        finally:
            self.claims.discard("archives", job.patient_id)

    async def _archive_patient(self, job: ArchiveJob) -> None:
        if job.archive_version < job.version:
            series = await self.state.complete_series_of(job.patient_id)
            if self.config.archive:
                compression = (
                    zipfile.ZIP_DEFLATED
                    if self.config.archive_compression == "deflated"
                    else zipfile.ZIP_STORED
                )
                result = await in_daemon_thread(
                    lambda: build_archive(
                        self.storage, self.config.archive_folder, job.patient_id, series,
                        compression=compression,
                    )
                )  # fmt: skip
                if result.incomplete:
                    log.warning(
                        "%d complete series of a patient lack files at the destination; "
                        "fetching what is missing again", len(result.incomplete),
                    )  # fmt: skip
                    await self.state.reopen_series(result.incomplete, "files missing at archiving")
                    await self.state.release_archive(self.owner, job.patient_id)
                    self._series_ready.set()
                    return
                path, instances, nbytes = str(result.path), result.instances, result.bytes
                self.metrics.archives.labels("rebuild" if job.archive_version else "first").inc()
                log.info("archive written: %s (%d series, %d instances)",
                         path, len(series), instances)  # fmt: skip
            else:
                path, instances = "", sum(item.instances for item in series)
                nbytes = 0
            await self.state.archive_built(self.owner, job, path, len(series), instances, nbytes)
            job = ArchiveJob(
                job.patient_id, job.version, job.version, job.published_version, path,
                len(series), instances,
            )  # fmt: skip
        event = PatientComplete(
            id=uuid.uuid5(_EVENT_NAMESPACE, f"patient-complete:{job.patient_id}:{job.version}"),
            source=self.source,
            correlation_id=f"harvest:{self.node.ae_title}",
            payload=PatientCompletePayload(
                patient_id=job.patient_id,
                series_count=job.archive_series or 0,
                instances=job.archive_instances or 0,
                archive_path=job.archive_path or "",
            ),
        )
        await self.bus.publish(event)
        await self.state.archive_published(self.owner, job.patient_id, job.archive_version)

    # --- housekeeping -----------------------------------------------------------------------

    async def _housekeep(self) -> None:
        await self.state.renew(self.owner, self.config.lease_seconds, self.claims)
        returned = await self.state.take_back(self.owner, self.config.max_attempts)
        if returned:
            log.info("took back claims of stopped harvesters: %s", returned)
            self._series_ready.set()
        await self.publish_moved()
        await self.refresh_gauges()
        # Leases are renewed well before they run out; events go out soon after they are due.
        interval = min(self.config.lease_seconds / 3, self.config.poll_seconds)
        try:
            async with asyncio.timeout(interval):
                await self._events_due.wait()
        except TimeoutError:
            pass
        self._events_due.clear()

    async def publish_moved(self) -> int:
        """Publish the ``moved`` events of series outcomes not yet announced."""
        rows = await self.state.pending_moved()
        if not rows:
            return 0
        events = []
        for row in rows:
            complete = row["status"] == "complete"
            status: Literal["success", "partial", "failed"] = (
                "success" if complete else ("partial" if row["instances"] else "failed")
            )
            events.append(
                Moved(
                    id=uuid.uuid5(
                        _EVENT_NAMESPACE, f"moved:{row['series_uid']}:{row['modified_at']!r}"
                    ),
                    source=self.source,
                    correlation_id=f"harvest:{self.node.ae_title}",
                    payload=MovedPayload(
                        requested_by="harvester",
                        source_ae=self.node.ae_title,
                        destination_ae=(
                            self.destination_ae
                            if self.config.method == "move"
                            else self.settings.dicom.ae_title
                        ),
                        study_instance_uid=row["study_uid"],
                        series_instance_uid=row["series_uid"],
                        # A complete series: the instances at the destination (its last
                        # retrieve may have been a re-fetch of a few).
                        completed=row["instances"]
                        if complete or row["move_completed"] is None
                        else row["move_completed"],
                        failed=row["move_failed"] or 0,
                        warning=row["move_warning"] or 0,
                        duration_seconds=row["duration_seconds"] or 0.0,
                        status=status,
                        error=None if complete else row["last_error"],
                    ),
                )
            )
        await self.bus.publish(*events)
        await self.state.moved_published((row["series_uid"], row["modified_at"]) for row in rows)
        return len(events)

    async def refresh_gauges(self) -> None:
        """The by-state gauges, from the state store (every process's work)."""
        counts = await self.state.counts()
        self.metrics.set_states(self.metrics.patients, counts["patients"], PATIENT_STATES)
        self.metrics.set_states(self.metrics.studies, counts["studies"], STUDY_STATES)
        self.metrics.set_states(self.metrics.series, counts["series"], SERIES_STATES)
        self.metrics.refresh_last_minute()
