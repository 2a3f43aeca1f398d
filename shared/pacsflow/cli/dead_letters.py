"""``pacsflow dead-letters list|show|replay|purge``: what could not be handled, and why."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from pacsflow.cli.common import EXIT_OK, add_config_option, bus, settings_of
from pacsflow.config import SERVICES
from pacsflow.errors import ConfigError

__all__ = ["add_dead_letters_command"]


async def _dead_letters(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if args.dl_command in ("replay", "purge") and not args.service:
        raise ConfigError(f"dead-letters {args.dl_command} needs --service")
    async with bus(settings) as event_bus:
        services = [args.service] if args.service else list(SERVICES)
        if args.dl_command in ("list", "show"):
            rows: list[dict[str, Any]] = []
            for service in services:
                for letter in await event_bus.dead_letters(service):
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
                print(f"{len(rows)} dead letter(s)")
            return EXIT_OK
        ids = args.ids or None
        if args.dl_command == "replay":
            count = await event_bus.replay_dead_letters(args.service, ids)
            print(f"replayed {count} dead letter(s) of {args.service}")
        else:
            count = await event_bus.purge_dead_letters(args.service, ids)
            print(f"purged {count} dead letter(s) of {args.service}")
        return EXIT_OK


def cmd_dead_letters(args: argparse.Namespace) -> int:
    """``pacsflow dead-letters``."""
    return asyncio.run(_dead_letters(args))


def add_dead_letters_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Register ``dead-letters``."""
    dead = commands.add_parser(
        "dead-letters", help="inspect, replay or purge dead letters",
        description="list: one line each; show: with the message bodies (JSON); replay: back "
                    "to the queue they came from; purge: delete. replay and purge need "
                    "--service; ids narrow any of them.",
    )  # fmt: skip
    add_config_option(dead)
    dead.add_argument("dl_command", choices=["list", "show", "replay", "purge"])
    dead.add_argument("ids", nargs="*", metavar="ID", help="only these dead letters")
    dead.add_argument("--service", choices=SERVICES, help="only this service's dead letters")
    dead.add_argument("--json", action="store_true", help="machine-readable output")
    dead.set_defaults(func=cmd_dead_letters)
