"""Commands that move images now: ``send``, ``sync`` (one cycle or the service), ``harvest``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from pacsflow.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    add_config_option,
    database,
    fail,
    settings_of,
)
from pacsflow.config import Settings
from pacsflow.errors import ConfigError

__all__ = ["add_harvest_command", "add_send_command", "add_sync_options"]


# --- send -------------------------------------------------------------------------------


def cmd_send(args: argparse.Namespace) -> int:
    """``pacsflow send PATH... --to NODE``: C-STORE now, with progress and a summary."""
    from pacsflow.dicom import NetworkOptions
    from pacsflow_uploader.send import run_send
    from pacsflow_uploader.uploader import default_associations

    settings = settings_of(args)
    destinations = [(spec, settings.node(spec)) for spec in dict.fromkeys(args.to)]
    associations = args.associations or settings.uploader.associations or default_associations()
    processes = args.processes if args.processes is not None else settings.uploader.processes
    if processes is None:
        # One association needs no process of its own; more spread over the cores.
        processes = 0 if associations == 1 else min(os.cpu_count() or 1, associations)
    code = run_send(
        args.paths,
        destinations,
        NetworkOptions.from_settings(settings.dicom),
        associations=associations,
        processes=processes,
        engine=args.engine or settings.uploader.engine,
    )
    if code != EXIT_OK:
        return fail("send: not every file reached every destination (see the summary above)",
                    code)
    return EXIT_OK


def add_send_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``send``."""
    send = commands.add_parser(
        "send", help="C-STORE files and folders to nodes now, with progress and a summary"
    )
    add_config_option(send)
    send.add_argument("paths", nargs="+", metavar="PATH", help="files, or folders (recursively)")
    send.add_argument("--to", action="append", required=True, metavar="AET@HOST:PORT|NODE",
                      help="where to send (repeat for several destinations)")
    send.add_argument("--associations", type=int, metavar="N",
                      help="associations per destination (default: uploader.associations)")
    send.add_argument("--processes", type=int, metavar="N",
                      help="sender processes (default: one per core, 0: this process)")
    send.add_argument("--engine", choices=["lean", "asyncio", "pynetdicom"],
                      help="C-STORE implementation (default: uploader.engine)")
    send.set_defaults(func=cmd_send)


# --- sync -------------------------------------------------------------------------------


def add_sync_options(sync: argparse.ArgumentParser) -> None:
    """The ``sync`` command's own options; each overrides its key of the ``sync`` section."""
    sync.add_argument("--once", action="store_true",
                      help="run one cycle, wait for its moves, print the statistics and exit "
                           "(0: every series moved, 1: a failure)")
    sync.add_argument("--remote", metavar="NODE|AET@HOST:PORT", help="the PACS to copy from")
    sync.add_argument("--local", metavar="NODE|AET@HOST:PORT", help="the PACS to keep up to date")
    sync.add_argument("--selection", choices=["smallest", "max-images", "all"],
                      help="series per missing study: the smallest, those with fewer than "
                           "--max-images images, or all")
    sync.add_argument("--max-images", type=int, metavar="N",
                      help="series with fewer than N images (implies --selection max-images)")
    sync.add_argument("--min-images", type=int, metavar="N", dest="min_images",
                      help="the original tool's name for --max-images N")
    sync.add_argument("--all-series", action="store_true",
                      help="the original tool's name for --selection all")
    sync.add_argument("--interval", type=float, metavar="SECONDS", help="time between cycles")
    sync.add_argument("--window-hours", type=float, metavar="HOURS",
                      help="only studies made this many hours ago or later")
    sync.add_argument("--days", type=int, metavar="N",
                      help="C-FIND study dates of today and the N-1 days before")
    sync.add_argument("--include-incomplete", action="store_true", default=None,
                      help="also studies the local PACS has with fewer instances")
    sync.set_defaults(func=cmd_sync)


def sync_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``sync`` settings the command-line options set; ConfigError when they conflict."""
    limits = {value for value in (args.max_images, args.min_images) if value is not None}
    if len(limits) > 1:
        raise ConfigError("--max-images and --min-images give different limits: use one")
    selection = args.selection
    if args.all_series:
        if selection not in (None, "all") or limits:
            raise ConfigError("--all-series conflicts with --selection/--max-images/--min-images")
        selection = "all"
    if limits:
        if selection not in (None, "max-images"):
            raise ConfigError(f"--max-images/--min-images need --selection max-images, "
                              f"not {selection}")
        selection = "max-images"
    values: dict[str, Any] = {
        "remote": args.remote,
        "local": args.local,
        "selection": selection,
        "max_images": limits.pop() if limits else None,
        "interval_seconds": args.interval,
        "window_hours": args.window_hours,
        "date_range_days": args.days,
        "include_incomplete": args.include_incomplete,
    }
    return {key: value for key, value in values.items() if value is not None}


def cmd_sync(args: argparse.Namespace) -> int:
    """``pacsflow sync [--once] [options]``."""
    from pydantic import ValidationError

    from pacsflow.config import SyncSettings
    from pacsflow.logs import configure_logging
    from pacsflow.runtime import run_services

    settings = settings_of(args)
    overrides = sync_overrides(args)
    if overrides:
        try:
            sync = SyncSettings.model_validate({**settings.sync.model_dump(), **overrides})
        except ValidationError as err:
            problems = "; ".join(
                f"sync.{'.'.join(map(str, problem['loc'])) or '(section)'}: {problem['msg']}"
                for problem in err.errors()
            )
            raise ConfigError(f"command-line options: {problems}") from err
        settings = settings.model_copy(update={"sync": sync})
    for name in (settings.sync.remote, settings.sync.local):
        if name is not None:
            settings.node(name)  # a ConfigError now rather than once the service runs
    configure_logging(settings.logging)
    if args.once:
        report = asyncio.run(_sync_once(settings))
        if not report.ok:
            return fail(f"sync: the cycle ended {report.status}")
        return EXIT_OK
    return asyncio.run(run_services(settings, ["sync"]))


async def _sync_once(settings: Settings) -> Any:
    """One cycle, with a bar of the series moved so far on a terminal (lines otherwise)."""
    from pacsflow_sync.once import run_once

    cycle = asyncio.create_task(run_once(settings))
    async with database(settings) as db:
        progress = _SyncProgress()
        try:
            while not cycle.done():
                await asyncio.wait([cycle], timeout=1.0)
                progress.show(await _cycle_counts(db, settings.instance))
        finally:
            progress.close()
            if not cycle.done():
                cycle.cancel()
    return await cycle


async def _cycle_counts(db: Any, instance: str) -> dict[str, int]:
    """Series of this instance's running cycle by status (empty before it asked for any)."""
    from pacsflow.errors import StoreError

    try:
        run_id = await db.fetchval(
            "SELECT max(id) FROM sync_runs WHERE instance = $1 AND status = 'running'", instance)
        if run_id is None:
            return {}
        rows = await db.fetch(
            "SELECT status, count(*) AS n FROM sync_transfers WHERE run_id = $1 GROUP BY status",
            run_id)
    except StoreError:
        return {}  # tables not there yet: the cycle creates them
    return {row["status"]: int(row["n"]) for row in rows}


class _SyncProgress:
    """Series moved (or failed) of those the cycle asked for."""

    _LINE_SECONDS = 10.0

    def __init__(self) -> None:
        self._bar: Any = None
        self._last: tuple[int, int] | None = None
        self._last_line = 0.0
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(TextColumn("sync: series moved"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[failed]}"),
                                 console=Console(stderr=True), transient=True)
            self._task = self._bar.add_task("sync", total=None, failed="")
            self._bar.start()

    def show(self, counts: dict[str, int]) -> None:
        import time

        total = sum(counts.values())
        done = counts.get("moved", 0) + counts.get("failed", 0)
        failed = counts.get("failed", 0)
        if self._bar is not None:
            self._bar.update(self._task, total=total or None, completed=done,
                             failed=f"{failed} failed" if failed else "")
            return
        now = time.monotonic()
        if total and (done, total) != self._last and now - self._last_line >= self._LINE_SECONDS:
            print(f"sync: {done}/{total} series done ({failed} failed)", file=sys.stderr,
                  flush=True)
            self._last, self._last_line = (done, total), now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# --- harvest ----------------------------------------------------------------------------


async def _harvest(args: argparse.Namespace) -> int:
    from pacsflow_harvester.report import collect_status, render_status, show_failures
    from pacsflow_harvester.state import HarvestState

    from pacsflow.errors import StoreError

    settings = settings_of(args)
    async with database(settings) as db:
        try:
            if args.harvest_command == "status":
                report = await collect_status(db, settings)
                if args.json:
                    print(json.dumps(report, indent=2, default=str))
                else:
                    render_status(report, sys.stdout)
                return EXIT_OK
            if args.harvest_command == "failed":
                found = await show_failures(db, sys.stdout, as_json=args.json)
                if found:
                    return fail(f"harvest: {found} item(s) failed")
                return EXIT_OK
            if args.harvest_command == "retry":
                count = await HarvestState(db).retry_failed(args.keys)
                print(f"{count} failed item(s) queued again")
                return EXIT_OK
            await HarvestState(db).request_rescan()
            print("the PACS will be queried again for patients, studies and series")
            return EXIT_OK
        except StoreError as err:
            if "harvest_" in str(err):
                return fail("no harvest state yet: run `pacsflow db upgrade` or start the "
                            "harvester", EXIT_FAILED)
            raise


def cmd_harvest(args: argparse.Namespace) -> int:
    """``pacsflow harvest status|failed|retry|rescan``."""
    return asyncio.run(_harvest(args))


def add_harvest_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``harvest``."""
    harvest = commands.add_parser("harvest", help="the harvester's progress, failures and rescans")
    add_config_option(harvest)
    harvest_commands = harvest.add_subparsers(dest="harvest_command", required=True,
                                              metavar="ACTION")
    harvest_status = harvest_commands.add_parser(
        "status", help="patients, studies and series by state, with a progress bar"
    )
    harvest_status.add_argument("--json", action="store_true", help="machine-readable output")
    harvest_failed = harvest_commands.add_parser("failed", help="what failed for good, and why")
    harvest_failed.add_argument("--json", action="store_true", help="machine-readable output")
    harvest_retry = harvest_commands.add_parser("retry", help="queue failed items again")
    harvest_retry.add_argument("keys", nargs="*", metavar="KEY",
                               help="only these (PatientID, Study or Series UID); default: all")
    harvest_commands.add_parser("rescan", help="query the PACS again for new studies and series")
    for sub in harvest_commands.choices.values():
        add_config_option(sub)
    harvest.set_defaults(func=cmd_harvest)
