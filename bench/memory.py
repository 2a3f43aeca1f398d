"""Memory soak: many small files through watcher → uploader → router-scp; RSS over time.

Run from the repository root::

    .venv/bin/python -m bench.memory [--files 100000] [--unit-size 1000] [--mode rabbit]

The services run as separate processes on RabbitMQ and PostgreSQL (``--mode rabbit``, the
distributed deployment) or in one ``pacsflow run`` (``--mode embedded``). Import units of
``--unit-size`` small CT images (64x64, about 10 kB; one study each) are generated as the run
goes and moved into the watched folder, keeping ``--in-flight`` units on their way at a time;
each unit's series folder is checked at the router (every file, one data set byte for byte)
and deleted, so the disk holds only what is in flight (the watcher's archive stays).

The RSS of each service's process tree is sampled every ``--interval`` seconds. Reported per
service: the peak, the mean of each quarter of the run, and the growth from the second
quarter to the last (the first quarter holds start-up and the first allocations of every
code path; a leak of per-file objects keeps growing after it). Results are printed and
written to ``<output>/memory-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.datasets import write_series
from bench.paths import Pipeline, Setup, Target
from bench.support import ArrivalError, ProcessMonitor, dataset_bytes, received_files, verify_arrival

__all__ = ["SoakResult", "soak"]


@dataclass
class SoakResult:
    files: int
    seconds: float
    #: label -> peak / quarter means / growth, in MB
    services: dict[str, dict[str, Any]]
    samples: list[tuple[float, dict[str, int]]]

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "seconds": round(self.seconds, 1),
                "files_per_second": round(self.files / self.seconds, 1),
                "services": self.services,
                "samples": [{"t": round(t, 2), **{k: round(v / 2**20, 1) for k, v in p.items()}}
                            for t, p in self.samples]}  # fmt: skip


def _unit_sources(folder: Path) -> dict[str, Path]:
    return {dataset_bytes(path)[0]: path for path in folder.iterdir()}


def _quarters(samples: list[tuple[float, dict[str, int]]], label: str) -> dict[str, Any]:
    values = [point[label] for _, point in samples if point.get(label)]
    if len(values) < 8:
        raise RuntimeError(f"too few RSS samples of {label} ({len(values)}): a longer run is needed")
    size = len(values) // 4
    parts = [values[:size], values[size:2 * size], values[2 * size:3 * size], values[3 * size:]]
    means = [statistics.mean(part) / 2**20 for part in parts]
    return {
        "peak_mb": round(max(values) / 2**20, 1),
        "quarter_means_mb": [round(mean, 1) for mean in means],
        # Last quarter against the second: start-up and warm-up are behind both.
        "growth_mb": round(means[3] - means[1], 1),
        "last_vs_first_quarter_mb": round(means[3] - means[0], 1),
        "samples": len(values),
    }


async def soak(
    root: Path, files: int, unit_size: int = 1000, in_flight: int = 3, mode: str = "rabbit",
    interval: float = 0.5, setup: Setup | None = None, stall_timeout: float = 180.0,
    progress: bool = True,
) -> SoakResult:
    """Push ``files`` small files through the pipeline in units; RSS of each service over time."""
    units = -(-files // unit_size)
    sizes = [min(unit_size, files - index * unit_size) for index in range(units)]
    work = root / "soak"
    work.mkdir(parents=True)
    generated, staging = root / "generated", root / "staging"
    with ProcessMonitor(interval=interval) as monitor:
        # Studies complete (and leave the router's memory) as in production, a few seconds
        # after their last image; nothing consumes study-complete here.
        pipeline = Pipeline(Target(work, monitor, setup or Setup()), mode,
                            {"router": {"study_quiet_seconds": 2, "sweep_seconds": 1}})
        await pipeline.start()
        try:
            monitor.record_series = True
            started = time.monotonic()
            released: dict[int, dict[str, Path]] = {}
            done = arrived = 0
            next_unit = 0
            last_progress = time.monotonic()
            while done < units:
                while next_unit < units and next_unit - done < in_flight:
                    source = generated / f"unit-{next_unit:05d}"
                    await asyncio.to_thread(write_series, source, sizes[next_unit], 64, 64,
                                            f"memory-{next_unit}")  # fmt: skip
                    released[next_unit] = await asyncio.to_thread(_unit_sources, source)
                    unit = staging / f"#{next_unit}-Soak"
                    unit.mkdir(parents=True)
                    for path in source.iterdir():
                        os.link(path, unit / path.name)
                    pipeline.release(unit, unit.name)
                    next_unit += 1
                finished = await asyncio.to_thread(
                    _collect_finished, pipeline.out, released, sizes
                )  # fmt: skip
                for index in finished:
                    released.pop(index)
                    shutil.rmtree(generated / f"unit-{index:05d}")
                    done += 1
                    arrived += sizes[index]
                    last_progress = time.monotonic()
                if finished and progress:
                    print(f"  {arrived} of {files} files arrived, {time.monotonic() - started:.0f} s",
                          flush=True)  # fmt: skip
                if (failed := pipeline.failed_child()) is not None:
                    raise ArrivalError(f"{failed.args} exited with {failed.returncode}")
                if time.monotonic() - last_progress > stall_timeout:
                    raise ArrivalError(f"no unit finished for {stall_timeout:.0f} s; {arrived} of "
                                       f"{files} files arrived")  # fmt: skip
                await asyncio.sleep(0.2)
            seconds = time.monotonic() - started
            monitor.record_series = False
        finally:
            await pipeline.stop()
        samples = list(monitor.series)
    labels = [child.label for child in pipeline.children]
    return SoakResult(arrived, seconds, {label: _quarters(samples, label) for label in labels},
                      samples)  # fmt: skip


def _collect_finished(out: Path, released: dict[int, dict[str, Path]],
                      sizes: list[int]) -> list[int]:  # fmt: skip
    """Units whose series folder at the router is complete: checked, then deleted."""
    finished = []
    if not out.exists():
        return finished
    for series in [p for p in out.glob("*/*/*") if p.is_dir()]:
        names = [p for p in received_files(series)]
        if not names:
            continue
        uid, _ = dataset_bytes(names[0])
        index = next((i for i, sources in released.items() if uid in sources), None)
        if index is None:
            raise ArrivalError(f"{names[0]} holds SOP instance {uid}, which was never sent")
        if len(names) < sizes[index]:
            continue
        verify_arrival(series, sizes[index], released[index], compare=1)
        shutil.rmtree(series)
        finished.append(index)
    return finished


def _print(result: SoakResult) -> None:
    print(f"\n{result.files} files in {result.seconds:.1f} s "
          f"({result.files / result.seconds:.0f} files/s)")  # fmt: skip
    print(f"{'service':<14} {'peak MB':>8}  {'quarter means MB':<28} {'Q1→Q4':>7} {'Q2→Q4':>7}")
    for label, figures in result.services.items():
        means = " ".join(f"{m:6.1f}" for m in figures["quarter_means_mb"])
        print(f"{label:<14} {figures['peak_mb']:8.1f}  {means:<28} "
              f"{figures['last_vs_first_quarter_mb']:+7.1f} {figures['growth_mb']:+7.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--unit-size", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=3, help="units on their way at once")
    parser.add_argument("--mode", choices=["rabbit", "embedded"], default="rabbit")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--output", type=Path, default=Path("bench-results"))
    parser.add_argument("--folder", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument("--rabbit-url", default=os.environ.get(
        "PACSFLOW_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--pg-dsn", default=os.environ.get(
        "PACSFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args(argv)
    setup = Setup(rabbit_url=args.rabbit_url, pg_admin_dsn=args.pg_dsn)
    with tempfile.TemporaryDirectory(prefix="pacsflow-soak-", dir=args.folder) as temp:
        result = asyncio.run(soak(Path(temp), args.files, args.unit_size, args.in_flight,
                                  args.mode, args.interval, setup))  # fmt: skip
    _print(result)
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"memory-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"mode": args.mode, "unit_size": args.unit_size,
                                **result.as_dict()}, indent=1) + "\n")  # fmt: skip
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
