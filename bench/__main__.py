"""``python -m bench`` (``make bench``): pacsflow against DCMTK and Orthanc, in one run.

Generates the data sets deterministically into a temporary folder (500 CT images of about
0.5 MB, 2,000 of about 10 kB), reads them once so they are in the page cache, then runs each
round every chosen path once, in a fixed order with the references first (DCMTK ``storescu →
storescp``, ``TCP_NODELAY=1``; Orthanc C-MOVE → ``storescp`` for the C-MOVE path). Each clock
starts right after twice the data set's size of memory was written and freed, so that every
receiver writes into pages the machine already has (see ``warm_memory``). For each
data set and path it reports the median over the rounds: images/s, MB/s, the ratio to its
reference (time of the reference / time of the path: higher is faster), and per process the
CPU seconds inside the measured window (median) and the peak RSS (largest of the rounds).
The event pipeline's cost is the end-to-end time over the bare transfer (the uploader's
sender pool into the same router, no watcher, ledger or events), as a percentage.

After every run the receiver must hold every file, and data sets are compared byte for byte
with their sources; a run that lost a file stops the benchmark with exit code 1. Results are
printed and written to ``<output>/<timestamp>.json`` and ``.md``. ``--profile`` records py-spy
profiles of the pacsflow processes during one extra run of a path (not counted in the
figures) and lists where their samples went.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.datasets import DATASETS, write_series
from bench.paths import PATHS, BenchData, RunResult, Setup, Target
from bench.profiles import hot_spots
from bench.support import ENV, ProcessMonitor, free_port, run_tool, tool
from pacsflow_uploader.uploader import default_associations, default_processes

#: Targets of the project, ratio to the reference (large, small); "pipeline" is a ceiling.
TARGETS: dict[str, tuple[float, float]] = {
    "uploader": (1.0, 0.7),
    "router": (0.8, 0.6),
    "e2e": (0.7, 0.5),
}
PIPELINE_COST_CEILING = 0.10
# The pipeline path that keeps no record (bench.volatile_queue): what the ledger costs.
COMPARISON_ONLY = "uploader-volatile"


@dataclass
class PathFigures:
    """All rounds of one path on one data set."""

    runs: list[RunResult] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(run.seconds for run in self.runs)

    def processes(self) -> dict[str, dict[str, float]]:
        labels: list[str] = []
        for run in self.runs:
            labels += [label for label in run.processes if label not in labels]
        summary = {}
        for label in labels:
            measured = [run.processes[label] for run in self.runs if label in run.processes]
            summary[label] = {
                "cpu_seconds": round(statistics.median(m.cpu_seconds for m in measured), 3),
                "peak_rss_mb": round(max(m.peak_rss_bytes for m in measured) / 2**20, 1),
                "processes": max(m.processes for m in measured),
            }
        return summary


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS),
                        help="paths to run (the references of the chosen ones are added)")
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS),
                        default=["large", "small"])  # fmt: skip
    parser.add_argument("--large-images", type=int, default=DATASETS["large"][0],
                        help="images in the large data set (512x512)")
    parser.add_argument("--small-images", type=int, default=DATASETS["small"][0],
                        help="images in the small data set (64x64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("bench-results"),
                        help="folder for <timestamp>.json and .md")
    parser.add_argument(
        "--folder", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where the temporary folder goes (default: memory, so disk write-back of one run "
        "does not slow the next)",
    )  # fmt: skip
    # The uploader's own defaults (uploader.associations: 0, uploader.processes: unset), so
    # the table shows what an installation gets without tuning.
    parser.add_argument("--associations", type=int, default=default_associations(),
                        help="associations of the uploader and of pacsflow send")
    parser.add_argument("--sender-processes", type=int, default=None,
                        help="sender processes of the uploader and of pacsflow send "
                        "(default: the uploader's, one per core up to one per association)")
    parser.add_argument("--router-processes", type=int, default=1, help="router.processes")
    parser.add_argument("--operations-window", type=int, default=8,
                        help="C-STOREs outstanding per association from pacsflow to its own "
                        "router-scp (the router node's operations_window; 1: one at a time)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take")
    parser.add_argument("--profile", choices=["py-spy"], default=None,
                        help="record profiles of the pacsflow processes in an extra run")
    parser.add_argument("--profile-path", choices=["e2e", "uploader-rabbit", "embedded", "router"],
                        default="e2e",
                        help="the path the profiled run takes")
    parser.add_argument("--rabbit-url",
                        default=os.environ.get("PACSFLOW_TEST_AMQP",
                                               "amqp://guest:guest@127.0.0.1:5672/"))  # fmt: skip
    parser.add_argument("--pg-dsn",
                        default=os.environ.get("PACSFLOW_TEST_PG",
                                               "postgresql://postgres@127.0.0.1:5432/test"),
                        help="an administrative connection; a database is created per run")  # fmt: skip
    args = parser.parse_args(argv)
    chosen = set(args.paths) | {PATHS[key].reference for key in args.paths}
    if args.profile:
        chosen.add(args.profile_path)
    args.paths = [key for key in PATHS if key in chosen]
    return args


def _generate(name: str, images: int, folder: Path) -> BenchData:
    _, rows, columns = DATASETS[name]
    paths = write_series(folder, images, rows, columns, seed=name)
    for path in paths:  # into the page cache
        path.read_bytes()
    return BenchData.load(name, folder)


async def _load_orthanc(data: BenchData, root: Path) -> Any:
    from tests.peers import OrthancProcess

    data.ports = {"storescp": free_port(), "router": free_port()}
    orthanc = OrthancProcess(root / f"orthanc-{data.name}", modalities={
        "storescp": ("STORESCP", "127.0.0.1", data.ports["storescp"]),
        "router": ("PACSFLOW", "127.0.0.1", data.ports["router"]),
    })  # fmt: skip
    await asyncio.to_thread(orthanc.start)
    await run_tool([tool("storescu"), "-aec", orthanc.ae_title, "+sd", "127.0.0.1",
                    str(orthanc.dicom_port), str(data.folder)],
                   root / f"orthanc-{data.name}-load.log")  # fmt: skip
    held = orthanc.instance_count()
    if held != data.count:
        orthanc.stop()
        raise RuntimeError(f"Orthanc holds {held} of {data.count} images")
    data.orthanc = orthanc
    return orthanc


async def _run_once(key: str, data: BenchData, work: Path, setup: Setup,
                    profile: bool = False) -> RunResult:  # fmt: skip
    work.mkdir(parents=True)
    with ProcessMonitor() as monitor:
        target = Target(work, monitor, setup, profile=profile)
        result = await PATHS[key].run(target, data)
        result.profiles = target.profiles
    return result


def _dcmtk_version() -> str:
    try:
        output = subprocess.run([tool("storescu"), "--version"], capture_output=True, text=True,
                                env=ENV, timeout=10).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return next((line.strip() for line in output.splitlines() if "OFFIS" in line or "$dcmtk" in line),
                output.strip().splitlines()[0] if output.strip() else "unknown")  # fmt: skip


def _summary(args: argparse.Namespace, datasets: dict[str, BenchData],
             figures: dict[str, dict[str, PathFigures]]) -> dict[str, Any]:  # fmt: skip
    results = []
    costs = []
    for name, by_path in figures.items():
        data = datasets[name]
        for key, measured in by_path.items():
            if not measured.runs:
                continue
            spec = PATHS[key]
            median = measured.median
            reference = by_path.get(spec.reference)
            ratio = (reference.median / median) if reference and reference.runs else None
            dcmtk = by_path.get("dcmtk")
            target = TARGETS.get(key)
            wanted = None if target is None else target[0 if name == "large" else 1]
            results.append({
                "dataset": name, "path": key, "label": spec.label, "reference": spec.reference,
                "rounds": [round(run.seconds, 4) for run in measured.runs],
                "median_seconds": round(median, 4),
                "images_per_second": round(data.count / median, 1),
                "mb_per_second": round(data.total_bytes / 1e6 / median, 1),
                "ratio": None if ratio is None else round(ratio, 3),
                "ratio_to_dcmtk": (round(dcmtk.median / median, 3)
                                   if dcmtk and dcmtk.runs else None),
                "target": wanted, "met": None if wanted is None or ratio is None else ratio >= wanted,
                "processes": measured.processes(),
                "verified": measured.runs[-1].verified,
                "milestones": {name: round(statistics.median(run.milestones[name]
                                                             for run in measured.runs), 4)
                               for name in measured.runs[-1].milestones},
            })  # fmt: skip
        bare = by_path.get("send")
        for key in ("uploader-rabbit", "uploader-volatile", "e2e", "embedded"):
            pipeline = by_path.get(key)
            if bare and bare.runs and pipeline and pipeline.runs:
                cost = pipeline.median / bare.median - 1
                costs.append({
                    "dataset": name, "path": key, "bare": "send",
                    "pipeline_seconds": round(pipeline.median, 4),
                    "bare_seconds": round(bare.median, 4),
                    "cost_percent": round(100 * cost, 1),
                    "ceiling_percent": 100 * PIPELINE_COST_CEILING,
                    # The volatile path records nothing: a comparison, held to no goal.
                    "met": None if key == COMPARISON_ONLY else cost <= PIPELINE_COST_CEILING,
                })  # fmt: skip
    return {
        "started": args.started,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "dcmtk": _dcmtk_version()},
        "options": {"rounds": args.rounds, "paths": args.paths, "associations": args.associations,
                    "sender_processes": args.sender_processes,
                    "router_processes": args.router_processes,
                    "operations_window": args.operations_window, "folder": args.folder},
        "datasets": {name: {"images": d.count, "total_bytes": d.total_bytes,
                            "mean_kb": round(d.total_bytes / d.count / 1000, 1)}
                     for name, d in datasets.items()},
        "clocks": {key: PATHS[key].clock for key in args.paths},
        "ratio": "reference time / path time (1.00: as fast as the reference; higher is faster)",
        "cpu_and_memory": "per process tree (a service with its sender processes): CPU seconds "
                          "inside the measured window (median of the rounds), peak RSS sampled "
                          "every 50 ms (largest of the rounds); DCMTK tools as the kernel "
                          "accounted them (wait4)",
        "results": results,
        "pipeline_cost": costs,
    }  # fmt: skip


def _held_to(met: bool | None) -> str:
    if met is None:
        return " — for comparison: records nothing"
    return "" if met else " — over the ceiling"


def _process_text(processes: dict[str, dict[str, float]]) -> str:
    return "; ".join(f"{label} {p['cpu_seconds']:.2f} s / {p['peak_rss_mb']:.0f} MB"
                     for label, p in processes.items())  # fmt: skip


def _markdown(summary: dict[str, Any]) -> str:
    lines = [f"# pacsflow benchmark {summary['started']}", ""]
    machine = summary["machine"]
    lines += [f"{machine['cpus']} CPUs, Python {machine['python']}, {machine['dcmtk']}; "
              f"options {json.dumps(summary['options'])}.", ""]  # fmt: skip
    lines += ["Data sets: " + ", ".join(f"{name} {d['images']} × {d['mean_kb']} kB"
                                        for name, d in summary["datasets"].items()), ""]  # fmt: skip
    lines += ["| data set | path | img/s | MB/s | ratio | target | CPU s / peak RSS per process |",
              "|---|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for row in summary["results"]:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}×"
        if row["reference"] != "dcmtk" and row["ratio_to_dcmtk"] is not None:
            ratio += f" (vs DCMTK {row['ratio_to_dcmtk']:.2f}×)"
        target = "" if row["target"] is None else (
            f"≥{row['target']:.1f}× {'met' if row['met'] else 'missed'}")
        lines.append(f"| {row['dataset']} | {row['label']} | {row['images_per_second']:.0f} | "
                     f"{row['mb_per_second']:.1f} | {ratio} | {target} | "
                     f"{_process_text(row['processes'])} |")  # fmt: skip
    if summary["pipeline_cost"]:
        lines += ["", "Event pipeline cost (end to end over the bare transfer, ceiling "
                      f"{PIPELINE_COST_CEILING:.0%}):", ""]  # fmt: skip
        for cost in summary["pipeline_cost"]:
            lines.append(f"- {cost['dataset']}, {cost['path']}: {cost['cost_percent']:+.1f} % "
                         f"({cost['pipeline_seconds']:.3f} s vs {cost['bare_seconds']:.3f} s)"
                         f"{_held_to(cost['met'])}")  # fmt: skip
    lines += ["", "What each clock measures:", ""]
    lines += [f"- **{key}**: {clock}" for key, clock in summary["clocks"].items()]
    lines += ["", f"Ratio: {summary['ratio']}. CPU and memory: {summary['cpu_and_memory']}."]
    if summary.get("profiles"):
        lines += ["", "## Profiles (py-spy)", ""]
        for spots in summary["profiles"]:
            lines += [f"`{spots['profile']}`: {spots['samples']} samples", "",
                      "| self time | share |", "|---|---:|"]  # fmt: skip
            lines += [f"| `{s['function']}` | {s['share']:.1%} |" for s in spots["self"]]
            lines += ["", "| pacsflow function, with what it calls | share |", "|---|---:|"]
            lines += [f"| `{s['function']}` | {s['share']:.1%} |" for s in spots["pacsflow_total"]]
            lines.append("")
    if summary.get("error"):
        lines += ["", f"**The run failed:** {summary['error']}"]
    return "\n".join(lines) + "\n"


def _print_table(summary: dict[str, Any]) -> None:
    print()
    print(f"{'data set':<8} {'path':<58} {'img/s':>7} {'MB/s':>7} {'ratio':>6}  processes "
          "(CPU s / peak RSS)")  # fmt: skip
    for row in summary["results"]:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(f"{row['dataset']:<8} {row['label']:<58} {row['images_per_second']:7.0f} "
              f"{row['mb_per_second']:7.1f} {ratio:>6}  {_process_text(row['processes'])}")  # fmt: skip
        if row["milestones"]:
            print(f"{'':<8}   " + ", ".join(f"{name.replace('_', ' ')} {seconds:.2f}"
                                            for name, seconds in row["milestones"].items()))  # fmt: skip
    for cost in summary["pipeline_cost"]:
        print(f"event pipeline cost, {cost['dataset']}, {cost['path']}: "
              f"{cost['cost_percent']:+.1f} % over the bare transfer")  # fmt: skip


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.sender_processes is None:
        args.sender_processes = default_processes(args.associations)
    setup = Setup(
        associations=args.associations, sender_processes=args.sender_processes,
        router_processes=args.router_processes, operations_window=args.operations_window,
        timeout=args.timeout,
        rabbit_url=args.rabbit_url, pg_admin_dsn=args.pg_dsn,
        profile_folder=args.output.resolve() / f"{args.started}-profiles" if args.profile else None,
    )  # fmt: skip
    if setup.profile_folder is not None:
        setup.profile_folder.mkdir(parents=True, exist_ok=True)
    datasets: dict[str, BenchData] = {}
    figures: dict[str, dict[str, PathFigures]] = {}
    profiles: list[dict[str, Any]] = []
    error = None
    work: Path | None = None
    images = {"large": args.large_images, "small": args.small_images}
    with tempfile.TemporaryDirectory(prefix="pacsflow-bench-", dir=args.folder) as temp:
        root = Path(temp)
        try:
            for name in args.datasets:
                data = datasets[name] = _generate(name, images[name], root / f"{name}-source")
                print(f"{name}: {data.count} images, {data.total_bytes / data.count / 1000:.1f} kB"
                      " each", flush=True)  # fmt: skip
                figures[name] = {key: PathFigures() for key in args.paths}
                if any(PATHS[key].orthanc for key in args.paths):
                    await _load_orthanc(data, root)
                try:
                    for round_number in range(args.rounds):
                        for key in args.paths:
                            work = root / f"{name}-{round_number}-{key}"
                            result = await _run_once(key, data, work, setup)
                            figures[name][key].runs.append(result)
                            print(f"  round {round_number + 1} {key:<17} {result.seconds:8.3f} s"
                                  f" {data.count / result.seconds:7.0f} img/s", flush=True)
                            shutil.rmtree(work, ignore_errors=True)
                    if args.profile:
                        work = root / f"{name}-profile-{args.profile_path}"
                        result = await _run_once(args.profile_path, data, work, setup,
                                                 profile=True)  # fmt: skip
                        for path in result.profiles:
                            if Path(path).exists():
                                profiles.append(hot_spots(Path(path)))
                        shutil.rmtree(work, ignore_errors=True)
                finally:
                    if data.orthanc is not None:
                        await asyncio.to_thread(data.orthanc.stop)
                shutil.rmtree(data.folder)
        except Exception as err:  # noqa: BLE001 - reported with the figures so far, exit 1
            traceback.print_exc()
            error = f"{type(err).__name__}: {err}"
            if work is not None and work.exists():
                # The failed run's logs outlive the temporary folder.
                kept = args.output / f"{args.started}-failed"
                shutil.copytree(work, kept, ignore=shutil.ignore_patterns("*-out", "inbox",
                                "archive", "staging", "*.db*"), dirs_exist_ok=True)  # fmt: skip
                error += f" (logs in {kept})"
    summary = _summary(args, datasets, figures)
    summary["profiles"] = profiles
    summary["error"] = error
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    args.started = datetime.now().strftime("%Y%m%d-%H%M%S")
    args.output.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    summary = asyncio.run(_bench(args))
    summary["wall_seconds"] = round(time.monotonic() - began, 1)
    _print_table(summary)
    base = args.output / args.started
    base.with_suffix(".json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    base.with_suffix(".md").write_text(_markdown(summary))
    print(f"\nwritten: {base}.json, {base}.md")
    if summary["error"]:
        print(f"the benchmark failed: {summary['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
