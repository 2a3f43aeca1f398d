"""What ``pacsflow harvest`` shows and does: the harvest's state, failures, retries, rescans.

Everything is read from (or written to) the state store, so it works while harvesters run,
from any machine that reaches the store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from pacsflow.config import Settings
from pacsflow.store import Database

from pacsflow_harvester.state import (
    PATIENT_STATES,
    SERIES_STATES,
    STUDY_STATES,
    HarvestState,
)

__all__ = ["collect_status", "progress_bar", "render_status", "show_failures"]

_BAR_WIDTH = 30


def progress_bar(done: int, total: int, width: int = _BAR_WIDTH) -> str:
    """``[#########.........]  33 %`` (ASCII, so it reads the same in any terminal or log)."""
    fraction = done / total if total else 0.0
    filled = min(width, int(fraction * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f} %"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1000
    return f"{value:.1f} TB"


async def collect_status(db: Database, settings: Settings) -> dict[str, Any]:
    """The harvest's state as plain data (the ``--json`` output)."""
    state = HarvestState(db)
    counts = await state.counts()
    totals = await state.totals()
    harvester = settings.harvester
    series = counts["series"]
    wanted = sum(n for status, n in series.items() if status != "excluded")
    return {
        "source": harvester.source,
        "method": harvester.method,
        "destination_ae": harvester.destination_ae or settings.router.ae_title,
        "requests_per_minute": harvester.requests_per_minute,
        "patients": counts["patients"],
        "studies": counts["studies"],
        "series": series,
        "series_wanted": wanted,
        "series_complete": series.get("complete", 0),
        **totals,
    }


def _states(counts: dict[str, int], order: Sequence[str]) -> str:
    parts = [f"{status} {counts[status]}" for status in order if counts.get(status)]
    parts += [f"{status} {n}" for status, n in sorted(counts.items()) if status not in order and n]
    return ", ".join(parts) or "none"


def render_status(report: dict[str, Any], out: TextIO) -> None:
    """The human-readable status."""
    how = f"C-MOVE to {report['destination_ae']}" if report["method"] == "move" else "C-GET"
    print(f"harvest from {report['source'] or '(no source configured)'}, {how}, "
          f"at most {report['requests_per_minute']} requests/min", file=out)  # fmt: skip
    scan = report.get("scan")
    if scan:
        when = (
            datetime.fromtimestamp(scan["done_at"], UTC).isoformat(timespec="seconds")
            if scan.get("done_at")
            else "not yet"
        )
        found = scan.get("found")
        print(f"  scan      {scan['status']}, last done {when}"
              + (f", {found} patient(s) taken" if found is not None else ""), file=out)  # fmt: skip
    for label, key, order in (
        ("patients", "patients", PATIENT_STATES),
        ("studies", "studies", STUDY_STATES),
        ("series", "series", SERIES_STATES),
    ):
        counts = report[key]
        print(f"  {label:<9} {sum(counts.values()):>6}  {_states(counts, order)}", file=out)
    done, total = report["series_complete"], report["series_wanted"]
    print(f"  progress  {progress_bar(done, total)}  {done} of {total} series", file=out)
    print(f"  instances {report['instances']} of {report['expected_instances']} "
          f"({_size(report['bytes'])}), {report['refetched']} re-fetched", file=out)  # fmt: skip
    listed = sum(report["patients"].values())
    print(f"  archives  {report['archives_current']} of {listed} patient(s) up to date "
          f"({report['archives_built']} built)", file=out)  # fmt: skip
    failed = sum(report[key].get("failed", 0) for key in ("patients", "studies", "series"))
    if failed:
        print(f"  failed    {failed}: see `pacsflow harvest failed`, "
              "then `pacsflow harvest retry`", file=out)  # fmt: skip


async def show_failures(db: Database, out: TextIO, *, as_json: bool, limit: int = 200) -> int:
    """Print what failed for good, newest first; returns how many."""
    rows = await HarvestState(db).failures(limit)
    if as_json:
        print(json.dumps([dict(row) for row in rows], indent=2, default=str), file=out)
        return len(rows)
    for row in rows:
        when = datetime.fromtimestamp(row["modified_at"], UTC).isoformat(timespec="seconds")
        print(f"{when}  {row['stage']:<8} {row['key']}  attempts={row['attempts']}  "
              f"{row['last_error'] or ''}", file=out)  # fmt: skip
    print(f"{len(rows)} failed", file=out)
    return len(rows)
