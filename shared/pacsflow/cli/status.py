"""``pacsflow status [--json] [--watch [SECONDS]]``: one screen with the whole installation.

Services are known from their heartbeats in the state store (:mod:`pacsflow.heartbeat`), so
the same command works for ``pacsflow run`` on one machine and for one container per service.
Exit 0 when every service that ever ran is running and ready and there are no dead letters;
1 otherwise, 3 when the event bus cannot be reached (the rest is still shown), with the
reasons on one line of standard error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from contextlib import AsyncExitStack
from datetime import datetime
from typing import Any

from pacsflow.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    PeerUnreachable,
    add_config_option,
    bus,
    database,
    fail,
    is_terminal,
    settings_of,
)
from pacsflow.config import Settings
from pacsflow.errors import BusError

__all__ = ["add_status_command", "render"]

_STATE_STYLE = {
    "running": "green",
    "not ready": "yellow",
    "not responding": "red",
    "stopped": "red",
    "never started": "dim",
}


def _clock(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S") if epoch else "-"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _bar(done: int, total: int, width: int = 24) -> str:
    fraction = done / total if total else 0.0
    filled = min(width, int(fraction * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f} %"


def _instance_text(i: dict[str, Any], now: float) -> str:
    where = f"{i['instance']} pid {i['pid']}" + (f" port {i['http_port']}" if i["http_port"]
                                                else "")
    if i["state"] == "stopped":
        if i["stopped_at"]:
            return f"{where}: {i['stop_reason']} at {_clock(i['stopped_at'])}"
        return f"{where}: the process is gone (killed?) since {_clock(i['beat_at'])}"
    failing = [k for k, v in i["ready"].items() if not v]
    text = f"{where}, up since {_clock(i['started_at'])}, beat {_ago(now - i['beat_at'])}"
    return text + (f", failing: {', '.join(failing)}" if failing else "")


def render(report: dict[str, Any], found: list[str]) -> list[tuple[str, str]]:
    """The report as lines of text, each with a rich style (empty: none)."""
    now = report["time"]
    lines: list[tuple[str, str]] = [
        (f"pacsflow status at {_clock(now)} (bus {report['bus']}, state {report['state']})",
         "bold"),
        ("services:", "bold"),
    ]
    for name, service in report["services"].items():
        state = service["state"]
        details = [_instance_text(i, now) for i in service["instances"]]
        first = details[0] if len(details) == 1 else (f"{len(details)} instances"
                                                      if details else "")
        lines.append((f"  {name:<11} {state:<14} {first}".rstrip(),
                      _STATE_STYLE.get(state, "")))
        if len(details) > 1:
            lines += [(f"      {text}", "dim") for text in details]
    files = report["files"]
    if files is None:
        lines.append(("files: unknown (the state store has no tables yet)", "yellow"))
    else:
        lines.append(("files: " + ", ".join(f"{files[k]} {k}" for k in
                                             ("pending", "sent", "failed", "invalid",
                                              "duplicate")),
                      "red" if files["failed"] else ""))
    waiting = report["waiting"]
    lines.append(("queues: " + (", ".join(f"{s} {n} waiting" for s, n in sorted(waiting.items()))
                                or "none") if not report["bus_error"]
                  else f"queues: unknown ({report['bus_error']})", ""))
    dead = {s: n for s, n in report["dead_letters"].items() if n}
    lines.append(("dead letters: " + (", ".join(f"{s} {n}" for s, n in dead.items()) or "none"),
                  "red" if dead else ""))
    studies = report["studies"]
    if studies is not None:
        lines.append((f"studies: {studies.get('open', 0)} open, "
                      f"{studies.get('claimed', 0)} completing, "
                      f"{studies.get('notified', 0)} complete", ""))
    harvest = report["harvest"]
    if harvest is not None and harvest["series_wanted"]:
        failed = harvest["series"].get("failed", 0)
        lines.append((f"harvest: {harvest['series_complete']}/{harvest['series_wanted']} series "
                      f"{_bar(harvest['series_complete'], harvest['series_wanted'])}"
                      + (f", {failed} failed" if failed else ""), "red" if failed else ""))
    sync = report["sync"]
    if sync is not None and sync["last_run"]:
        run = sync["last_run"]
        transfers = ", ".join(f"{n} {s}" for s, n in sorted(sync["transfers"].items()) if n)
        lines.append((f"sync: last cycle {_clock(run['started_at'])} {run['status']}: "
                      f"{run['missing_studies']} missing studies, {run['series_moved']}/"
                      f"{run['series_requested']} series moved, {run['series_failed']} failed, "
                      f"{run['images_transferred']} images"
                      + (f"; series {transfers}" if transfers else ""),
                      "red" if run["status"] == "failed" else ""))
    lines.append(("all good" if not found else "not all good: " + "; ".join(found),
                  "bold green" if not found else "bold red"))
    return lines


def _print_plain(lines: list[tuple[str, str]]) -> None:
    for text, _style in lines:
        print(text)
    sys.stdout.flush()


def _renderable(lines: list[tuple[str, str]]) -> Any:
    from rich.text import Text

    text = Text()
    for index, (line, style) in enumerate(lines):
        text.append(line, style=style or None)
        if index < len(lines) - 1:
            text.append("\n")
    return text


async def _collect(settings: Settings, db: Any, event_bus: Any) -> tuple[dict[str, Any], list[str]]:
    from pacsflow.status import collect_status, problems

    report = await collect_status(settings, db, event_bus)
    return report, problems(report)


class _UnreachableBus:
    """Stands in for a bus that could not be reached: the rest of the status still shows."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def queue_depths(self) -> dict[str, int]:
        raise BusError(self.reason)


async def _status(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    async with AsyncExitStack() as stack:
        db = await stack.enter_async_context(database(settings))
        try:
            event_bus: Any = await stack.enter_async_context(bus(settings))
        except PeerUnreachable as err:
            event_bus = _UnreachableBus(str(err).removeprefix("event bus: "))
        if args.watch is None:
            report, found = await _collect(settings, db, event_bus)
            if args.json:
                print(json.dumps({**report, "problems": found}, indent=2, default=str))
            elif is_terminal():
                from rich.console import Console

                Console().print(_renderable(render(report, found)))
            else:
                _print_plain(render(report, found))
            if found:
                code = EXIT_UNREACHABLE if report["bus_error"] else EXIT_FAILED
                return fail("not all good: " + "; ".join(found), code)
            return EXIT_OK
        return await _watch(args, settings, db, event_bus)
    raise AssertionError("not reached: the block returns")


async def _watch(args: argparse.Namespace, settings: Settings, db: Any, event_bus: Any) -> int:
    """Refresh every ``--watch`` seconds until interrupted: a live screen on a terminal, one
    block (or one JSON line) per refresh otherwise."""
    interval = max(0.5, args.watch)
    if is_terminal() and not args.json:
        from rich.console import Console
        from rich.live import Live

        with Live(console=Console(), auto_refresh=False, screen=False) as live:
            while True:
                report, found = await _collect(settings, db, event_bus)
                live.update(_renderable(render(report, found)), refresh=True)
                await asyncio.sleep(interval)
    while True:
        report, found = await _collect(settings, db, event_bus)
        if args.json:
            print(json.dumps({**report, "problems": found}, default=str), flush=True)
        else:
            _print_plain(render(report, found))
            print(flush=True)
        await asyncio.sleep(interval)


def cmd_status(args: argparse.Namespace) -> int:
    """``pacsflow status``."""
    try:
        return asyncio.run(_status(args))
    except KeyboardInterrupt:
        # Ending --watch with Ctrl-C is how it is meant to end.
        if args.watch is not None:
            return EXIT_OK
        raise


def add_status_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``status``."""
    status = commands.add_parser(
        "status", help="services, queues, dead letters, files, studies, harvest and sync",
        description="One screen with every service's state (from the heartbeats each running "
                    "process writes to the state store), queue depths, dead letters, files "
                    "pending/sent/failed/invalid, open studies, harvest and sync progress. "
                    "Exit 0: all good; 1: a service stopped or not ready, or dead letters.",
    )  # fmt: skip
    add_config_option(status)
    status.add_argument("--json", action="store_true",
                        help="machine-readable output (with --watch: one JSON object per line)")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until Ctrl-C")
    status.set_defaults(func=cmd_status)

