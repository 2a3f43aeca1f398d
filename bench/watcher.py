"""Benchmark: the watcher's handling of an import folder, against DCMTK sending the same files.

Run from the repository root::

    .venv/bin/python -m bench.watcher [--files 10000] [--rounds 3]

Writes ``--files`` small CT images (64x64, about 10 kB) into one import folder, then times
the watcher handling that folder once it is quiet: walking it, validating every file (header
only), hashing it, recording it in the ledger (SQLite) and announcing it in ``file-ready``
events (the in-memory bus). The reference is DCMTK ``storescu`` sending the same folder to
``storescp`` on one association (``TCP_NODELAY=1``). The watcher must be well faster than the
send it prepares, or it would be the bottleneck of an import.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from bench.datasets import write_series
from bench.router import _run_storescp
from pacsflow.bus import MemoryBus
from pacsflow.config import WatcherSettings
from pacsflow.events import Source
from pacsflow.store import Ledger, SqliteDatabase, upgrade
from pacsflow_watcher.watcher import Watcher


async def _watch_once(work: Path, source: Path) -> tuple[float, int]:
    """Seconds for the watcher to handle a copy of ``source``; files it announced."""
    inbox = work / "inbox"
    unit = inbox / "#1-Bench"
    shutil.copytree(source, unit)
    db = await SqliteDatabase.open(work / "state.db")
    await upgrade(db)
    bus = MemoryBus(registry=CollectorRegistry())
    await bus.start()
    announced = 0

    async def count(event: object) -> None:
        nonlocal announced
        announced += len(event.payload.files)  # type: ignore[attr-defined]

    await bus.subscribe("uploader", ["file-ready"], count)
    settings = WatcherSettings(import_folders=[inbox], archive_folder=work / "archive",
                               quarantine_folder=work / "quarantine", debounce_seconds=0)
    watcher = Watcher(settings, ledger=Ledger(db), bus=bus,
                      source=Source(service="watcher", instance="bench"),
                      registry=CollectorRegistry())
    watcher.folders.start()
    try:
        started = time.perf_counter()
        done = await watcher.handle_unit(watcher.folders.roots[0] / unit.name)
        elapsed = time.perf_counter() - started
        assert done, "the unit was not handled"
        for _ in range(200):
            if announced >= len(list(source.iterdir())):
                break
            await asyncio.sleep(0.05)
    finally:
        watcher.folders.close()
        await bus.close()
        await db.close()
    shutil.rmtree(inbox)
    (work / "state.db").unlink()
    return elapsed, announced


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacsflow-bench-watcher-") as temp:
        work = Path(temp)
        source = work / "source"
        write_series(source, args.files, 64, 64, seed="watcher")
        watcher_times, dcmtk_times = [], []
        for round_number in range(1, args.rounds + 1):
            seconds, announced = await _watch_once(work, source)
            if announced != args.files:
                raise SystemExit(f"the watcher announced {announced} of {args.files} files")
            watcher_times.append(seconds)
            dcmtk_times.append(await _run_storescp(work, source, args.files))
            print(f"round {round_number}: watcher {seconds:.2f} s, "
                  f"storescu -> storescp {dcmtk_times[-1]:.2f} s", flush=True)
    watcher_s, dcmtk_s = statistics.median(watcher_times), statistics.median(dcmtk_times)
    print(f"\n{args.files} files of 10 kB, median of {args.rounds}:")
    print(f"  watcher (walk, validate, hash, ledger, file-ready): {watcher_s:6.2f} s "
          f"{args.files / watcher_s:8.0f} files/s")
    print(f"  DCMTK storescu -> storescp (one association):       {dcmtk_s:6.2f} s "
          f"{args.files / dcmtk_s:8.0f} files/s")
    print(f"  the watcher takes {watcher_s / dcmtk_s:.2f}x the time DCMTK needs to send them")


if __name__ == "__main__":
    asyncio.run(main())
