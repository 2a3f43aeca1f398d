"""Benchmark: folder -> uploader -> DCMTK ``storescp``, against ``storescu`` -> ``storescp``.

Run from the repository root::

    .venv/bin/python -m bench.uploader [--rounds 3] [--datasets large small]
        [--setups 1x1 2x2 4x4] [--engines lean asyncio]

Both data sets of perf-notes.md (500 images of 512x512, about 0.5 MB each; 2,000 of 64x64,
about 10 kB) are generated deterministically (``bench/datasets.py``). Each round measures,
on the same files and one after the other:

* ``storescu +sd`` into ``storescp`` (one association): the reference, ratio 1.00;
* N ``storescu`` in parallel (the folder split N ways) into ``storescp --fork``;
* the uploader service as it runs in production, for each setup ``AxP`` (A associations,
  P sender processes): the files are recorded in the ledger as the watcher records them
  (not timed), then the clock runs from publishing their ``file-ready`` events to the last
  ``file-sent`` event: scheduling, claiming, C-STORE, recording outcomes and publishing
  events are all in it. SQLite state and the in-memory bus, as in the embedded deployment;
  one association goes to ``storescp``, more to ``storescp --fork``;
* ``pacsflow send``'s path (the sender pool alone, no ledger) for each setup.

``TCP_NODELAY=1`` for DCMTK; storescp's default PDU size for everyone; files in memory
(``/dev/shm``) unless ``--folder`` says otherwise. After every run each image is checked
to have arrived. The median img/s of the rounds is printed, with the ratio
to the reference (higher is faster).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Self

from pacsflow.bus import MemoryBus
from pacsflow.config import Node, UploaderSettings
from pacsflow.dicom import NetworkOptions, read_part10
from pacsflow.events import Event, FileReady, FileReadyPayload, ReadyFile, Source
from pacsflow.store import SqliteDatabase, upgrade
from pacsflow_uploader.deliveries import DeliveryQueue, owner_id
from pacsflow_uploader.pool import SenderPool
from pacsflow_uploader.send import send_files
from pacsflow_uploader.uploader import Uploader
from prometheus_client import CollectorRegistry

from bench.datasets import DATASETS, write_dataset
from bench.support import record_as_the_watcher

ENV = {**os.environ, "TCP_NODELAY": "1"}
WATCHER = Source(service="watcher", instance="bench")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        sys.exit(f"{name} is not installed (Debian package dcmtk)")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Storescp:
    """storescp into a fresh folder; ``--fork`` for more than one association at a time."""

    def __init__(self, work: Path, fork: bool) -> None:
        self.out = work / "storescp-out"
        self.fork = fork
        self.port = _free_port()
        self.log = work / "storescp.log"
        self.process: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        self.out.mkdir(parents=True)
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                [_tool("storescp"), "+xa", *(["--fork"] if self.fork else []), "-aet",
                 "STORESCP", "-od", str(self.out), str(self.port)],
                env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    async def __aenter__(self) -> Self:
        self.process = await asyncio.to_thread(self._start)
        deadline = time.monotonic() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.process is not None
        # The process group: with --fork, the children serving associations too.
        os.killpg(self.process.pid, 15)
        await asyncio.to_thread(self.process.wait, 10)

    @property
    def node(self) -> Node:
        return Node(ae_title="STORESCP", host="127.0.0.1", port=self.port)

    def check(self, expected: int, what: str) -> None:
        arrived = sum(1 for path in self.out.iterdir() if path.is_file())
        if arrived != expected:
            raise RuntimeError(f"{what}: {arrived} of {expected} files arrived")


async def dcmtk(work: Path, source: Path, count: int, parallel: int) -> float:
    """``parallel`` storescu processes, each on its share of the files."""
    files = sorted(source.iterdir())
    shares = []
    for index in range(parallel):
        share = work / f"share-{index}"
        share.mkdir()
        for path in files[index::parallel]:
            os.link(path, share / path.name)
        shares.append(share)
    async with Storescp(work, fork=parallel > 1) as scp:
        started = time.perf_counter()
        processes = [
            await asyncio.create_subprocess_exec(
                _tool("storescu"), "-aec", "STORESCP", "+sd", "127.0.0.1", str(scp.port),
                str(share), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            for share in shares
        ]  # fmt: skip
        for process in processes:
            _, err = await process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"storescu failed: {err.decode()[-2000:]}")
        elapsed = time.perf_counter() - started
    scp.check(count, f"storescu x{parallel}")
    return elapsed


def ready_files(source: Path) -> list[ReadyFile]:
    found = []
    for path in sorted(source.iterdir()):
        part10 = read_part10(path)
        found.append(
            ReadyFile(
                path=str(path), size=part10.size, sop_instance_uid=part10.sop_instance_uid,
                series_instance_uid=part10.series_instance_uid or "",
                study_instance_uid=part10.study_instance_uid or "",
                sop_class_uid=part10.sop_class_uid,
                transfer_syntax_uid=part10.transfer_syntax_uid,
            )
        )  # fmt: skip
    return found


async def uploader(
    work: Path, files: list[ReadyFile], associations: int, processes: int, engine: str
) -> float:
    """The uploader service, from file-ready to the last file-sent."""
    db = await SqliteDatabase.open(work / "state.db")
    await upgrade(db)
    # Recorded as the watcher records them before it announces them (not timed).
    await record_as_the_watcher(db, files)
    bus = MemoryBus()
    await bus.start()
    sent = 0
    done = asyncio.Event()

    async def count(event: Event) -> None:
        nonlocal sent
        sent += len(event.payload.files)  # type: ignore[union-attr]
        if sent >= len(files):
            done.set()

    await bus.subscribe("watcher", ["file-sent"], count)
    async with Storescp(work, fork=associations > 1) as scp:
        settings = UploaderSettings(
            destinations=["pacs"], associations=associations, processes=processes,
            engine=engine,  # type: ignore[arg-type]
        )  # fmt: skip
        service = Uploader(
            settings, {"pacs": scp.node}, NetworkOptions(ae_title="PFBENCH"),
            queue=DeliveryQueue(db, owner=owner_id("bench")), bus=bus,
            source=Source(service="uploader", instance="bench"), registry=CollectorRegistry(),
            load=lambda: 0.0,
        )  # fmt: skip
        task = asyncio.create_task(service.run())
        # The sender processes are started and loaded before the clock runs.
        while not service.pool.process_ids() and processes:
            await asyncio.sleep(0.05)
        await service.pool.wait_ready()
        started = time.perf_counter()
        await bus.publish(*[
            FileReady(source=WATCHER, correlation_id="bench", payload=FileReadyPayload(
                files=files[i:i + 200], batch_key="bench"))
            for i in range(0, len(files), 200)
        ])  # fmt: skip
        await asyncio.wait_for(done.wait(), 600)
        elapsed = time.perf_counter() - started
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await bus.close()
    await db.close()
    scp.check(len(files), f"uploader {associations}x{processes}")
    return elapsed


async def sender_only(work: Path, source: Path, associations: int, processes: int) -> float:
    """``pacsflow send``'s path: the sender pool, no ledger, no events."""
    paths = [str(p) for p in sorted(source.iterdir())]
    options = NetworkOptions(ae_title="PFBENCH")
    # Started before the clock, as for the service.
    pool = SenderPool(options, processes=processes)
    await pool.start()
    await pool.wait_ready()
    try:
        async with Storescp(work, fork=associations > 1) as scp:
            started = time.perf_counter()
            (summary,) = await send_files(
                paths, [("pacs", scp.node)], options, associations=associations,
                processes=processes, pool=pool,
            )  # fmt: skip
            elapsed = time.perf_counter() - started
    finally:
        await pool.close()
    if summary.sent != len(paths):
        raise RuntimeError(f"send: {summary.line()}")
    scp.check(len(paths), "send")
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS),
                        default=["large", "small"])
    parser.add_argument("--setups", nargs="+", default=["1x1", "2x2", "4x4"],
                        help="associations x sender processes of the uploader runs")
    parser.add_argument(
        "--engines", nargs="+", choices=["lean", "pynetdicom", "asyncio"], default=["lean"]
    )
    parser.add_argument(
        "--folder", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where files are written (default: /dev/shm, so disk write-back of earlier runs"
        " does not slow later ones)",
    )  # fmt: skip
    args = parser.parse_args()
    setups = [tuple(int(n) for n in setup.split("x")) for setup in args.setups]
    with tempfile.TemporaryDirectory(prefix="pacsflow-bench-", dir=args.folder) as temp:
        root = Path(temp)
        for name in args.datasets:
            count = DATASETS[name][0]
            source = root / f"{name}-source"
            paths = write_dataset(source, name)
            size = sum(path.stat().st_size for path in paths) / len(paths)
            files = ready_files(source)
            runs: dict[str, Callable[[Path], Awaitable[float]]] = {
                "storescu -> storescp": partial(dcmtk, source=source, count=count, parallel=1),
            }
            for associations, _ in setups:
                if associations > 1:
                    runs[f"{associations} x storescu -> storescp --fork"] = partial(
                        dcmtk, source=source, count=count, parallel=associations
                    )
            for engine in args.engines:
                for associations, processes in setups:
                    runs[f"uploader {engine} {associations} assoc / {processes} proc"] = partial(
                        uploader, files=files, associations=associations,
                        processes=processes, engine=engine,
                    )  # fmt: skip
            for associations, processes in setups:
                runs[f"send {associations} assoc / {processes} proc"] = partial(
                    sender_only, source=source, associations=associations, processes=processes
                )
            times: dict[str, list[float]] = {label: [] for label in runs}
            for round_number in range(args.rounds):
                for index, (label, run) in enumerate(runs.items()):
                    work = root / f"{name}-{round_number}-{index}"
                    work.mkdir()
                    times[label].append(await run(work))
                    shutil.rmtree(work)
                print(f"  {name} round {round_number + 1} done", flush=True)
            reference = statistics.median(times["storescu -> storescp"])
            print(f"{name}: {count} x {size / 1000:.1f} kB", flush=True)
            for label, measured in times.items():
                median = statistics.median(measured)
                print(f"  {label:<40} {count / median:7.0f} img/s   {reference / median:5.2f}",
                      flush=True)
            shutil.rmtree(source)


if __name__ == "__main__":
    asyncio.run(main())
