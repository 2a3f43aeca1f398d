"""``pacsflow ledger``: the files pacsflow has seen, by status, with reasons; retrying failures.

The lists older upload scripts kept as log files come from the ledger: ``--status sent``
(every file confirmed by all its destinations, archived ones included), ``--status failed``
(with each failed destination's error) and ``--status invalid`` (with why the file is not
DICOM or damaged, and where it was quarantined). ``ledger retry --status failed`` queues the
failed deliveries again; a running uploader picks them up within seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from pacsflow.cli.common import EXIT_OK, add_config_option, database, settings_of
from pacsflow.errors import ConfigError
from pacsflow.store.base import Database
from pacsflow.store.ledger import FILE_STATUSES, Delivery, FileStatus, Ledger, LedgerFile

__all__ = ["add_ledger_command", "parse_since"]

#: columns of ``export`` and ``--csv``, in order
COLUMNS = ("id", "status", "path", "reason", "destinations", "sop_instance_uid", "size",
           "archive_path", "updated_at")  # fmt: skip

# What an administrator asks for -> the ledger statuses it covers.
_STATUS_GROUPS: dict[str, tuple[str, ...]] = {
    # An archived file was confirmed by every destination before it was moved.
    "sent": ("sent", "archived"),
    "pending": ("ready", "sending"),
}
_PAGE = 1000


def parse_since(text: str | None) -> float | None:
    """``--since``: an ISO date/time, or an age such as 30m, 12h, 7d; epoch seconds."""
    if text is None:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
        return time.time() - float(match[1]) * unit
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r}: give an ISO date/time or an age like 12h") from None
    return when.timestamp()


def _delivery_text(delivery: Delivery) -> str:
    return f"{delivery.destination}={delivery.status}"


def _failure_text(delivery: Delivery) -> str:
    status = f" 0x{delivery.dimse_status:04X}" if delivery.dimse_status is not None else ""
    error = f": {delivery.last_error}" if delivery.last_error else ""
    return (f"{delivery.destination} {delivery.status}{status}{error} "
            f"({delivery.attempts} attempt(s))")


def _row(item: LedgerFile, deliveries: Sequence[Delivery]) -> dict[str, Any]:
    reason = item.reason or ""
    failed = [d for d in deliveries if d.status in ("failed", "unsupported")]
    if failed and item.status in ("failed", "ready", "sending"):
        reason = "; ".join(_failure_text(d) for d in failed)
    return {
        "id": item.id,
        "status": item.status,
        "path": item.path,
        "reason": reason,
        "destinations": " ".join(_delivery_text(d) for d in deliveries),
        "sop_instance_uid": item.sop_instance_uid or "",
        "size": item.size,
        "archive_path": item.archive_path or "",
        "updated_at": datetime.fromtimestamp(item.updated_at, UTC).isoformat(timespec="seconds"),
    }


async def _rows(db: Database, statuses: Sequence[FileStatus] | None, since: float | None,
                limit: int | None) -> AsyncIterator[dict[str, Any]]:
    ledger = Ledger(db)
    after: tuple[float, int] | None = None
    count = 0
    while True:
        page = await ledger.list_files(status=statuses, since=since, after=after, limit=_PAGE)
        by_file: dict[int, list[Delivery]] = {}
        for delivery in await ledger.deliveries(f.id for f in page):
            by_file.setdefault(delivery.file_id, []).append(delivery)
        for item in page:
            yield _row(item, by_file.get(item.id, []))
            count += 1
            if limit is not None and count >= limit:
                return
        if len(page) < _PAGE:
            return
        after = (page[-1].updated_at, page[-1].id)


def _statuses(status: str | None) -> tuple[FileStatus, ...] | None:
    if status is None:
        return None
    return cast(tuple[FileStatus, ...], _STATUS_GROUPS.get(status, (status,)))


class _ExportProgress:
    """A bar on standard error while rows are written elsewhere (a terminal only)."""

    def __init__(self, total: int) -> None:
        self._bar: Any = None
        if total and sys.stderr.isatty() and not sys.stdout.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(TextColumn("exporting"), BarColumn(), MofNCompleteColumn(),
                                 console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task("export", total=total)
            self._bar.start()

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


async def _list(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    since = parse_since(args.since)
    statuses = _statuses(args.status)
    export = args.ledger_command == "export"
    limit = None if export else args.limit
    as_csv = args.csv or (export and not args.json)
    async with database(settings) as db:
        progress = _ExportProgress(
            await Ledger(db).count_files(status=statuses, since=since) if export else 0
        )
        try:
            if as_csv:
                writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, lineterminator="\n")
                writer.writeheader()
                async for row in _rows(db, statuses, since, limit):
                    writer.writerow(row)
                    progress.advance()
            elif args.json:
                rows = [row async for row in _rows(db, statuses, since, limit)]
                print(json.dumps(rows, indent=2))
            else:
                shown = 0
                async for row in _rows(db, statuses, since, limit):
                    reason = f"  {row['reason']}" if row["reason"] else ""
                    print(f"{row['updated_at']}  {row['status']:<9} {row['path']}{reason}")
                    shown += 1
                total = await Ledger(db).count_files(status=statuses, since=since)
                more = f" (of {total}; --limit or export for more)" if total > shown else ""
                print(f"{shown} file(s){more}")
        finally:
            progress.close()
    return EXIT_OK


async def _retry(args: argparse.Namespace) -> int:
    from pacsflow_uploader.deliveries import requeue_failed

    settings = settings_of(args)
    since = parse_since(args.since)
    async with database(settings) as db:
        ids = args.ids or [f.id async for f in Ledger(db).iter_files(status="failed",
                                                                     since=since)]
        if args.dry_run:
            print(f"{len(ids)} failed file(s) would be queued again")
            return EXIT_OK
        requeued = await requeue_failed(db, ids, destination=args.destination)
    per_destination: dict[str, int] = {}
    for _, destination in requeued:
        per_destination[destination] = per_destination.get(destination, 0) + 1
    files = len({file_id for file_id, _ in requeued})
    if args.json:
        print(json.dumps({"files": files, "deliveries": per_destination}, indent=2))
        return EXIT_OK
    detail = ", ".join(f"{d} {n}" for d, n in sorted(per_destination.items()))
    print(f"{files} failed file(s) queued again" + (f" ({detail})" if detail else "")
          + ("; a running uploader sends them within seconds" if files else ""))
    return EXIT_OK


def cmd_ledger(args: argparse.Namespace) -> int:
    """``pacsflow ledger list|export|retry``."""
    if args.ledger_command == "retry":
        if args.status not in (None, "failed"):
            raise ConfigError("ledger retry: only --status failed can be retried")
        return asyncio.run(_retry(args))
    if args.ids or args.destination or args.dry_run:
        raise ConfigError("FILE_ID, --destination and --dry-run are for ledger retry")
    return asyncio.run(_list(args))


def add_ledger_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``ledger``."""
    choices = sorted({*FILE_STATUSES, *_STATUS_GROUPS})
    ledger = commands.add_parser(
        "ledger", help="the files pacsflow has seen (sent, failed, invalid, ...), with reasons",
        description="list: up to --limit files, oldest change first; export: every row as "
                    "CSV (or --json); retry --status failed: queue failed files again. "
                    "--status sent includes archived files; pending is ready + sending.",
    )  # fmt: skip
    add_config_option(ledger)
    ledger.add_argument("ledger_command", choices=["list", "export", "retry"])
    ledger.add_argument("ids", nargs="*", type=int, metavar="FILE_ID",
                        help="retry: only these files (ids as listed)")
    ledger.add_argument("--status", choices=choices, help="only files with this status")
    ledger.add_argument("--since", help="changed since an ISO date/time or an age (12h, 7d)")
    ledger.add_argument("--limit", type=int, default=200, help="list: at most this many")
    ledger.add_argument("--destination", metavar="NODE", help="retry: only this destination")
    ledger.add_argument("--dry-run", action="store_true", help="retry: only count")
    output = ledger.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true", help="CSV (export is CSV by default)")
    output.add_argument("--json", action="store_true", help="machine-readable output")
    ledger.set_defaults(func=cmd_ledger, id_type=int)
