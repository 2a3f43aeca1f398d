"""Benchmark: DCMTK ``storescu`` into the router, against ``storescu`` into DCMTK ``storescp``.

Run from the repository root::

    .venv/bin/python -m bench.router [--rounds 3] [--datasets large small] [--processes 1]
                                     [--engines asyncio lean]

Both data sets of perf-notes.md (500 images of 512x512, about 0.5 MB each; 2,000 of 64x64,
about 10 kB) are generated deterministically into a temporary folder. Each round sends each
data set once to ``storescp`` and once to the router per engine (``dicom.engine``: asyncio,
lean), in an order that turns every round, one association each (``storescu +sd``), with ``TCP_NODELAY=1`` for DCMTK. The router runs in this process as the
service does (SQLite state, the in-memory bus, study flushes and sweeps running). After
every run each image is checked to have arrived; the median img/s per target and the ratio
router / storescp are printed. Output goes to the page cache (no fsync), as for storescp.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pacsflow.bus import MemoryBus
from pacsflow.config import load_settings
from pacsflow.events import Source
from pacsflow.store import SqliteDatabase, upgrade
from prometheus_client import CollectorRegistry

from bench.datasets import DATASETS, write_dataset

ENV = {**os.environ, "TCP_NODELAY": "1"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        sys.exit(f"{name} is not installed (Debian package dcmtk)")
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _storescu(port: int, called: str, folder: Path) -> float:
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        _tool("storescu"), "-aec", called, "+sd", "127.0.0.1", str(port), str(folder),
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await process.communicate()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"storescu failed ({process.returncode}): {err.decode()[-2000:]}")
    return elapsed


def _count_files(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))


def _start_storescp(out: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as output:
        return subprocess.Popen(
            [_tool("storescp"), "+xa", "-aet", "STORESCP", "-od", str(out), str(port)],
            env=ENV, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def _run_storescp(work: Path, source: Path, expected: int) -> float:
    out = work / "storescp-out"
    out.mkdir()
    port = _free_port()
    process = _start_storescp(out, port, work / "storescp.log")
    try:
        await _wait_port(port)
        elapsed = await _storescu(port, "STORESCP", source)
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 10)
    arrived = _count_files(out)
    if arrived != expected:
        raise RuntimeError(f"storescp: {arrived} of {expected} files arrived")
    shutil.rmtree(out)
    return elapsed


async def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


async def _run_router(
    work: Path, source: Path, expected: int, processes: int, engine: str = "asyncio"
) -> float:
    from pacsflow_router.router import Router

    out = work / "router-out"
    settings = load_settings(
        None,
        state={"backend": "sqlite", "path": str(work / "state.db")},
        logging={"level": "WARNING"},
        dicom={"engine": engine},
        router={
            "port": 0,
            "host": "127.0.0.1",
            "processes": processes,
            "routes": {"BENCH": {"path": str(out)}},
            "study_quiet_seconds": 60,
        },
    )
    db = await SqliteDatabase.open(work / "state.db")
    await upgrade(db)
    bus = MemoryBus()
    await bus.start()
    router = Router(
        settings,
        db=db,
        bus=bus,
        registry=CollectorRegistry(),
        source=Source(service="router-scp", instance="bench"),
    )
    try:
        await router.start()
        elapsed = await _storescu(router.port, "BENCH", source)
    finally:
        await router.stop()
        await bus.close()
        await db.close()
    arrived = _count_files(out)
    if arrived != expected:
        raise RuntimeError(f"router: {arrived} of {expected} files arrived")
    shutil.rmtree(out)
    (work / "state.db").unlink()
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--datasets", nargs="+", choices=sorted(DATASETS), default=["large", "small"]
    )
    parser.add_argument("--processes", type=int, default=1, help="router.processes")
    parser.add_argument(
        "--engines", nargs="+", choices=["asyncio", "lean"], default=["asyncio", "lean"]
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacsflow-bench-") as temp:
        root = Path(temp)
        for name in args.datasets:
            count = DATASETS[name][0]
            source = root / f"{name}-source"
            paths = write_dataset(source, name)
            size = sum(path.stat().st_size for path in paths) / len(paths)
            times: dict[str, list[float]] = {"storescp": []}
            times.update({engine: [] for engine in args.engines})
            for round_number in range(args.rounds):
                work = root / f"{name}-{round_number}"
                work.mkdir()
                # The order turns every round: a run that follows another one's writes
                # shares the disk with their write-back.
                targets = ["storescp", *args.engines]
                shift = round_number % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    if target == "storescp":
                        times[target].append(await _run_storescp(work, source, count))
                    else:
                        times[target].append(
                            await _run_router(work, source, count, args.processes, target)
                        )
                print(
                    f"  {name} round {round_number + 1}: "
                    + ", ".join(f"{key} {count / value[-1]:7.0f}" for key, value in times.items())
                    + " img/s",
                    flush=True,
                )
                shutil.rmtree(work)
            dcmtk = statistics.median(times["storescp"])
            summary = "  ".join(
                f"router/{engine} {count / statistics.median(times[engine]):.0f} img/s"
                f" ratio {dcmtk / statistics.median(times[engine]):.2f}"
                for engine in args.engines
            )
            print(
                f"{name}: {count} x {size / 1000:.1f} kB  storescp {count / dcmtk:.0f} img/s"
                f"  {summary}",
                flush=True,
            )
            shutil.rmtree(source)


if __name__ == "__main__":
    asyncio.run(main())
