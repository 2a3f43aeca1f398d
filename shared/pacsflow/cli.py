"""The ``pacsflow`` command: run services, check configuration, manage state and dead letters.

Exit codes scripts can rely on: 0 all good, 1 the work failed, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from pacsflow.config import SERVICES, Settings, load_settings
from pacsflow.errors import ConfigError, PacsflowError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="YAML configuration file (default: $PACSFLOW_CONFIG, else built-in defaults)",
    )


def _run_services(args: argparse.Namespace, names: Sequence[str]) -> int:
    from pacsflow.logs import configure_logging
    from pacsflow.runtime import run_services

    settings = _settings(args)
    configure_logging(settings.logging)
    return asyncio.run(run_services(settings, names))


def cmd_service(args: argparse.Namespace) -> int:
    return _run_services(args, [args.service])


def cmd_run(args: argparse.Namespace) -> int:
    unknown = [name for name in args.services if name not in SERVICES]
    if unknown:
        print(f"unknown service(s): {', '.join(unknown)}; known: {', '.join(SERVICES)}",
              file=sys.stderr)
        return EXIT_USAGE
    return _run_services(args, args.services or list(SERVICES))


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.file)
    print(f"{args.file}: ok (bus {settings.bus.backend}, state {settings.state.backend}, "
          f"{len(settings.nodes)} node(s), {len(settings.router.routes)} route(s))")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    # SecretStr fields print as '**********': secrets never reach the terminal.
    settings = _settings(args)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return EXIT_OK


@asynccontextmanager
async def _database(settings: Settings):  # type: ignore[no-untyped-def]
    from pacsflow.store import open_database

    db = await open_database(settings.state)
    try:
        yield db
    finally:
        await db.close()


@asynccontextmanager
async def _bus(settings: Settings):  # type: ignore[no-untyped-def]
    from prometheus_client import CollectorRegistry

    from pacsflow.bus import create_bus

    bus = create_bus(settings, CollectorRegistry())
    await bus.start()
    try:
        yield bus
    finally:
        await bus.close()


async def _db_upgrade(settings: Settings) -> int:
    from pacsflow.store.migrate import upgrade

    async with _database(settings) as db:
        applied = await upgrade(db)
    for migration in applied:
        print(f"applied {migration}")
    print("state store is up to date" if not applied else f"{len(applied)} migration(s) applied")
    return EXIT_OK


async def _db_status(settings: Settings) -> int:
    from pacsflow.store.migrate import pending

    async with _database(settings) as db:
        waiting = await pending(db)
    for migration in waiting:
        print(f"pending {migration}")
    print("state store is up to date" if not waiting else f"{len(waiting)} migration(s) pending")
    return EXIT_OK if not waiting else EXIT_FAILED


def cmd_db(args: argparse.Namespace) -> int:
    settings = _settings(args)
    action: Callable[[Settings], Awaitable[int]] = {
        "upgrade": _db_upgrade,
        "status": _db_status,
    }[args.db_command]
    return asyncio.run(action(settings))


async def _dead_letters(args: argparse.Namespace) -> int:
    settings = _settings(args)
    async with _bus(settings) as bus:
        services = [args.service] if args.service else list(SERVICES)
        if args.dl_command in ("list", "show"):
            rows: list[dict[str, Any]] = []
            for service in services:
                for letter in await bus.dead_letters(service):
                    if args.ids and letter.id not in args.ids:
                        continue
                    row = {
                        "id": letter.id,
                        "service": letter.service,
                        "queue": letter.queue,
                        "event_type": letter.event_type,
                        "reason": letter.reason,
                        "deliveries": letter.deliveries,
                        "time": letter.time.isoformat() if letter.time else None,
                    }
                    if args.dl_command == "show":
                        row["body"] = letter.body.decode("utf-8", "replace")
                    rows.append(row)
            if args.json or args.dl_command == "show":
                print(json.dumps(rows, indent=2))
            elif not rows:
                print("no dead letters")
            else:
                for row in rows:
                    print(f"{row['id']}  {row['service']:<10} {row['event_type'] or '?':<16} "
                          f"deliveries={row['deliveries']}  {row['reason']}")
            return EXIT_OK
        if not args.service:
            print("replay and purge need --service", file=sys.stderr)
            return EXIT_USAGE
        ids = args.ids or None
        if args.dl_command == "replay":
            count = await bus.replay_dead_letters(args.service, ids)
            print(f"replayed {count} dead letter(s) of {args.service}")
        else:
            count = await bus.purge_dead_letters(args.service, ids)
            print(f"purged {count} dead letter(s) of {args.service}")
        return EXIT_OK


def cmd_dead_letters(args: argparse.Namespace) -> int:
    return asyncio.run(_dead_letters(args))


async def _http_get(host: str, port: int, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def _status(args: argparse.Namespace) -> int:
    from pacsflow.store.ledger import Ledger

    settings = _settings(args)
    report: dict[str, Any] = {}
    host = "127.0.0.1" if settings.http.host in ("0.0.0.0", "::") else settings.http.host
    try:
        code, body = await _http_get(host, settings.http.port, "/readyz")
        report["process"] = {"reachable": True, "ready": code == 200, "checks": json.loads(body)}
    except (OSError, TimeoutError, ValueError):
        report["process"] = {"reachable": False, "ready": False, "checks": {}}
    async with _database(settings) as db:
        report["ledger"] = await Ledger(db).count_by_status()
    async with _bus(settings) as bus:
        report["queues"] = await bus.queue_depths()
        report["dead_letters"] = {s: len(await bus.dead_letters(s)) for s in SERVICES}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        proc = report["process"]
        state = "ready" if proc["ready"] else ("not ready" if proc["reachable"] else "not running")
        print(f"pacsflow on port {settings.http.port}: {state} {proc['checks'] or ''}")
        print("files: " + (", ".join(f"{k} {v}" for k, v in report["ledger"].items()) or "none"))
        print("queues:")
        for queue, depth in sorted(report["queues"].items()):
            print(f"  {queue:<50} {depth}")
        print("dead letters: " + ", ".join(f"{k} {v}" for k, v in report["dead_letters"].items()))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    return asyncio.run(_status(args))


def cmd_echo(args: argparse.Namespace) -> int:
    from pacsflow.dicom import NetworkOptions, echo
    from pacsflow.errors import AssociationRejected, DicomError

    settings = _settings(args)
    node = settings.node(args.node)
    options = NetworkOptions.from_settings(settings.dicom)
    failures = 0
    for _ in range(args.count):
        try:
            seconds = echo(node, options)
        except AssociationRejected as err:
            print(f"C-ECHO {node}: association failed: {err}")
            failures += 1
        except DicomError as err:
            print(f"C-ECHO {node}: {err}")
            failures += 1
        else:
            print(f"C-ECHO {node}: success in {seconds * 1000:.1f} ms")
    return EXIT_OK if failures == 0 else EXIT_FAILED


def cmd_send(args: argparse.Namespace) -> int:
    from pacsflow.dicom import NetworkOptions
    from pacsflow_uploader.send import run_send
    from pacsflow_uploader.uploader import default_associations

    settings = _settings(args)
    destinations = [(spec, settings.node(spec)) for spec in dict.fromkeys(args.to)]
    associations = args.associations or settings.uploader.associations or default_associations()
    processes = args.processes if args.processes is not None else settings.uploader.processes
    if processes is None:
        # One association needs no process of its own; more spread over the cores.
        processes = 0 if associations == 1 else min(os.cpu_count() or 1, associations)
    return run_send(
        args.paths,
        destinations,
        NetworkOptions.from_settings(settings.dicom),
        associations=associations,
        processes=processes,
        engine=args.engine or settings.uploader.engine,
    )


def _parse_since(text: str | None) -> float | None:
    """``--since``: an ISO date/time, or an age such as 30m, 12h, 7d."""
    if text is None:
        return None
    import re
    import time
    from datetime import datetime

    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
        return time.time() - float(match[1]) * unit
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise PacsflowError(f"--since {text!r}: give an ISO date/time or an age like 12h") from None


_LEDGER_COLUMNS = ("id", "status", "path", "sop_instance_uid", "size", "reason", "archive_path",
                   "updated_at")


async def _ledger(args: argparse.Namespace) -> int:
    import csv
    from datetime import UTC, datetime

    from pacsflow.store.ledger import Ledger

    settings = _settings(args)
    since = _parse_since(args.since)
    async with _database(settings) as db:
        ledger = Ledger(db)
        rows = []
        async for item in ledger.iter_files(status=args.status, since=since):
            row = {name: getattr(item, name) for name in _LEDGER_COLUMNS}
            row["updated_at"] = datetime.fromtimestamp(item.updated_at, UTC).isoformat(
                timespec="seconds")
            rows.append(row)
            if args.ledger_command == "list" and len(rows) >= args.limit:
                break
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.csv or args.ledger_command == "export":
        writer = csv.DictWriter(sys.stdout, fieldnames=_LEDGER_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        for row in rows:
            reason = f"  {row['reason']}" if row["reason"] else ""
            print(f"{row['updated_at']}  {row['status']:<9} {row['path']}{reason}")
        print(f"{len(rows)} file(s)")
    return EXIT_OK


def cmd_ledger(args: argparse.Namespace) -> int:
    return asyncio.run(_ledger(args))


def _add_sync_options(sync: argparse.ArgumentParser) -> None:
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


def _sync_overrides(args: argparse.Namespace) -> dict[str, Any]:
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
    from pydantic import ValidationError

    from pacsflow.config import SyncSettings
    from pacsflow.logs import configure_logging
    from pacsflow.runtime import run_services

    settings = _settings(args)
    overrides = _sync_overrides(args)
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
        from pacsflow_sync.once import run_once

        report = asyncio.run(run_once(settings))
        return EXIT_OK if report.ok else EXIT_FAILED
    return asyncio.run(run_services(settings, ["sync"]))


async def _harvest(args: argparse.Namespace) -> int:
    from pacsflow_harvester.report import collect_status, render_status, show_failures
    from pacsflow_harvester.state import HarvestState

    from pacsflow.errors import StoreError

    settings = _settings(args)
    async with _database(settings) as db:
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
                return EXIT_OK if not found else EXIT_FAILED
            if args.harvest_command == "retry":
                count = await HarvestState(db).retry_failed(args.keys)
                print(f"{count} failed item(s) queued again")
                return EXIT_OK
            await HarvestState(db).request_rescan()
            print("the PACS will be queried again for patients, studies and series")
            return EXIT_OK
        except StoreError as err:
            if "harvest_" in str(err):
                print("pacsflow: no harvest state yet: run `pacsflow db upgrade` or start the "
                      "harvester", file=sys.stderr)
                return EXIT_FAILED
            raise


def cmd_harvest(args: argparse.Namespace) -> int:
    return asyncio.run(_harvest(args))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pacsflow`` command."""
    parser = argparse.ArgumentParser(
        prog="pacsflow",
        description="Move DICOM images between folders, PACS servers and research storage.",
    )
    _add_config_option(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for service in SERVICES:
        sub = commands.add_parser(service, help=f"run the {service} service")
        _add_config_option(sub)
        sub.set_defaults(func=cmd_service, service=service)
        if service == "sync":
            _add_sync_options(sub)

    run = commands.add_parser("run", help="run several services in one process (default: all)")
    _add_config_option(run)
    run.add_argument("services", nargs="*", metavar="SERVICE", help=", ".join(SERVICES))
    run.set_defaults(func=cmd_run)

    config = commands.add_parser("config", help="check or show the configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser("check", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)
    show = config_commands.add_parser("show", help="print the effective configuration")
    _add_config_option(show)
    show.set_defaults(func=cmd_config_show)

    db = commands.add_parser("db", help="state store schema")
    _add_config_option(db)
    db.add_argument("db_command", choices=["upgrade", "status"])
    db.set_defaults(func=cmd_db)

    status = commands.add_parser("status", help="health, queues, dead letters and file counts")
    _add_config_option(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    echo_cmd = commands.add_parser("echo", help="C-ECHO a node, with the round-trip time")
    _add_config_option(echo_cmd)
    echo_cmd.add_argument("node", metavar="NODE|AET@HOST:PORT")
    echo_cmd.add_argument("--count", type=int, default=1, help="how many echoes (default 1)")
    echo_cmd.set_defaults(func=cmd_echo)

    send = commands.add_parser(
        "send", help="C-STORE files and folders to nodes now, with progress and a summary"
    )
    _add_config_option(send)
    send.add_argument("paths", nargs="+", metavar="PATH", help="files, or folders (recursively)")
    send.add_argument("--to", action="append", required=True, metavar="AET@HOST:PORT|NODE",
                      help="where to send (repeat for several destinations)")
    send.add_argument("--associations", type=int, metavar="N",
                      help="associations per destination (default: uploader.associations)")
    send.add_argument("--processes", type=int, metavar="N",
                      help="sender processes (default: one per core, 0: this process)")
    send.add_argument("--engine", choices=["lean", "pynetdicom"],
                      help="C-STORE implementation (default: uploader.engine)")
    send.set_defaults(func=cmd_send)

    from pacsflow.store.ledger import FILE_STATUSES

    ledger = commands.add_parser("ledger", help="the files pacsflow has seen, by status")
    _add_config_option(ledger)
    ledger.add_argument("ledger_command", choices=["list", "export"])
    ledger.add_argument("--status", choices=FILE_STATUSES, help="only files with this status")
    ledger.add_argument("--since", help="changed since an ISO date/time or an age (12h, 7d)")
    ledger.add_argument("--limit", type=int, default=200, help="list: at most this many")
    ledger.add_argument("--csv", action="store_true", help="CSV (export always is)")
    ledger.add_argument("--json", action="store_true", help="machine-readable output")
    ledger.set_defaults(func=cmd_ledger)

    harvest = commands.add_parser("harvest", help="the harvester's progress, failures and rescans")
    _add_config_option(harvest)
    harvest_commands = harvest.add_subparsers(dest="harvest_command", required=True)
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
        _add_config_option(sub)
    harvest.set_defaults(func=cmd_harvest)

    dead = commands.add_parser("dead-letters", help="inspect, replay or purge dead letters")
    _add_config_option(dead)
    dead.add_argument("dl_command", choices=["list", "show", "replay", "purge"])
    dead.add_argument("ids", nargs="*", metavar="ID", help="only these dead letters")
    dead.add_argument("--service", choices=SERVICES, help="only this service's dead letters")
    dead.add_argument("--json", action="store_true", help="machine-readable output")
    dead.set_defaults(func=cmd_dead_letters)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pacsflow`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "config"):
        args.config = os.environ.get("PACSFLOW_CONFIG")
    try:
        return int(args.func(args))
    except PacsflowError as err:
        print(f"pacsflow: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, ConfigError) else EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
