"""The mover: claims requested series in the state store, C-MOVEs them, publishes ``moved``.

Moves are driven from the store, not held inside an event handler. A ``series-missing``
event only makes sure its series is recorded as requested and wakes the movers; it is
acknowledged once that row is committed. A C-MOVE of a large series can run longer than the
bus lets a handler hold a message (its handler limit, and RabbitMQ's 30-minute consumer
timeout), and a process that dies mid-move must not lose the request: so each mover claims
a row (``requested`` -> ``moving``), renews the claim while the C-MOVE runs in a thread,
records the outcome and only then publishes ``moved``. A claim that stops being renewed
(the process died) is requested again by the next cycle, and the local PACS is asked before
moving again whether the series arrived after all.

Each process runs ``movers`` C-MOVEs at once; every process's movers share the one table, so
two sync processes never move the same request twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from pacsflow.bus import EventBus
from pacsflow.dicom import MoveResult, describe
from pacsflow.errors import DicomError, PacsflowError
from pacsflow.events import Moved, MovedPayload, Source

from pacsflow_sync.metrics import SyncMetrics
from pacsflow_sync.pacs import Pacs
from pacsflow_sync.transfers import Transfer, Transfers

__all__ = ["MoveOutcome", "MoverPool", "moved_event", "moved_status"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoveOutcome:
    """What one C-MOVE achieved, as the transfer row records it."""

    moved: bool
    completed: int = 0
    failed: int = 0
    warning: int = 0
    dimse_status: int | None = None
    error: str | None = None

    @classmethod
    def from_result(cls, result: MoveResult) -> MoveOutcome:
        """Success only when the remote answered success (or warning), no sub-operation
        failed and at least one image arrived."""
        error: str | None = None
        if result.category not in ("success", "warning") or result.failed:
            error = (
                f"C-MOVE ended with {describe(result.status)}: {result.completed} completed,"
                f" {result.failed} failed, {result.warning} warning"
            )
        elif result.completed + result.warning == 0:
            error = "the remote PACS moved no image of the series"
        return cls(
            error is None, result.completed, result.failed, result.warning, result.status, error
        )


def moved_status(transfer: Transfer) -> Literal["success", "partial", "failed"]:
    """The ``moved`` event's status for a finished transfer: success, partial or failed."""
    if transfer.status == "moved":
        return "success"
    return "partial" if transfer.completed + transfer.warning > 0 else "failed"


def correlation(run_id: int | None) -> str | None:
    """The correlation id of a cycle's events."""
    return None if run_id is None else f"sync-run-{run_id}"


def moved_event(transfer: Transfer, source: Source) -> Moved:
    """The ``moved`` event of a finished transfer."""
    started = transfer.started_at or transfer.finished_at or 0.0
    return Moved(
        source=source,
        correlation_id=correlation(transfer.run_id),
        payload=MovedPayload(
            requested_by="sync",
            source_ae=transfer.source_ae,
            destination_ae=transfer.destination_ae,
            study_instance_uid=transfer.study_instance_uid,
            series_instance_uid=transfer.series_instance_uid,
            completed=transfer.completed,
            failed=transfer.failed,
            warning=transfer.warning,
            duration_seconds=max((transfer.finished_at or started) - started, 0.0),
            status=moved_status(transfer),
            error=transfer.last_error if transfer.status == "failed" else None,
        ),
    )


class MoverPool:
    """``workers`` movers of one process, and the re-publishing of unreported outcomes."""

    def __init__(
        self,
        transfers: Transfers,
        bus: EventBus,
        *,
        remotes: Mapping[str, Pacs],
        locals_: Mapping[str, Pacs],
        source: Source,
        metrics: SyncMetrics,
        owner: str,
        workers: int = 2,
        retry_initial: float = 60.0,
        retry_max: float = 3600.0,
        claim_timeout: float = 300.0,
        poll: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._transfers = transfers
        self._bus = bus
        #: source AE title -> the PACS to C-MOVE from; destination AE -> the PACS to verify on
        self._remotes = dict(remotes)
        self._locals = dict(locals_)
        self._source = source
        self._metrics = metrics
        self.owner = owner
        self._workers = workers
        self._retry = (retry_initial, retry_max)
        self._claim_timeout = claim_timeout
        self._poll = poll
        self._clock = clock
        self._wakeup = asyncio.Event()
        #: notified after each recorded outcome (cycles waiting for their run)
        self.finished = asyncio.Condition()

    def wake(self) -> None:
        """Look for requested series now (an event or a cycle asked for some)."""
        self._wakeup.set()

    async def run(self) -> None:
        """Move requested series until cancelled."""
        async with asyncio.TaskGroup() as group:
            for number in range(self._workers):
                group.create_task(self._work(), name=f"sync-mover-{number}")
            group.create_task(self._maintain(), name="sync-mover-reports")

    async def drain(self, run_id: int) -> None:
        """Move the series one cycle requested, until none of them is left waiting."""

        async def work() -> None:
            while (transfer := await self._transfers.claim_next(
                    self.owner, self._clock(), run_id=run_id)) is not None:  # fmt: skip
                await self.move(transfer)

        await asyncio.gather(*(work() for _ in range(self._workers)))

    async def _work(self) -> None:
        while True:
            try:
                transfer = await self._transfers.claim_next(self.owner, self._clock())
                if transfer is not None:
                    await self.move(transfer)
                    continue
            except PacsflowError as err:
                # The store or the bus is away (a restart): the next round tries again.
                log.error("sync mover: %s", err)
            await self._idle()

    async def _idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._poll):
                await self._wakeup.wait()
        self._wakeup.clear()

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            try:
                await self.report_pending()
            except PacsflowError as err:
                log.error("sync mover: re-publishing moved events failed: %s", err)

    async def report_pending(self) -> int:
        """Publish ``moved`` for outcomes recorded but never announced (a crash in between)."""
        # Outcomes younger than this may be in the middle of being published by their mover.
        grace = max(2 * self._poll, 10.0)
        pending = await self._transfers.unreported(self._clock() - grace)
        for transfer in pending:
            await self._bus.publish(moved_event(transfer, self._source))
            await self._transfers.mark_reported(transfer, self._clock())
        if pending:
            log.info("published %d moved event(s) left from before", len(pending))
        return len(pending)

    async def move(self, transfer: Transfer) -> Transfer | None:
        """Move one claimed series, record the outcome, publish ``moved``; the finished row
        (None when the claim was lost meanwhile)."""
        renewing = asyncio.create_task(self._renew(transfer), name="sync-claim-renewal")
        try:
            outcome = await self._outcome(transfer)
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
        finished = await self._transfers.finish(
            transfer, self.owner,
            moved=outcome.moved, completed=outcome.completed, failed=outcome.failed,
            warning=outcome.warning, dimse_status=outcome.dimse_status, error=outcome.error,
            now=self._clock(), retry_initial=self._retry[0], retry_max=self._retry[1],
        )  # fmt: skip
        if finished is None:
            log.warning(
                "series %s: the claim was taken over while moving; its outcome is not recorded",
                transfer.series_instance_uid,
            )
            return None
        status = moved_status(finished)
        self._metrics.move_done(status, finished.completed, finished.warning, finished.failed)
        fields = {
            "series_instance_uid": finished.series_instance_uid,
            "study_instance_uid": finished.study_instance_uid,
            "completed": finished.completed,
            "failed": finished.failed,
            "warning": finished.warning,
            "attempt": finished.attempts,
        }
        if finished.status == "moved":
            log.info("moved series %s: %d image(s)", finished.series_instance_uid,
                     finished.completed + finished.warning, extra=fields)  # fmt: skip
        else:
            log.error("moving series %s failed (attempt %d, next at %s): %s",
                      finished.series_instance_uid, finished.attempts,
                      time.strftime("%H:%M:%S", time.localtime(finished.next_attempt_at or 0)),
                      finished.last_error, extra=fields)  # fmt: skip
        async with self.finished:
            self.finished.notify_all()
        try:
            await self._bus.publish(moved_event(finished, self._source))
        except PacsflowError as err:
            # The outcome is committed; report_pending publishes it once the bus is back.
            log.error("series %s: publishing moved failed: %s", finished.series_instance_uid, err)
            return finished
        await self._transfers.mark_reported(finished, self._clock())
        return finished

    async def _outcome(self, transfer: Transfer) -> MoveOutcome:
        remote = self._remotes.get(transfer.source_ae)
        if remote is None:
            return MoveOutcome(
                False,
                error=f"no configured remote PACS has the AE title {transfer.source_ae!r}",
            )
        local = self._locals.get(transfer.destination_ae)
        try:
            if transfer.verify and local is not None and transfer.expected_images:
                # The previous mover died mid-move: the series may have arrived after all.
                present = await asyncio.to_thread(
                    local.series_images,
                    transfer.study_instance_uid,
                    transfer.series_instance_uid,
                )
                if present >= transfer.expected_images:
                    log.info("series %s is on the local PACS already (moved before the "
                             "previous mover stopped)", transfer.series_instance_uid)  # fmt: skip
                    return MoveOutcome(True)
            result = await asyncio.to_thread(
                remote.move_series,
                transfer.destination_ae,
                transfer.study_instance_uid,
                transfer.series_instance_uid,
            )
        except DicomError as err:
            return MoveOutcome(False, dimse_status=getattr(err, "status", None), error=str(err))
        return MoveOutcome.from_result(result)

    async def _renew(self, transfer: Transfer) -> None:
        # Renewed well within the timeout, so a slow store does not make a live claim stale.
        interval = self._claim_timeout / 4
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self._transfers.renew(transfer.id, self.owner, self._clock()):
                    log.warning("series %s: the claim was taken over",
                                transfer.series_instance_uid)  # fmt: skip
                    return
            except PacsflowError as err:
                log.warning("series %s: renewing the claim failed: %s",
                            transfer.series_instance_uid, err)  # fmt: skip
