"""``pacsflow config check|show|init``."""

from __future__ import annotations

import argparse
import json

from pacsflow.cli.common import EXIT_OK, add_config_option, settings_of
from pacsflow.config import load_settings

__all__ = ["add_config_command"]


def cmd_config_check(args: argparse.Namespace) -> int:
    """``pacsflow config check FILE``: validate without starting anything."""
    settings = load_settings(args.file)
    print(f"{args.file}: ok (bus {settings.bus.backend}, state {settings.state.backend}, "
          f"{len(settings.nodes)} node(s), {len(settings.router.routes)} route(s))")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    """``pacsflow config show``: the effective configuration (secrets masked)."""
    # SecretStr fields print as '**********': secrets never reach the terminal.
    settings = settings_of(args)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return EXIT_OK


def add_config_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``config``."""
    from pacsflow.cli.config_init import add_init_command

    config = commands.add_parser("config", help="set up, check or show the configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True,
                                            metavar="ACTION")
    add_init_command(config_commands)
    check = config_commands.add_parser(
        "check", help="validate a configuration file (names the bad key; exit 2)")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)
    show = config_commands.add_parser("show", help="print the effective configuration")
    add_config_option(show)
    show.set_defaults(func=cmd_config_show)
