"""What every benchmark path needs: processes to start and measure, peers, arrival checks.

* :class:`ProcessMonitor` samples, in a thread, the CPU time and resident memory of labelled
  process trees (a service and its sender processes, ``storescp --fork`` and its children,
  Orthanc): CPU seconds inside a measured window and the peak RSS.
* :func:`run_tool` runs a DCMTK tool to its end and returns its wall time with the CPU time
  and peak RSS the kernel accounted to it (``wait4``), exact even for a process that lives
  less than one sampling interval.
* :func:`wait_for_files` polls a receiver's folder until a number of files is there;
  :func:`filing_milestones` reads from the files' modification times when the receiver
  finished the first, the middle and the last one.
* :func:`verify_arrival` counts what a receiver holds and compares data sets byte for byte
  with their sources (after the file meta group, which every receiver writes itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "ENV",
    "ArrivalError",
    "ProcessMonitor",
    "ProcessFigures",
    "count_files",
    "dataset_bytes",
    "filing_milestones",
    "free_port",
    "received_files",
    "run_tool",
    "stop_process",
    "tool",
    "verify_arrival",
    "wait_for_files",
    "wait_for_port",
    "wait_until_ready",
]

#: DCMTK and Orthanc disable Nagle only when asked; without it every exchange stalls 40 ms.
ENV = {**os.environ, "TCP_NODELAY": "1"}


class ArrivalError(RuntimeError):
    """A receiver does not hold every file it was sent, or holds different bytes."""


def tool(name: str) -> str:
    """The path of a command-line tool (DCMTK, Orthanc, py-spy); exit when it is missing."""
    candidates = [shutil.which(name), str(Path(sys.executable).parent / name), f"/usr/sbin/{name}"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    sys.exit(f"{name} is not installed (make test-peers installs DCMTK and Orthanc)")


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    """Wait until something accepts connections on ``port``; fail if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port} after {timeout} s") from None
            time.sleep(0.05)


def wait_until_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until a pacsflow process answers 200 on ``/readyz`` (bus and state reachable)."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args))} exited with "
                               f"{process.returncode}")  # fmt: skip
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the process on http port {port} was not ready in {timeout} s")
        time.sleep(0.1)


# --- measuring processes --------------------------------------------------------------------


@dataclass
class ProcessFigures:
    """One labelled process tree in one measured window."""

    cpu_seconds: float = 0.0
    peak_rss_bytes: int = 0
    processes: int = 0

    def as_dict(self) -> dict[str, float | int]:
        return {"cpu_seconds": round(self.cpu_seconds, 3),
                "peak_rss_mb": round(self.peak_rss_bytes / 2**20, 1),
                "processes": self.processes}  # fmt: skip


@dataclass
class _Tree:
    root: int
    # pid -> CPU seconds (user + system) at the window's start and at the last sample
    baseline: dict[int, float] = field(default_factory=dict)
    latest: dict[int, float] = field(default_factory=dict)
    peak_rss: int = 0
    pids: set[int] = field(default_factory=set)
    exited: ProcessFigures | None = None


def _cpu(times: Any) -> float:
    return float(times.user + times.system)


def warm_memory(size: int) -> None:
    """Write to ``size`` bytes of fresh memory, one byte per page, and free it again.

    On a virtual machine whose host takes freed guest memory back, the first write to such a
    page faults in the host: measured here, the router's system time for the large set went
    from 0.15 s to 0.6–0.9 s depending on how long before the run its memory was freed.
    Warming just before every clock, references included, gives each path pages that are
    already there to write into.
    """
    page = mmap.PAGESIZE
    block = bytearray(size)
    block[::page] = b"\x01" * len(range(0, size, page))
    del block


class ProcessMonitor:
    """Samples CPU and RSS of labelled process trees every ``interval`` seconds.

    A label names a root process; its descendants count with it, except subtrees that have
    labels of their own (the benchmark process's children are peers and services too).
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self._trees: dict[str, _Tree] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: dict[int, psutil.Process] = {}
        #: (seconds since start, label -> RSS bytes of the tree) while ``record_series`` is on
        self.series: list[tuple[float, dict[str, int]]] = []
        self.record_series = False
        self._started = time.monotonic()

    def __enter__(self) -> ProcessMonitor:
        self._thread = threading.Thread(target=self._run, name="process-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def add(self, label: str, pid: int) -> None:
        """Measure ``pid`` and its descendants as ``label`` from now on."""
        with self._lock:
            self._trees[label] = _Tree(root=pid)
        self.sample()

    def remove(self, label: str) -> None:
        with self._lock:
            self._trees.pop(label, None)

    def peak(self, label: str) -> int:
        """The largest RSS sampled for ``label`` in this window (0: never sampled)."""
        with self._lock:
            tree = self._trees.get(label)
            return tree.peak_rss if tree is not None else 0

    def exited(self, label: str, figures: ProcessFigures) -> None:
        """Figures the kernel accounted for a process that ended (``wait4``): they win."""
        with self._lock:
            tree = self._trees.setdefault(label, _Tree(root=-1))
            tree.exited = figures

    def _process(self, pid: int) -> psutil.Process:
        handle = self._handles.get(pid)
        if handle is None:
            handle = self._handles[pid] = psutil.Process(pid)
        return handle

    def _members(self, tree: _Tree, other_roots: set[int]) -> list[psutil.Process]:
        try:
            root = self._process(tree.root)
            members = [root]
            stack = [root]
            while stack:
                for child in stack.pop().children():
                    if child.pid in other_roots:
                        continue
                    members.append(self._process(child.pid))
                    stack.append(child)
            return members
        except psutil.Error:
            return []

    def sample(self) -> None:
        """Take one sample now (also called at the edges of a window)."""
        with self._lock:
            trees = dict(self._trees)
        roots = {tree.root for tree in trees.values()}
        point: dict[str, int] = {}
        for label, tree in trees.items():
            if tree.root < 0:
                continue
            rss = 0
            for process in self._members(tree, roots - {tree.root}):
                try:
                    with process.oneshot():
                        cpu = _cpu(process.cpu_times())
                        rss += process.memory_info().rss
                except psutil.Error:
                    continue
                tree.pids.add(process.pid)
                tree.latest[process.pid] = cpu
            tree.peak_rss = max(tree.peak_rss, rss)
            point[label] = rss
        if self.record_series:
            self.series.append((time.monotonic() - self._started, point))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start_window(self) -> None:
        """CPU from now on counts; peaks start again."""
        self.sample()
        with self._lock:
            for tree in self._trees.values():
                tree.baseline = dict(tree.latest)
                tree.peak_rss = 0
                tree.exited = None
                tree.pids = set(tree.latest)
        self.sample()

    def end_window(self) -> dict[str, ProcessFigures]:
        """CPU seconds and peak RSS per label since :meth:`start_window`."""
        self.sample()
        figures: dict[str, ProcessFigures] = {}
        with self._lock:
            for label, tree in self._trees.items():
                if tree.exited is not None:
                    figures[label] = tree.exited
                    continue
                cpu = sum(tree.latest[pid] - tree.baseline.get(pid, 0.0) for pid in tree.pids
                          if pid in tree.latest)  # fmt: skip
                figures[label] = ProcessFigures(cpu, tree.peak_rss, len(tree.pids))
        return figures


async def run_tool(
    command: Sequence[str], log: Path, env: dict[str, str] | None = None,
    monitor: ProcessMonitor | None = None, label: str = "",
) -> tuple[float, ProcessFigures]:
    """Run ``command`` to its end: wall seconds, its CPU (``wait4``) and peak RSS.

    With a ``monitor``, the peak RSS is the sampled one and the figures are recorded under
    ``label``: the kernel's ``ru_maxrss`` also counts the benchmark process's memory the
    child had between fork and exec.
    """
    with open(log, "ab") as output:
        started = time.perf_counter()
        process = subprocess.Popen(list(command), env=env or ENV, stdout=output,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    if monitor is not None:
        monitor.add(label, process.pid)
    _, status, usage = await asyncio.to_thread(os.wait4, process.pid, 0)
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{Path(command[0]).name} failed ({process.returncode}): {tail}")
    # ru_maxrss is in KiB on Linux.
    figures = ProcessFigures(usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, 1)
    if monitor is not None:
        sampled = monitor.peak(label)
        if sampled:
            figures.peak_rss_bytes = sampled
        monitor.exited(label, figures)
    return elapsed, figures


def stop_process(process: subprocess.Popen[bytes], timeout: float = 20) -> ProcessFigures | None:
    """Terminate a child and reap it; its lifetime CPU and peak RSS (None if already reaped)."""
    if process.returncode is not None:
        return None
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return ProcessFigures(usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, 1)
        if time.monotonic() > deadline:
            process.kill()
        time.sleep(0.05)


# --- arrival ---------------------------------------------------------------------------------


def received_files(folder: Path) -> Iterator[Path]:
    """Files a receiver finished writing (pacsflow's temporary files start with a dot)."""
    for where, _, names in os.walk(folder):
        for name in names:
            if not name.startswith("."):
                yield Path(where) / name


def filing_times(folder: Path) -> list[float]:
    """When the receiver finished each file (its modification time, wall clock), in order.

    The kernel stamps a file's last write with a fine-grained clock, so this times each
    file's arrival without depending on how often the benchmark polled."""
    return sorted(path.stat().st_mtime for path in received_files(folder))


def filing_milestones(folder: Path, started_wall: float) -> dict[str, float]:
    """Seconds from ``started_wall`` (``time.time()``) until the first, the middle and the
    last file were filed."""
    times = filing_times(folder)
    return {"first_filed_seconds": times[0] - started_wall,
            "half_filed_seconds": times[len(times) // 2] - started_wall,
            "last_filed_seconds": times[-1] - started_wall}  # fmt: skip


def count_files(folder: Path) -> int:
    """How many of :func:`received_files` there are, from directory listings alone: the
    benchmark polls this while the clock runs, so it must take little of the CPU it measures."""
    count = 0
    folders = [os.fspath(folder)]
    while folders:
        try:
            listing = os.scandir(folders.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif not entry.name.startswith("."):
                    count += 1
    return count


async def record_as_the_watcher(db: Any, files: Sequence[Any]) -> None:
    """Record ``files`` (ReadyFile) in ``db``'s ledger as the watcher records them before it
    announces them: a path's size and modification time as they are on disk."""
    from pacsflow.store import Ledger, SeenFile

    seen = []
    for f in files:
        st = os.stat(f.path)
        seen.append(SeenFile(path=f.path, size=st.st_size, mtime=st.st_mtime,
                             sop_instance_uid=f.sop_instance_uid, sop_class_uid=f.sop_class_uid,
                             transfer_syntax_uid=f.transfer_syntax_uid, batch_key="bench"))  # fmt: skip
    await Ledger(db).record_seen(seen)


async def wait_for_files(
    folder: Path, expected: int, timeout: float, interval: float = 0.02,
    failed: subprocess.Popen[bytes] | None = None,
) -> float:
    """Poll until ``folder`` holds ``expected`` files; the ``perf_counter`` time it did."""
    deadline = time.monotonic() + timeout
    while True:
        count = await asyncio.to_thread(count_files, folder) if folder.exists() else 0
        now = time.perf_counter()
        if count >= expected:
            return now
        if failed is not None and failed.poll() is not None:
            raise ArrivalError(f"{failed.args[0]} exited with {failed.returncode}; "
                               f"{count} of {expected} files arrived")  # fmt: skip
        if time.monotonic() > deadline:
            raise ArrivalError(f"{count} of {expected} files arrived within {timeout:.0f} s")
        await asyncio.sleep(interval)


def dataset_bytes(path: Path) -> tuple[str, bytes]:
    """The Media Storage SOP Instance UID and the data set's bytes (after the meta group)."""
    data = path.read_bytes()
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        raise ArrivalError(f"{path} is not a Part 10 file with a meta group length")
    # (0002,0000) UL, explicit VR little endian (PS3.10 7.1): its value ends the meta group.
    (length,) = struct.unpack("<I", data[140:144])
    meta_end = 144 + length
    meta = data[144:meta_end]
    uid = _meta_value(meta, 0x0003)
    return uid, data[meta_end:]


def _meta_value(meta: bytes, element: int) -> str:
    offset = 0
    while offset + 8 <= len(meta):
        group, number = struct.unpack("<HH", meta[offset:offset + 4])
        vr = meta[offset + 4:offset + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            (length,) = struct.unpack("<I", meta[offset + 8:offset + 12])
            start = offset + 12
        else:
            (length,) = struct.unpack("<H", meta[offset + 6:offset + 8])
            start = offset + 8
        if (group, number) == (0x0002, element):
            return meta[start:start + length].rstrip(b"\x00 ").decode("ascii")
        offset = start + length
    raise ArrivalError(f"no (0002,{element:04X}) in the file meta group")


def verify_arrival(
    folder: Path, expected: int, sources: dict[str, Path], compare: int = 2
) -> dict[str, object]:
    """Check a receiver holds ``expected`` files and that ``compare`` of them equal their sources.

    ``sources`` maps SOP Instance UID -> source file. Raises :class:`ArrivalError`.
    """
    files = sorted(received_files(folder))
    if len(files) != expected:
        raise ArrivalError(f"{len(files)} of {expected} files arrived in {folder}")
    picks = sorted({files[0], files[len(files) // 2], files[-1]})[:max(compare, 1)]
    for path in picks:
        uid, received = dataset_bytes(path)
        if uid not in sources:
            raise ArrivalError(f"{path} holds SOP instance {uid}, which was never sent")
        _, sent = dataset_bytes(sources[uid])
        if received != sent:
            raise ArrivalError(f"{path}: the data set differs from its source {sources[uid]}")
    return {"files": len(files), "compared": len(picks)}
