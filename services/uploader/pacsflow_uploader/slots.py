"""A slot: one association's worth of sending to one destination, kept open between chunks.

A slot runs on one thread (of a sender process, or of the service's own process) and sends
the chunks of files it is handed, one after the other, over one association it keeps open
from chunk to chunk (associating again only when a chunk needs presentation contexts the
open association did not propose, when the peer ended it, or after it sat idle).

Presentation contexts are proposed from the files themselves: one per (SOP class, transfer
syntax) pair. A chunk whose files need more than 128 pairs (PS3.8 9.3.2.2) is sent in groups,
each over an association of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pacsflow.config import Node
from pacsflow.dicom.options import NetworkOptions
from pacsflow.errors import AssociationRejected, InvalidDicom

from pacsflow_uploader.files import FileJob, IdentifiedFile, identify
from pacsflow_uploader.scu import (
    MAX_CONTEXTS,
    Engine,
    SendResult,
    StoreConnection,
    open_session,
)

__all__ = ["EXTRA_ACSE_TIMEOUT", "ChunkResult", "Slot", "group_by_presentations"]

LOGGER = logging.getLogger(__name__)

#: seconds an association beyond a destination's first waits for the peer's answer
EXTRA_ACSE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class ChunkResult:
    """The results of one chunk, one per file, and the state of the slot's association."""

    results: list[SendResult]
    #: why an association could not be made (files not tried are reported with it)
    association_error: str | None = None
    #: associations opened for this chunk
    associations_opened: int = 0
    #: the slot holds an open association after the chunk
    association_open: bool = False


@dataclass
class _Group:
    presentations: list[tuple[str, str]] = field(default_factory=list)
    files: list[IdentifiedFile] = field(default_factory=list)


def group_by_presentations(
    files: Sequence[IdentifiedFile], limit: int = MAX_CONTEXTS
) -> list[_Group]:
    """Split files into groups needing at most ``limit`` presentation contexts each."""
    by_presentation: dict[tuple[str, str], list[IdentifiedFile]] = {}
    for file in files:
        by_presentation.setdefault(file.presentation, []).append(file)
    groups: list[_Group] = []
    for presentation, members in by_presentation.items():
        if not groups or len(groups[-1].presentations) >= limit:
            groups.append(_Group())
        groups[-1].presentations.append(presentation)
        groups[-1].files.extend(members)
    return groups


def _not_tried(files: Sequence[IdentifiedFile], error: str) -> list[SendResult]:
    return [SendResult(f.job.key, "error", error=error, size=f.size, attempted=False) for f in files]


class Slot:
    """One association to one destination, reused for every chunk it is handed."""

    def __init__(
        self,
        node: Node,
        options: NetworkOptions,
        *,
        engine: Engine = "lean",
        idle_release: float = 20.0,
        max_contexts: int = MAX_CONTEXTS,
        extra: bool = False,
    ) -> None:
        self.node = node
        if extra and options.acse_timeout > EXTRA_ACSE_TIMEOUT:
            # A PACS that serves one association at a time (storescp without --fork) leaves
            # a further request unanswered while the first one lasts: find out quickly.
            options = replace(options, acse_timeout=EXTRA_ACSE_TIMEOUT)
        self.options = options
        self.engine: Engine = engine
        self.idle_release = idle_release
        self.max_contexts = max_contexts
        self._session: StoreConnection | None = None
        self._last_used = 0.0
        # The idle check may come from another thread than the one sending.
        self._lock = threading.Lock()

    @property
    def association_open(self) -> bool:
        """True while the slot holds an association."""
        return self._session is not None and self._session.is_open

    def run(self, jobs: Sequence[FileJob]) -> ChunkResult:
        """Send every file of a chunk; one result per job, in no particular order."""
        with self._lock:
            return self._run(jobs)

    def _run(self, jobs: Sequence[FileJob]) -> ChunkResult:
        results: list[SendResult] = []
        identified: list[IdentifiedFile] = []
        for job in jobs:
            try:
                identified.append(identify(job))
            except InvalidDicom as err:
                results.append(SendResult(job.key, "invalid", error=err.reason))
        opened = 0
        groups = group_by_presentations(identified, self.max_contexts)
        for index, group in enumerate(groups):
            try:
                opened += self._ensure_session(group.presentations)
            except AssociationRejected as err:
                rest = [f for g in groups[index:] for f in g.files]
                results += _not_tried(rest, str(err))
                return ChunkResult(results, str(err), opened, False)
            files = group.files
            while files:
                assert self._session is not None
                sent = self._session.send_many(files)
                results += sent
                files = files[len(sent) :]
                if not files:
                    break
                # The association is gone (aborted, timed out): associate again for the
                # rest; a destination that went away shows up here.
                LOGGER.info("association with %s lost: %s", self.node,
                            sent[-1].error if sent else "closed")  # fmt: skip
                self._session = None
                try:
                    opened += self._ensure_session(group.presentations)
                except AssociationRejected as err:
                    rest = files + [f for g in groups[index + 1 :] for f in g.files]
                    results += _not_tried(rest, str(err))
                    return ChunkResult(results, str(err), opened, False)
        self._last_used = time.monotonic()
        return ChunkResult(results, None, opened, self.association_open)

    def associate(self, presentations: Sequence[tuple[str, str]]) -> ChunkResult:
        """Have an association proposing ``presentations`` open before there is work for it
        (the first chunk of a batch then starts sending at once); no files."""
        with self._lock:
            try:
                opened = self._ensure_session(list(presentations)[: self.max_contexts])
            except AssociationRejected as err:
                return ChunkResult([], str(err), 0, False)
            self._last_used = time.monotonic()
            return ChunkResult([], None, opened, self.association_open)

    def _ensure_session(self, needed: list[tuple[str, str]]) -> int:
        """Have an open association proposing ``needed``; 1 when one was opened."""
        session = self._session
        if session is not None:
            reusable = set(needed) <= set(session.presentations)
            idle = time.monotonic() - self._last_used > self.idle_release
            if reusable and not idle and session.still_usable():
                return 0
            wanted = list(needed)
            if reusable or not idle:
                # Keep proposing what the old association carried, where there is room, so
                # alternating chunks do not make it associate again and again.
                for presentation in session.presentations:
                    if len(wanted) >= self.max_contexts:
                        break
                    if presentation not in wanted:
                        wanted.append(presentation)
            session.close()
            self._session = None
            needed = wanted
        self._session = open_session(self.engine, self.node, self.options, needed)
        return 1

    def release_if_idle(self) -> bool:
        """Release the association when it sat idle too long; True when one was released."""
        if not self._lock.acquire(blocking=False):
            return False  # sending right now
        try:
            if self._session is None:
                return False
            if time.monotonic() - self._last_used < self.idle_release:
                return False
            self._session.close()
            self._session = None
            return True
        finally:
            self._lock.release()

    def close(self) -> None:
        """Release the association, if any."""
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None
