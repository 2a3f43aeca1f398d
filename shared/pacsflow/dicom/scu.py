"""Storage and verification SCU: C-ECHO, and C-STORE of files as their encoded bytes.

This module owns the sending side of the Storage Service Class (PS3.4 Annex B) and the
Verification Service Class (PS3.4 Annex A). A file is never decoded: its data set bytes go
on the wire as they are on disk, under a presentation context negotiated for exactly its
SOP class and transfer syntax. Each request/response pair owns the association's DIMSE
queue through its :class:`~pacsflow.dicom.association.DimseGate`, so no response is lost to
the association's reactor (perf-notes finding 2).

:func:`send_files` spreads files over several associations (threads: pynetdicom's socket
and reactor threads release the GIL while they wait), opens more than one association per
worker when the files need more than 128 presentation contexts (PS3.8 9.3.2.2 gives odd
context IDs 1-255), and associates again after an abort.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsflow.config import Node
from pacsflow.dicom.association import (
    DimseGate,
    NoAcceptedContexts,
    RejectedByPeer,
    gate_of,
    open_association,
)
from pacsflow.dicom.files import PartTenFile, read_part10
from pacsflow.dicom.options import NetworkOptions
from pacsflow.dicom.status import category, describe
from pacsflow.errors import AssociationRejected, DicomError, DimseFailure, InvalidDicom

if TYPE_CHECKING:
    from pynetdicom.association import Association

__all__ = [
    "MAX_PRESENTATION_CONTEXTS",
    "StoreCategory",
    "StoreResult",
    "StoreSession",
    "echo",
    "send_files",
]

LOGGER = logging.getLogger(__name__)

#: PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255
MAX_PRESENTATION_CONTEXTS = 128

StoreCategory = Literal["success", "warning", "failure", "refused", "error", "invalid"]
FileLike = str | os.PathLike[str] | PartTenFile

# PS3.7 9.1.1.1.6: 0 medium, 1 high, 2 low. Medium is what DCMTK and most PACS expect.
_PRIORITY_MEDIUM = 0


@dataclass(frozen=True, slots=True)
class StoreResult:
    """The outcome of sending one file to one node.

    ``category``: the peer's status category ("success", "warning", "failure"), or
    "refused" (no accepted presentation context for the file's SOP class and transfer
    syntax: nothing was sent), "error" (no answer: network error, abort, timeout) or
    "invalid" (the file is not DICOM or is damaged; ``error`` says why).
    """

    path: Path
    sop_instance_uid: str | None
    status: int | None
    category: StoreCategory
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the peer stored the file (success or warning)."""
        return self.category in ("success", "warning")


def _path_of(item: FileLike) -> Path:
    return item.path if isinstance(item, PartTenFile) else Path(item)


def _as_part_ten(item: FileLike) -> PartTenFile:
    return item if isinstance(item, PartTenFile) else read_part10(item)


def _store_contexts(presentations: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    # One context per (SOP class, transfer syntax): the acceptor picks one syntax per
    # context, and a file's bytes can only go under the syntax they are encoded in.
    return [
        build_context(sop_class, [syntax]) for sop_class, syntax in dict.fromkeys(presentations)
    ]


class StoreSession:
    """One association to a node for C-STORE; use as a context manager.

    ``presentations`` are the (SOP Class UID, Transfer Syntax UID) pairs to propose, at most
    128 (see :func:`send_files` for more). After an abort or a network error the session is
    closed and every further :meth:`send` answers "error"; open a new one to go on. One thread
    at a time: an association carries one request at a time (no asynchronous operations).
    """

    def __init__(
        self, node: Node, options: NetworkOptions, presentations: Iterable[tuple[str, str]]
    ) -> None:
        self.node = node
        self.options = options
        self.presentations = list(dict.fromkeys(presentations))
        if not self.presentations:
            raise ValueError("a store session needs at least one presentation to propose")
        if len(self.presentations) > MAX_PRESENTATION_CONTEXTS:
            raise ValueError(
                f"{len(self.presentations)} presentations: one association takes at most "
                f"{MAX_PRESENTATION_CONTEXTS}"
            )
        self._assoc: Association | None = None
        self._gate: DimseGate | None = None
        self._context_ids: dict[tuple[str, str], int] = {}
        self._message_id = 0

    @classmethod
    def for_files(
        cls, node: Node, options: NetworkOptions, files: Iterable[PartTenFile]
    ) -> StoreSession:
        """A session proposing exactly what ``files`` need."""
        return cls(node, options, (file.presentation for file in files))

    def open(self) -> None:
        """Associate; raise :class:`~pacsflow.errors.AssociationRejected` when refused."""
        if self._assoc is not None:
            raise RuntimeError("the store session is already open")
        assoc = open_association(self.node, _store_contexts(self.presentations), self.options)
        self._assoc = assoc
        self._gate = gate_of(assoc)
        self._context_ids = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id)  # type: ignore[arg-type]
            for cx in assoc.accepted_contexts
        }
        LOGGER.debug(
            "associated with %s: %d of %d presentation contexts accepted",
            self.node,
            len(self._context_ids),
            len(self.presentations),
        )

    @property
    def is_open(self) -> bool:
        """True while the association is established."""
        return self._assoc is not None and self._assoc.is_established

    def accepts(self, presentation: tuple[str, str]) -> bool:
        """True when the peer accepted this (SOP class, transfer syntax) pair."""
        return presentation in self._context_ids

    def close(self) -> None:
        """Release the association (abort it when the release is not answered)."""
        assoc, self._assoc = self._assoc, None
        if assoc is None:
            return
        if assoc.is_established:
            assoc.release()
            if not assoc.is_released and assoc.is_established:
                assoc.abort()

    def __enter__(self) -> StoreSession:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def send(self, item: FileLike) -> StoreResult:
        """C-STORE one file's encoded data set; never raises for a per-file problem."""
        try:
            file = _as_part_ten(item)
        except InvalidDicom as err:
            return StoreResult(_path_of(item), None, None, "invalid", err.reason)

        assoc, gate = self._assoc, self._gate
        if assoc is None or gate is None or not assoc.is_established:
            return StoreResult(
                file.path, file.sop_instance_uid, None, "error", f"no association with {self.node}"
            )
        context_id = self._context_ids.get(file.presentation)
        if context_id is None:
            return StoreResult(
                file.path,
                file.sop_instance_uid,
                None,
                "refused",
                f"{self.node} accepted no presentation context for SOP class "
                f"{file.sop_class_uid} in transfer syntax {file.transfer_syntax_uid}",
            )
        try:
            with open(file.path, "rb") as fp:
                fp.seek(file.dataset_offset)
                data = fp.read()
            if len(data) % 2 and file.transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
                # A deflated stream is padded to even length (PS3.5 A.5); peers reject odd
                # PDV lengths and inflating ignores the pad.
                data += b"\x00"
        except OSError as err:
            return StoreResult(
                file.path, file.sop_instance_uid, None, "invalid", f"cannot read: {err.strerror}"
            )

        request = C_STORE()
        message_id = self._next_message_id()
        request.MessageID = message_id
        request.AffectedSOPClassUID = file.sop_class_uid
        request.AffectedSOPInstanceUID = file.sop_instance_uid
        request.Priority = _PRIORITY_MEDIUM
        request.DataSet = BytesIO(data)

        with gate.exclusive():
            assoc.dimse.send_msg(request, context_id)
            _context, response = assoc.dimse.get_msg(block=True)
        return self._result(file, assoc, message_id, response)

    def _result(
        self, file: PartTenFile, assoc: Association, message_id: int, response: object
    ) -> StoreResult:
        if response is None:
            # The DIMSE queue yields None on an A-ABORT, a closed connection or a timeout.
            if assoc.acse.is_aborted() or not assoc.is_established or not assoc.dul.is_alive():
                error = f"{self.node} aborted or closed the association during the C-STORE"
            else:
                error = (
                    f"no C-STORE response from {self.node} within {self.options.dimse_timeout:g} s"
                )
            # Either way the association is unusable (PS3.7 9.1.1.1); abort() is a no-op if gone.
            assoc.abort()
            return StoreResult(file.path, file.sop_instance_uid, None, "error", error)
        if (
            not isinstance(response, C_STORE)
            or not response.is_valid_response
            or response.MessageIDBeingRespondedTo != message_id
        ):
            assoc.abort()
            return StoreResult(
                file.path,
                file.sop_instance_uid,
                None,
                "error",
                f"{self.node} answered with an unexpected message; association aborted",
            )
        status = int(cast(int, response.Status))
        peer_category = category(status)
        if peer_category == "success":
            return StoreResult(file.path, file.sop_instance_uid, status, "success")
        answered = f"{self.node} answered {describe(status)}"
        if peer_category == "warning":
            return StoreResult(file.path, file.sop_instance_uid, status, "warning", answered)
        # Pending and cancel are no valid final C-STORE status either (PS3.4 B.2.3).
        return StoreResult(file.path, file.sop_instance_uid, status, "failure", answered)


def echo(node: Node, options: NetworkOptions) -> float:
    """C-ECHO ``node``; return the request/response round trip in seconds.

    Raises :class:`~pacsflow.errors.AssociationRejected` when no association can be made,
    :class:`~pacsflow.errors.DimseFailure` for a non-success status and
    :class:`~pacsflow.errors.DicomError` when no response came.
    """
    assoc = open_association(node, [build_context(Verification)], options)
    try:
        started = time.perf_counter()
        status = assoc.send_c_echo()
        round_trip = time.perf_counter() - started
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        raise DicomError(f"no C-ECHO response from {node}")
    if int(status.Status) != 0x0000:
        raise DimseFailure(
            int(status.Status), f"{node} answered C-ECHO with {describe(int(status.Status))}"
        )
    return round_trip


# --- many files, many associations ----------------------------------------------------------


class _Batch:
    """Files whose presentations fit in one association, shared by the workers on it."""

    def __init__(self, presentations: list[tuple[str, str]], files: Iterable[PartTenFile]) -> None:
        self.presentations = presentations
        self.files: deque[PartTenFile] = deque(files)
        self.lock = threading.Lock()
        self.workers = 0  # workers currently holding an association for this batch

    def take(self) -> PartTenFile | None:
        try:
            return self.files.popleft()
        except IndexError:
            return None

    def drain(self) -> list[PartTenFile]:
        taken = []
        while (file := self.take()) is not None:
            taken.append(file)
        return taken


def _batches(files: Sequence[PartTenFile], max_contexts: int) -> list[_Batch]:
    by_presentation: dict[tuple[str, str], list[PartTenFile]] = {}
    for file in files:
        by_presentation.setdefault(file.presentation, []).append(file)
    presentations = list(by_presentation)
    batches = []
    for start in range(0, len(presentations), max_contexts):
        chunk = presentations[start : start + max_contexts]
        batches.append(_Batch(chunk, (file for p in chunk for file in by_presentation[p])))
    return batches


_DONE = object()
# PS3.8 9.3.4: result 2, rejected-transient ("try again later")
_REJECTED_TRANSIENT = 2
_TRANSIENT_RETRY_DELAYS = (0.1, 0.3, 1.0)


class _Sender:
    """One worker: works through the batches, one association at a time."""

    def __init__(
        self,
        node: Node,
        options: NetworkOptions,
        batches: list[_Batch],
        first_batch: int,
        results: queue.Queue[object],
        stop: threading.Event,
    ) -> None:
        self.node = node
        self.options = options
        # Workers start on different batches so that several associations serve different
        # context sets when there are several.
        self.batches = batches[first_batch:] + batches[:first_batch]
        self.results = results
        self.stop = stop

    def run(self) -> None:
        try:
            for batch in self.batches:
                if self.stop.is_set():
                    return
                self._work_on(batch)
        finally:
            self.results.put(_DONE)

    def _fail_rest(self, batch: _Batch, category_: StoreCategory, error: str) -> None:
        for file in batch.drain():
            self.results.put(StoreResult(file.path, file.sop_instance_uid, None, category_, error))

    def _open(self, batch: _Batch) -> StoreSession | None:
        for delay in (*_TRANSIENT_RETRY_DELAYS, None):
            session = StoreSession(self.node, self.options, batch.presentations)
            try:
                session.open()
            except NoAcceptedContexts as err:
                self._fail_rest(batch, "refused", str(err))
                return None
            except AssociationRejected as err:
                with batch.lock:
                    others = batch.workers
                if others:
                    # Another worker has an association for this batch (the peer may limit
                    # associations per AE): leave the files to it.
                    LOGGER.info(
                        "extra association to %s refused, going on with fewer: %s", self.node, err
                    )
                    return None
                if isinstance(err, RejectedByPeer) and err.result == _REJECTED_TRANSIENT and delay:
                    # Workers that asked at the same moment may all have been over the
                    # peer's limit: retry at staggered times before giving up.
                    self.stop.wait(delay * random.uniform(0.5, 1.5))
                    continue
                # Nobody else can send these files: report them, do not drop them.
                self._fail_rest(batch, "error", str(err))
                return None
            with batch.lock:
                batch.workers += 1
            return session
        return None

    def _close(self, batch: _Batch, session: StoreSession) -> None:
        with batch.lock:
            batch.workers -= 1
        session.close()

    def _work_on(self, batch: _Batch) -> None:
        session: StoreSession | None = None
        try:
            while not self.stop.is_set() and batch.files:
                if session is None:
                    session = self._open(batch)
                    if session is None:
                        return
                file = batch.take()
                if file is None:
                    return
                result = session.send(file)
                self.results.put(result)
                if result.category == "error" and not session.is_open:
                    # Aborted or timed out: the next file goes on a new association.
                    LOGGER.warning(
                        "association with %s lost (%s); associating again", self.node, result.error
                    )
                    self._close(batch, session)
                    session = None
        finally:
            if session is not None:
                self._close(batch, session)


def send_files(
    node: Node,
    files: Iterable[FileLike],
    options: NetworkOptions,
    associations: int = 1,
    *,
    max_contexts: int = MAX_PRESENTATION_CONTEXTS,
) -> Iterator[StoreResult]:
    """C-STORE ``files`` to ``node`` over up to ``associations`` parallel associations.

    Yields one :class:`StoreResult` per file as the answers come (not in input order).
    Files that are not DICOM are reported as "invalid" first, without any network traffic.
    Stopping the iteration early stops the workers after their current file.
    """
    if associations < 1:
        raise ValueError("associations must be at least 1")
    if not 1 <= max_contexts <= MAX_PRESENTATION_CONTEXTS:
        raise ValueError(f"max_contexts must be between 1 and {MAX_PRESENTATION_CONTEXTS}")
    readable: list[PartTenFile] = []
    for item in files:
        try:
            readable.append(_as_part_ten(item))
        except InvalidDicom as err:
            yield StoreResult(_path_of(item), None, None, "invalid", err.reason)
    if not readable:
        return

    batches = _batches(readable, max_contexts)
    results: queue.Queue[object] = queue.Queue()
    stop = threading.Event()
    worker_count = min(associations, len(readable))
    workers = [
        threading.Thread(
            target=_Sender(node, options, batches, index % len(batches), results, stop).run,
            name=f"pacsflow-store-{node.ae_title}-{index}",
            daemon=True,
        )
        for index in range(worker_count)
    ]
    for worker in workers:
        worker.start()
    try:
        running = worker_count
        while running:
            answer = results.get()
            if answer is _DONE:
                running -= 1
                continue
            yield cast(StoreResult, answer)
        # Every file gets a result: anything a crashed worker left behind is reported.
        for batch in batches:
            for file in batch.drain():
                yield StoreResult(
                    file.path, file.sop_instance_uid, None, "error", "not sent: sender failed"
                )
    finally:
        stop.set()
        for worker in workers:
            worker.join()
