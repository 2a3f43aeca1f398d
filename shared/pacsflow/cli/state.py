"""``pacsflow db upgrade|status``: the state store's schema."""

from __future__ import annotations

import argparse
import asyncio

from pacsflow.cli.common import EXIT_OK, add_config_option, database, fail, settings_of
from pacsflow.config import Settings

__all__ = ["add_db_command"]


async def _upgrade(settings: Settings) -> int:
    from pacsflow.store.migrate import upgrade

    async with database(settings) as db:
        applied = await upgrade(db)
    for migration in applied:
        print(f"applied {migration}")
    print("state store is up to date" if not applied else f"{len(applied)} migration(s) applied")
    return EXIT_OK


async def _status(settings: Settings) -> int:
    from pacsflow.store.migrate import pending

    async with database(settings) as db:
        waiting = await pending(db)
    for migration in waiting:
        print(f"pending {migration}")
    if waiting:
        return fail(f"{len(waiting)} migration(s) pending: run `pacsflow db upgrade`")
    print("state store is up to date")
    return EXIT_OK


def cmd_db(args: argparse.Namespace) -> int:
    """``pacsflow db upgrade|status``."""
    action = _upgrade if args.db_command == "upgrade" else _status
    return asyncio.run(action(settings_of(args)))


def add_db_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``db``."""
    db = commands.add_parser(
        "db", help="state store schema",
        description="upgrade: apply pending migrations; status: list them (exit 1 if any).",
    )  # fmt: skip
    add_config_option(db)
    db.add_argument("db_command", choices=["upgrade", "status"])
    db.set_defaults(func=cmd_db)
