"""Benchmark: harvesting a study from Orthanc into the router, against C-MOVE to DCMTK storescp.

Run from the repository root::

    .venv/bin/python -m bench.harvester [--rounds 5] [--dataset large] [--rate 6000]
                                        [--router process|in-process]

The study of :data:`bench.datasets.DATASETS` (``large``: 500 CT images of 512x512, about
0.5 MB each) is generated, stored into one Orthanc (``storescu``, once) and then, each round
and in alternating order:

* **DCMTK**: ``movescu`` asks Orthanc to C-MOVE the study to DCMTK ``storescp``;
* **movescu into the router**: the same C-MOVE to the router, asked for by ``movescu``: it
  tells the router's share of the difference from the harvester's;
* **harvester**: a harvester (this process, SQLite state, the memory bus) harvests the patient
  into the router: study and series queries, one series-level C-MOVE, the image-level C-FIND
  that checks every instance arrived. Two times are reported: the whole harvest (from the
  start until the series is verified complete) and the retrieval alone (claim to verified,
  as the state store records it).

The router runs as its own process (``pacsflow router-scp``, as in the distributed
deployment and as storescp does), or with ``--router in-process`` in the harvester's process,
as the embedded deployment runs every service (the router's receiving threads and the
harvester then share one interpreter).

Both targets write to the page cache (no fsync). ``TCP_NODELAY=1`` for DCMTK and Orthanc. The
ratio is DCMTK time / harvester time (1.0: as fast as DCMTK). The harvester's request budget
is ``--rate`` per minute (default 6000): at the 700 a fragile PACS may want, the pacing of
the four requests of a one-series harvest adds about a quarter of a second, which would
measure the politeness setting, not the transfer. Patient archives are off (a zip of 263 MB is another measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import pydicom
import yaml
from pacsflow.bus import MemoryBus
from pacsflow.config import load_settings
from pacsflow.events import Source
from pacsflow.store import SqliteDatabase, upgrade
from prometheus_client import CollectorRegistry

from bench.datasets import DATASETS, write_dataset
from tests.peers import OrthancProcess, free_port, wait_for_port

ENV = {**os.environ, "TCP_NODELAY": "1"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        sys.exit(f"{name} is not installed (Debian package dcmtk)")
    return path


def _count_files(folder: Path) -> int:
    return sum(1 for path in folder.rglob("*") if path.is_file() and not path.name.startswith("."))


async def _run(*command: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({process.returncode}): {err.decode()[-2000:]}")


async def _movescu(pacs: OrthancProcess, destination: str, study: str) -> float:
    started = time.perf_counter()
    await _run(
        _tool("movescu"), "-S", "-aet", "BENCHSCU", "-aec", pacs.ae_title, "-aem", destination,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
        "127.0.0.1", str(pacs.dicom_port),
    )  # fmt: skip
    return time.perf_counter() - started


async def _movescu_router_round(pacs: OrthancProcess, out: Path, study: str, count: int) -> float:
    elapsed = await _movescu(pacs, "PACSFLOW", study)
    arrived = _count_files(out)
    if arrived != count:
        raise RuntimeError(f"router: {arrived} of {count} files arrived")
    shutil.rmtree(out)
    return elapsed


def _start_storescp(out: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [_tool("storescp"), "+xa", "-aet", "STORESCP", "-od", str(out), str(port)],
            env=ENV, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def _dcmtk_round(
    work: Path, pacs: OrthancProcess, port: int, study: str, count: int
) -> float:
    out = work / "storescp-out"
    out.mkdir()
    scp = _start_storescp(out, port, work / "storescp.log")
    try:
        await asyncio.to_thread(wait_for_port, port, scp)
        elapsed = await _movescu(pacs, "STORESCP", study)
    finally:
        scp.terminate()
        await asyncio.to_thread(scp.wait, 10)
    arrived = _count_files(out)
    if arrived != count:
        raise RuntimeError(f"storescp: {arrived} of {count} files arrived")
    shutil.rmtree(out)
    return elapsed


class _RouterProcess:
    """``pacsflow router-scp`` as a child process, filing into ``out``."""

    def __init__(self, work: Path, port: int, out: Path) -> None:
        self.config = work / "router.yaml"
        self.config.write_text(yaml.safe_dump({
            "instance": "bench-router",
            "state": {"backend": "sqlite", "path": str(work / "router.db")},
            "http": {"host": "127.0.0.1", "port": 0},
            "logging": {"level": "WARNING", "format": "text"},
            "router": {"port": port, "host": "127.0.0.1", "ae_title": "PACSFLOW",
                       "routes": {"PACSFLOW": {"path": str(out)}}, "study_quiet_seconds": 60},
        }))  # fmt: skip
        self.port = port
        self.log = work / "router.log"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacsflow", "router-scp", "-c", str(self.config)],
                env=ENV, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for_port(self.port, self.process, timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(15)


async def _harvest_round(
    work: Path,
    pacs: OrthancProcess,
    router_port: int,
    out: Path,
    patient_id: str,
    count: int,
    rate: int,
    in_process: bool,
) -> tuple[float, float]:
    from pacsflow_harvester.harvester import Harvester
    from pacsflow_router.router import Router

    settings = load_settings(
        None,
        instance="bench",
        state={"backend": "sqlite", "path": str(work / "harvest.db")},
        logging={"level": "WARNING"},
        nodes={"pacs": {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}},
        uploader={"destinations": ["pacs"]},
        router={
            "port": router_port,
            "host": "127.0.0.1",
            "ae_title": "PACSFLOW",
            "routes": {"PACSFLOW": {"path": str(out)}},
            "study_quiet_seconds": 60,
        },
        harvester={
            "source": "pacs",
            "criteria": {"patient_ids": [patient_id]},
            "requests_per_minute": rate,
            "workers": 1,
            "archive": False,
        },
    )
    db = await SqliteDatabase.open(work / "harvest.db")
    bus = MemoryBus()
    await bus.start()
    await upgrade(db)
    source = Source(service="bench", instance="bench")
    router: Router | None = None
    if in_process:
        router_db = await SqliteDatabase.open(work / "router-in.db")
        await upgrade(router_db)
        router = Router(settings, db=router_db, bus=bus, registry=CollectorRegistry(),
                        source=source)  # fmt: skip
        await router.start()
    harvester = Harvester(settings, db=db, bus=bus, registry=CollectorRegistry(), source=source)
    task: asyncio.Task[None] | None = None
    try:
        started = time.perf_counter()
        task = asyncio.create_task(harvester.run())
        while True:
            row = await db.fetchrow(
                "SELECT status, started_at, completed_at FROM harvest_series"
                " WHERE status IN ('complete', 'failed')"
            )
            if row is not None:
                break
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        if row["status"] != "complete":
            raise RuntimeError("the harvester failed the series")
        retrieval = row["completed_at"] - row["started_at"]
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if router is not None:
            await router.stop()
            await router_db.close()
        await bus.close()
        await db.close()
    arrived = _count_files(out)
    if arrived != count:
        raise RuntimeError(f"router: {arrived} of {count} files arrived")
    shutil.rmtree(out)
    return elapsed, retrieval


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="large")
    parser.add_argument("--rate", type=int, default=6000, help="harvester requests per minute")
    parser.add_argument("--router", choices=["process", "in-process"], default="process")
    args = parser.parse_args()
    count = DATASETS[args.dataset][0]
    in_process = args.router == "in-process"
    with tempfile.TemporaryDirectory(prefix="pacsflow-bench-") as temp:
        root = Path(temp)
        source = root / "source"
        paths = write_dataset(source, args.dataset)
        header = pydicom.dcmread(paths[0], stop_before_pixels=True)
        size = sum(path.stat().st_size for path in paths) / len(paths)
        scp_port, router_port = free_port(), free_port()
        out = root / "router-out"
        modalities = {
            "storescp": ("STORESCP", "127.0.0.1", scp_port),
            "router": ("PACSFLOW", "127.0.0.1", router_port),
        }
        with contextlib.ExitStack() as stack:
            pacs = stack.enter_context(OrthancProcess(root / "orthanc", modalities=modalities))
            if not in_process:
                stack.enter_context(_RouterProcess(root, router_port, out))
            await _run(_tool("storescu"), "+sd", "-aec", pacs.ae_title,
                       "127.0.0.1", str(pacs.dicom_port), str(source))  # fmt: skip
            if pacs.instance_count() != count:
                raise RuntimeError(f"Orthanc holds {pacs.instance_count()} of {count} images")
            dcmtk: list[float] = []
            whole: list[float] = []
            retrieval: list[float] = []
            into_router: list[float] = []
            for round_number in range(args.rounds):
                work = root / f"round-{round_number}"
                work.mkdir()
                order = ["dcmtk", "harvester", "movescu-router"]
                if round_number % 2:
                    order.reverse()
                for which in order:
                    if which == "movescu-router":
                        if not in_process:
                            into_router.append(await _movescu_router_round(
                                pacs, out, header.StudyInstanceUID, count))  # fmt: skip
                    elif which == "dcmtk":
                        dcmtk.append(await _dcmtk_round(
                            work, pacs, scp_port, header.StudyInstanceUID, count))  # fmt: skip
                    else:
                        total, moved = await _harvest_round(
                            work, pacs, router_port, out, header.PatientID, count, args.rate,
                            in_process,
                        )  # fmt: skip
                        whole.append(total)
                        retrieval.append(moved)
                print(
                    f"  round {round_number + 1}: movescu->storescp {count / dcmtk[-1]:6.0f} img/s,"
                    f" harvest {count / whole[-1]:6.0f} img/s"
                    f" (retrieval {count / retrieval[-1]:6.0f} img/s)",
                    flush=True,
                )
                shutil.rmtree(work)
        reference = statistics.median(dcmtk)
        total = statistics.median(whole)
        moved = statistics.median(retrieval)
        print(
            f"{args.dataset}: {count} x {size / 1e6:.2f} MB from Orthanc, router {args.router}:"
            f" movescu->storescp {count / reference:.0f} img/s,"
            f" harvester->router {count / total:.0f} img/s (ratio {reference / total:.2f}),"
            f" retrieval alone {count / moved:.0f} img/s (ratio {reference / moved:.2f})",
            flush=True,
        )
        if into_router:
            # The same C-MOVE into the same router, asked for by DCMTK: what the destination
            # costs, apart from the harvester.
            direct = statistics.median(into_router)
            print(
                f"  movescu->router {count / direct:.0f} img/s (ratio {reference / direct:.2f});"
                f" harvester / movescu into the router: {direct / total:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    asyncio.run(main())
