"""``pacsflow send``: C-STORE files and folders to one or more nodes now, with a summary.

For administrators, in place of ``storescu`` loops: folders are walked recursively, every
file is sent over several associations (the uploader's sender pool, so the same speed and
the same presentation context handling), files that are not DICOM are counted as invalid
and never sent. Progress shows as a bar on a terminal and as plain lines otherwise; the
summary gives sent / warnings / failed / invalid and the rate. Nothing is recorded in the
ledger and no event is published.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Self, TextIO

from pacsflow.config import Node
from pacsflow.dicom.options import NetworkOptions

from pacsflow_uploader.files import FileJob
from pacsflow_uploader.pool import SenderPool
from pacsflow_uploader.scu import Engine, SendResult
from pacsflow_uploader.slots import EXTRA_ACSE_TIMEOUT, ChunkResult

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

__all__ = ["SendSummary", "collect_files", "run_send", "send_files"]

# Failures listed one by one under the summary; the rest are only counted.
_LISTED_FAILURES = 10
# Plain progress lines (not a terminal): at most this often.
_LINE_INTERVAL = 2.0


@dataclass
class SendSummary:
    """What happened to the files sent to one destination."""

    destination: str
    total: int
    sent: int = 0
    warnings: int = 0
    failed: int = 0
    refused: int = 0
    invalid: int = 0
    bytes: int = 0
    seconds: float = 0.0
    #: (outcome, path, why) of the first files that did not go
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def done(self) -> int:
        """Files with an outcome."""
        return self.sent + self.warnings + self.failed + self.refused + self.invalid

    @property
    def ok(self) -> bool:
        """True when no file failed or was refused (invalid files are not failures)."""
        return self.failed == 0 and self.refused == 0

    def add(self, result: SendResult, path: str) -> None:
        """Count one file's outcome."""
        if result.category == "success":
            self.sent += 1
        elif result.category == "warning":
            self.warnings += 1
        elif result.category == "invalid":
            self.invalid += 1
        elif result.category == "refused":
            self.refused += 1
        else:
            self.failed += 1
        if result.ok:
            self.bytes += result.size
        elif len(self.failures) < _LISTED_FAILURES:
            outcome = {"invalid": "invalid", "refused": "refused"}.get(result.category, "failed")
            self.failures.append((outcome, path, result.error or result.category))

    def line(self) -> str:
        """The summary line, e.g. ``X@h:1: 10 sent, 0 warnings, 0 failed, 0 invalid in ...``."""
        failed = self.failed + self.refused
        refused = f" ({self.refused} refused)" if self.refused else ""
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        megabytes = self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.destination}: {self.sent} sent, {self.warnings} warnings, {failed} failed"
            f"{refused}, {self.invalid} invalid in {self.seconds:.1f} s"
            f" ({rate:.0f} files/s, {megabytes:.1f} MB/s)"
        )


def collect_files(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """Files under ``paths`` (folders recursively, in name order) and paths that do not exist."""
    files: list[str] = []
    missing: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for root, folders, names in os.walk(path):
                folders.sort()
                files.extend(os.path.join(root, name) for name in sorted(names))
        elif os.path.isfile(path):
            files.append(path)
        else:
            missing.append(path)
    return files, missing


async def send_files(
    files: Sequence[str],
    destinations: Sequence[tuple[str, Node]],
    options: NetworkOptions,
    *,
    associations: int,
    processes: int,
    engine: Engine = "lean",
    chunk_size: int = 32,
    progress: Callable[[str, SendResult], None] | None = None,
    pool: SenderPool | None = None,
    extra_after: float = EXTRA_ACSE_TIMEOUT,
) -> list[SendSummary]:
    """Send ``files`` to each destination over ``associations`` associations; the summaries.

    A ``pool`` given is used as it is and left open (benchmarks start it beforehand).
    Associations are added one at a time, each once the previous one worked, while the work
    left would take longer than ``extra_after`` seconds over the ones open (0: up to
    ``associations`` whatever is left, as the uploader does).
    """
    own = pool is None
    if pool is None:
        pool = SenderPool(options, processes=processes, engine=engine)
    await pool.start()
    try:
        return list(
            await asyncio.gather(
                *(
                    _send_to(pool, name, node, files, associations, chunk_size, progress,
                             extra_after)
                    for name, node in destinations
                )
            )
        )
    finally:
        if own:
            await pool.close()


async def _send_to(
    pool: SenderPool,
    name: str,
    node: Node,
    files: Sequence[str],
    associations: int,
    chunk_size: int,
    progress: Callable[[str, SendResult], None] | None,
    extra_after: float,
) -> SendSummary:
    summary = SendSummary(name, len(files))
    started = time.perf_counter()
    jobs = [FileJob(index, path) for index, path in enumerate(files)]
    # Small chunks when there are few files, so every association gets some.
    size = max(1, min(chunk_size, -(-len(jobs) // max(1, associations * 2))))
    work = deque(jobs[start : start + size] for start in range(0, len(jobs), size))
    # Associations are added one at a time, each once the previous one works: a PACS that
    # serves one at a time then answers the first and lets only the extra ones wait.
    free = [0]
    associated: set[int] = set()
    running: dict[asyncio.Task[ChunkResult], tuple[int, list[FileJob]]] = {}

    def report(result: SendResult) -> None:
        summary.add(result, files[result.key])
        if progress is not None:
            progress(name, result)

    while work or running:
        while work and free:
            slot, chunk = free.pop(0), work.popleft()
            running[asyncio.ensure_future(pool.run((name, slot), node, chunk))] = (slot, chunk)
        finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for task in finished:
            slot, chunk = running.pop(task)
            outcome = task.result()
            if outcome.association_error is not None and associated - {slot}:
                # The peer takes fewer associations than asked for: the files this one
                # could not send go to the associations that work; this one is dropped.
                untried = {r.key for r in outcome.results if not r.attempted}
                for result in outcome.results:
                    if result.key not in untried:
                        report(result)
                work.appendleft([job for job in chunk if job.key in untried])
                continue
            for result in outcome.results:
                report(result)
            if any(r.attempted for r in outcome.results) and slot not in associated:
                associated.add(slot)
                # Another association only pays when the work left outlasts the wait for
                # a PACS that serves one at a time to leave the extra request unanswered.
                left = sum(len(chunk) for chunk in work)
                timed = [r.seconds for r in outcome.results if r.attempted]
                per_file = sum(timed) / len(timed)
                if slot + 1 < associations and left * per_file > extra_after:
                    free.append(slot + 1)
            free.append(slot)
    summary.seconds = time.perf_counter() - started
    return summary


class _Progress:
    """A rich progress bar on a terminal, plain lines otherwise."""

    def __init__(self, totals: dict[str, int], stream: TextIO) -> None:
        self.totals = totals
        self.done = dict.fromkeys(totals, 0)
        self.stream = stream
        self.started = time.monotonic()
        self._last_line = 0.0
        self._bar: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        if stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TaskProgressColumn(), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                TimeRemainingColumn(), console=Console(file=stream),
            )  # fmt: skip
            for name, total in totals.items():
                self._tasks[name] = self._bar.add_task(name, total=total, rate="")

    def __enter__(self) -> Self:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:
            self._lines(force=True)

    def update(self, name: str, _result: SendResult) -> None:
        self.done[name] += 1
        if self._bar is not None:
            elapsed = max(1e-6, time.monotonic() - self.started)
            self._bar.update(
                self._tasks[name], advance=1, rate=f"{self.done[name] / elapsed:.0f} files/s"
            )  # fmt: skip
        else:
            self._lines(force=False)

    def _lines(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_line < _LINE_INTERVAL:
            return
        self._last_line = now
        elapsed = max(1e-6, now - self.started)
        for name, total in self.totals.items():
            done = self.done[name]
            percent = 100.0 * done / total if total else 100.0
            print(f"{name}: {done}/{total} files ({percent:.0f} %), {done / elapsed:.0f} files/s",
                  file=self.stream, flush=True)


def run_send(
    paths: Sequence[str],
    destinations: Sequence[tuple[str, Node]],
    options: NetworkOptions,
    *,
    associations: int,
    processes: int,
    engine: Engine = "lean",
    stream: TextIO | None = None,
) -> int:
    """The ``pacsflow send`` command: 0 when every file went, 1 when any failed."""
    out = stream or sys.stdout
    files, missing = collect_files(paths)
    for path in missing:
        print(f"pacsflow send: {path}: no such file or folder", file=sys.stderr)
    # A DICOMDIR indexes a medium; it is not an instance to store.
    dicomdirs = [f for f in files if os.path.basename(f).upper() == "DICOMDIR"]
    files = [f for f in files if os.path.basename(f).upper() != "DICOMDIR"]
    if not files:
        print("pacsflow send: no files to send", file=sys.stderr)
        return 1 if missing else 0
    with _Progress({name: len(files) for name, _ in destinations}, out) as progress:
        summaries = asyncio.run(
            send_files(
                files, destinations, options, associations=associations,
                processes=processes, engine=engine, progress=progress.update,
            )
        )  # fmt: skip
    for summary in summaries:
        unlisted = summary.failed + summary.refused + summary.invalid - len(summary.failures)
        for path in dicomdirs:
            summary.invalid += 1
            summary.failures.append(("invalid", path, "a DICOMDIR, not an instance to store"))
        print(summary.line(), file=out)
        for outcome, path, error in summary.failures:
            print(f"  {outcome}: {path}: {error}", file=out)
        if unlisted > 0:
            print(f"  ... and {unlisted} more", file=out)
    return 0 if all(s.ok for s in summaries) and not missing else 1
