"""The source PACS as the harvester uses it: every request paced, gated and counted.

Each C-FIND, C-MOVE and C-GET (the IMAGE-level re-fetches too) goes through
:meth:`Pacs.request`, which in turn

1. waits while a pause window is on, or outside the work windows (:mod:`.windows`);
2. waits while the PACS is known to be unreachable (a shared backoff: when no association
   can be made, every worker holds back instead of each hammering a PACS that is down);
3. takes a slot from the shared budget (:mod:`.ratelimit`) and, should a window have begun
   meanwhile, waits again;
4. runs the blocking call (:mod:`.lean` for C-FIND and C-MOVE by default, else
   :mod:`pacsflow.dicom`) in a thread of its own.

The thread is a daemon: a stopping harvester does not wait for a C-MOVE of thousands of
images to end (what arrived stays; the next attempt fetches only what is missing).

Errors come out as the DICOM module raises them; :func:`classify` sorts them into
*unreachable* (no association: the PACS or the link is down), *aborted* (the association
broke or timed out during the request) and *status* (the PACS answered a failure).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

from pacsflow.config import Node
from pacsflow.dicom import MoveResult, NetworkOptions, ReceivedInstance
from pacsflow.dicom import find as dicom_find
from pacsflow.dicom import get as dicom_get
from pacsflow.dicom import move as dicom_move
from pacsflow.errors import AssociationRejected, DicomError, DimseFailure
from pydicom.dataset import Dataset

from pacsflow_harvester import lean
from pacsflow_harvester.metrics import HarvesterMetrics
from pacsflow_harvester.ratelimit import RateLimiter
from pacsflow_harvester.windows import Schedule

__all__ = ["ErrorKind", "Pacs", "classify", "in_daemon_thread"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
ErrorKind = Literal["unreachable", "aborted", "status"]


def classify(err: DicomError) -> ErrorKind:
    """What kind of failure a DICOM error is, for retries and metrics."""
    if isinstance(err, AssociationRejected):
        return "unreachable"
    if isinstance(err, DimseFailure):
        return "status"
    return "aborted"


async def in_daemon_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """Run blocking ``fn`` in a daemon thread; cancelling the await leaves it to finish alone."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def work() -> None:
        try:
            result = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting task
            error = err
            try:
                loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
            except RuntimeError:
                pass  # the loop has closed: nobody waits any more
        else:
            try:
                loop.call_soon_threadsafe(settle, lambda: future.set_result(result))
            except RuntimeError:
                pass

    threading.Thread(target=work, name="pacsflow-harvest-dimse", daemon=True).start()
    return await future


class Pacs:
    """Paced, windowed and counted Query/Retrieve requests to one node."""

    def __init__(
        self,
        node: Node,
        options: NetworkOptions,
        *,
        limiter: RateLimiter,
        schedule: Schedule,
        metrics: HarvesterMetrics,
        model: Literal["study", "patient"] = "study",
        engine: Literal["lean", "pynetdicom"] = "lean",
        retry_initial: float = 30.0,
        retry_max: float = 1800.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.options = options
        self.limiter = limiter
        self.schedule = schedule
        self.metrics = metrics
        self.model = model
        # C-FIND and C-MOVE through the lean SCU (:mod:`.lean`) or the shared DICOM module;
        # C-GET always through the shared module.
        self._find = lean.find if engine == "lean" else dicom_find
        self._move = lean.move if engine == "lean" else dicom_move
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.clock = clock
        self._unreachable_until = 0.0
        self._unreachable_failures = 0

    # --- gates ------------------------------------------------------------------------------

    def _mark_paused(self, waiting: bool) -> None:
        self.metrics.paused.set(1 if waiting else 0)
        if waiting:
            log.info("outside the harvest windows: no new requests until they open")
        else:
            log.info("harvest windows open again")

    async def _wait_reachable(self) -> None:
        while (delay := self._unreachable_until - self.clock()) > 0:
            await asyncio.sleep(min(delay, 60.0))

    def _unreachable(self, err: DicomError) -> None:
        if self._unreachable_until > self.clock():
            # Another request of the same outage: the wait is already set.
            return
        self._unreachable_failures += 1
        exponent = min(self._unreachable_failures - 1, 30)
        backoff = min(self.retry_max, self.retry_initial * 2**exponent)
        # Spread the retries of many workers (and processes) a little.
        backoff *= random.uniform(0.8, 1.2)
        self._unreachable_until = max(self._unreachable_until, self.clock() + backoff)
        self.metrics.unreachable.set(1)
        log.warning("PACS %s unreachable (%s); requests wait %.0f s", self.node, err, backoff)

    def _reachable(self) -> None:
        if self._unreachable_failures:
            log.info("PACS %s reachable again", self.node)
        self._unreachable_failures = 0
        self._unreachable_until = 0.0
        self.metrics.unreachable.set(0)

    @property
    def unreachable(self) -> bool:
        """True while requests hold back because the PACS could not be reached."""
        return self._unreachable_until > self.clock()

    async def _gate(self) -> None:
        while True:
            await self.schedule.wait_open(self._mark_paused)
            await self._wait_reachable()
            waited = await self.limiter.acquire()
            if waited:
                self.metrics.rate_wait.inc(waited)
            # The slot may have come after a window began: then it is given up.
            if self.schedule.is_open():
                return

    async def request(self, kind: str, fn: Callable[..., _T], *args: Any) -> _T:
        """One DIMSE request through every gate."""
        await self._gate()
        self.metrics.request_started(kind)
        try:
            result = await in_daemon_thread(fn, *args)
        except DicomError as err:
            reason = classify(err)
            self.metrics.request_errors.labels(kind, reason).inc()
            if reason == "unreachable":
                self._unreachable(err)
            else:
                self._reachable()
            raise
        self._reachable()
        return result

    # --- the requests -----------------------------------------------------------------------

    def _keys(self, query: Mapping[str, Any], patient_id: str | None) -> dict[str, Any]:
        keys = dict(query)
        if self.model == "patient" and patient_id is not None:
            # Patient Root: PatientID is the unique key of the top level (PS3.4 C.6.2).
            keys = {"PatientID": patient_id, **keys}
        return keys

    async def find(
        self,
        level: str,
        query: Mapping[str, Any],
        *,
        patient_id: str | None = None,
        model: Literal["study", "patient"] | None = None,
    ) -> list[Dataset]:
        """C-FIND at ``level``."""
        return await self.request(
            "find", self._find, self.node, level, self._keys(query, patient_id), self.options,
            model or self.model,
        )  # fmt: skip

    async def move(
        self, destination_ae: str, level: str, query: Mapping[str, Any], *, patient_id: str
    ) -> MoveResult:
        """C-MOVE what ``query`` matches to ``destination_ae``."""
        return await self.request(
            "move", self._move, self.node, destination_ae, level,
            self._keys(query, patient_id), self.options, self.model,
        )  # fmt: skip

    async def get(
        self,
        level: str,
        query: Mapping[str, Any],
        on_instance: Callable[[ReceivedInstance], int],
        *,
        patient_id: str,
    ) -> MoveResult:
        """C-GET what ``query`` matches; each instance reaches ``on_instance``."""
        return await self.request(
            "get", dicom_get, self.node, level, self._keys(query, patient_id), self.options,
            on_instance, self.model,
        )  # fmt: skip
