"""The sender pool: slots (associations) spread over sender processes, used from asyncio.

One Python process sends at most about one core's worth of C-STOREs (perf-notes finding 5),
so the pool can run its slots in several sender processes. Each process keeps its slots,
and so their open associations, for its whole life: a chunk for slot ``(destination, n)``
always goes to the same process and the same association. Work goes out and results come
back in bulk (one message per chunk of files), never per file.

With ``processes=0`` the slots run on threads of the calling process instead (the command
line tool with one association, tests of the pool itself).

A sender process that dies takes its chunks in flight with it: their files come back as
"error" and in doubt (the peer may have stored some), and the next chunk for one of its
slots starts a new process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from pacsflow.config import LoggingSettings, Node
from pacsflow.dicom.options import NetworkOptions
from pacsflow.logs import configure_logging

from pacsflow_uploader.files import FileJob
from pacsflow_uploader.scu import MAX_CONTEXTS, Engine, SendResult
from pacsflow_uploader.slots import ChunkResult, Slot

__all__ = ["SenderPool", "SlotKey"]

log = logging.getLogger(__name__)

#: (destination name, slot number)
SlotKey = tuple[str, int]

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class _SlotSettings:
    options: NetworkOptions
    engine: Engine
    idle_release: float
    max_contexts: int

    def slot(self, key: SlotKey, node: Node) -> Slot:
        return Slot(
            node, self.options, engine=self.engine, idle_release=self.idle_release,
            max_contexts=self.max_contexts, extra=key[1] > 0,
        )  # fmt: skip


@dataclass(frozen=True)
class _Associate:
    """Work for a slot that is no files: open its association for these presentations."""

    presentations: tuple[tuple[str, str], ...]


def _files(work: list[FileJob] | _Associate) -> list[FileJob]:
    """The files of a piece of work (an association request has none)."""
    return [] if isinstance(work, _Associate) else work


def _run(slot: Slot, work: list[FileJob] | _Associate) -> ChunkResult:
    if isinstance(work, _Associate):
        return slot.associate(work.presentations)
    return slot.run(work)


def _lost(jobs: Sequence[FileJob], error: str) -> ChunkResult:
    # Nobody knows how far the chunk got: every file is in doubt.
    return ChunkResult(
        [SendResult(job.key, "error", error=error, transmitted=True) for job in jobs]
    )


# --- inside a sender process ---------------------------------------------------------------


class _WorkerSlot:
    """A slot and the thread that feeds it, inside a sender process."""

    def __init__(self, slot: Slot, reply: Any) -> None:
        self.slot = slot
        self.queue: queue.Queue[tuple[int, list[FileJob] | _Associate] | None] = queue.Queue()
        self._reply = reply
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        tick = max(0.5, min(5.0, self.slot.idle_release / 2))
        while True:
            try:
                item = self.queue.get(timeout=tick)
            except queue.Empty:
                self.slot.release_if_idle()
                continue
            if item is None:
                self.slot.close()
                return
            request_id, work = item
            try:
                outcome: tuple[Any, ...] = ("done", request_id, _run(self.slot, work))
            except Exception as err:
                log.exception("sender slot for %s failed", self.slot.node)
                outcome = ("crashed", request_id, f"{type(err).__name__}: {err}")
            self._reply(outcome)


def _die_with_parent() -> None:
    # A sender must not go on sending for a parent that was killed: the parent's successor
    # takes its claims back and sends them again. Linux can end us with the parent.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # elsewhere the closed pipe ends the process (below)


def _worker_main(
    conn: Connection, settings: _SlotSettings, logs: LoggingSettings | None, level: int
) -> None:
    """Entry point of a sender process: run chunks on its slots until told to stop."""
    _die_with_parent()
    # Ctrl-C reaches the whole process group; the parent decides when senders stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if logs is not None:
        configure_logging(logs)  # the service's format (JSON lines), from this process too
    else:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    reply_lock = threading.Lock()

    def reply(message: tuple[Any, ...]) -> None:
        with reply_lock, contextlib.suppress(OSError):
            conn.send(message)

    slots: dict[SlotKey, _WorkerSlot] = {}
    # Everything is imported by now: the parent may count on a quick first chunk.
    reply(("ready", 0, os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            # The parent is gone without saying goodbye: stop now, mid-chunk if need be.
            os._exit(0)
        if message is None:
            break
        request_id, key, node, work = message
        entry = slots.get(key)
        if entry is None or entry.slot.node != node:
            if entry is not None:
                entry.queue.put(None)
            entry = slots[key] = _WorkerSlot(settings.slot(key, node), reply)
        entry.queue.put((request_id, work))
    for entry in slots.values():
        entry.queue.put(None)
    for entry in slots.values():
        entry.thread.join(timeout=settings.options.acse_timeout)


# --- in the service's process ------------------------------------------------------------


class _ProcessWorker:
    """A sender process, the pipe to it, and the thread that reads its answers."""

    def __init__(
        self, index: int, settings: _SlotSettings, logs: LoggingSettings | None
    ) -> None:
        self.index = index
        self._settings = settings
        self._logs = logs
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        # Requests in flight and their files (none for an association request: if the
        # process ends, nothing of it is lost).
        self._pending: dict[int, tuple[asyncio.Future[ChunkResult], list[FileJob]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_lock = threading.Lock()
        self.ready: asyncio.Future[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive() and self._conn is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=_worker_main,
            args=(child, self._settings, self._logs, logging.getLogger().getEffectiveLevel()),
            name=f"pacsflow-sender-{self.index}",
            daemon=True,
        )
        process.start()
        child.close()
        self._loop, self._process, self._conn = loop, process, parent
        self.ready = loop.create_future()
        threading.Thread(
            target=self._read_answers, args=(parent, process), daemon=True,
            name=f"pacsflow-sender-{self.index}-answers",
        ).start()  # fmt: skip

    def submit(
        self, request_id: int, key: SlotKey, node: Node, work: list[FileJob] | _Associate
    ) -> asyncio.Future[ChunkResult]:
        loop = asyncio.get_running_loop()
        if not self.alive:
            if self._process is not None:
                log.warning("sender process %d ended; starting a new one", self.index)
            self.start(loop)
        future: asyncio.Future[ChunkResult] = loop.create_future()
        jobs = _files(work)
        self._pending[request_id] = (future, jobs)
        assert self._conn is not None
        try:
            with self._send_lock:
                self._conn.send((request_id, key, node, work))
        except OSError as err:
            self._pending.pop(request_id, None)
            future.set_result(_lost(jobs, f"sender process unreachable: {err}"))
        return future

    def _read_answers(self, conn: Connection, process: multiprocessing.process.BaseProcess) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            loop.call_soon_threadsafe(self._answer, message)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._ended, process)

    def _answer(self, message: tuple[Any, ...]) -> None:
        kind, request_id, payload = message
        if kind == "ready":
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(None)
            return
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        future, jobs = entry
        if future.done():
            return
        if kind == "done":
            future.set_result(payload)
        else:
            future.set_result(_lost(jobs, f"sender failed: {payload}"))

    def _ended(self, process: multiprocessing.process.BaseProcess) -> None:
        if process is not self._process:
            return
        self._conn = None
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(RuntimeError(f"sender process {self.index} ended at start"))
        pending, self._pending = self._pending, {}
        if pending:
            log.error("sender process %d ended with %d chunk(s) in flight", self.index,
                      len(pending))
        for future, jobs in pending.values():
            if not future.done():
                future.set_result(_lost(jobs, "the sender process ended"))

    def stop(self, timeout: float) -> None:
        process, conn = self._process, self._conn
        self._conn = None
        if conn is not None:
            with contextlib.suppress(OSError), self._send_lock:
                conn.send(None)
        if process is not None:
            process.join(timeout)
            if process.is_alive():
                process.terminate()
                process.join(5)
        if conn is not None:
            conn.close()


class SenderPool:
    """Slots keyed by (destination, number), run in sender processes or local threads."""

    def __init__(
        self,
        options: NetworkOptions,
        *,
        processes: int = 1,
        engine: Engine = "lean",
        idle_release: float = 20.0,
        max_contexts: int = MAX_CONTEXTS,
        logs: LoggingSettings | None = None,
    ) -> None:
        """``logs``: how sender processes log (default: plain lines at the caller's level)."""
        if processes < 0:
            raise ValueError("processes must be 0 (threads) or more")
        self.processes = processes
        self._settings = _SlotSettings(options, engine, idle_release, max_contexts)
        self._logs = logs
        self._workers: list[_ProcessWorker] = []
        self._assignment: dict[SlotKey, _ProcessWorker] = {}
        self._local: dict[SlotKey, tuple[Slot, ThreadPoolExecutor]] = {}
        self._ids = itertools.count(1)
        self._idle_task: asyncio.Task[None] | None = None
        self._started = False

    async def start(self) -> None:
        """Start the sender processes (they load in parallel)."""
        if self._started:
            return
        self._started = True
        loop = asyncio.get_running_loop()
        self._workers = [
            _ProcessWorker(i, self._settings, self._logs) for i in range(self.processes)
        ]
        for worker in self._workers:
            worker.start(loop)
        if not self._workers:
            self._idle_task = asyncio.create_task(self._release_idle_locals())

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until every sender process has loaded (RuntimeError if one ended)."""
        futures = [w.ready for w in self._workers if w.ready is not None]
        if futures:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*futures)

    def process_ids(self) -> list[int]:
        """Process ids of the running sender processes (for operators and tests)."""
        return [w.pid for w in self._workers if w.alive and w.pid is not None]

    async def run(self, key: SlotKey, node: Node, jobs: list[FileJob]) -> ChunkResult:
        """Send ``jobs`` over slot ``key``'s association to ``node``."""
        if not jobs:
            return ChunkResult([])
        return await self._submit(key, node, jobs)

    async def associate(
        self, key: SlotKey, node: Node, presentations: Sequence[tuple[str, str]]
    ) -> ChunkResult:
        """Open slot ``key``'s association to ``node`` for ``presentations`` (repeats are
        dropped, those beyond the slot's limit too) ahead of its first chunk (an open one that
        carries them stays); no files, no results."""
        return await self._submit(key, node, _Associate(tuple(dict.fromkeys(presentations))))

    async def _submit(
        self, key: SlotKey, node: Node, work: list[FileJob] | _Associate
    ) -> ChunkResult:
        if not self._started:
            await self.start()
        jobs = _files(work)
        if self._workers:
            worker = self._assignment.get(key)
            if worker is None:
                worker = self._workers[len(self._assignment) % len(self._workers)]
                self._assignment[key] = worker
            return await worker.submit(next(self._ids), key, node, work)
        slot, executor = self._local_slot(key, node)
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.shield(loop.run_in_executor(executor, _run, slot, work))
        except RuntimeError as err:  # the executor was shut down by close()
            return _lost(jobs, str(err))

    def _local_slot(self, key: SlotKey, node: Node) -> tuple[Slot, ThreadPoolExecutor]:
        entry = self._local.get(key)
        if entry is not None and entry[0].node != node:
            entry[1].submit(entry[0].close)
            entry[1].shutdown(wait=False)
            entry = None
        if entry is None:
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pacsflow-slot-{key[0]}")
            entry = self._local[key] = (self._settings.slot(key, node), executor)
        return entry

    async def _release_idle_locals(self) -> None:
        loop = asyncio.get_running_loop()
        tick = max(0.5, min(5.0, self._settings.idle_release / 2))
        while True:
            await asyncio.sleep(tick)
            for slot, executor in list(self._local.values()):
                with contextlib.suppress(RuntimeError):
                    await loop.run_in_executor(executor, slot.release_if_idle)

    async def close(self) -> None:
        """Release every association and stop the sender processes."""
        if self._idle_task is not None:
            self._idle_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_task
        timeout = self._settings.options.acse_timeout + 5
        await asyncio.gather(
            *(asyncio.to_thread(worker.stop, timeout) for worker in self._workers)
        )
        for slot, executor in self._local.values():
            executor.submit(slot.close)
            await asyncio.to_thread(executor.shutdown, wait=True)
        self._workers, self._local, self._assignment = [], {}, {}
        self._started = False
