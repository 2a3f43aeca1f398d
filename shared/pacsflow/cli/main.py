"""The ``pacsflow`` argument parser and entry point: one module per command group."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from pacsflow.cli.common import EXIT_FAILED, EXIT_USAGE, add_config_option, fail
from pacsflow.errors import ConfigError, PacsflowError

__all__ = ["build_parser", "main"]

#: commands that report and repair; the others run services and log as configured
_REPORTING_COMMANDS = frozenset(
    {"config", "db", "status", "echo", "ledger", "harvest", "dead-letters"}
)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line on standard error, exit 2 (``--help`` shows the rest)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]
        fail(f"{command + ': ' if command else ''}{message} (see `{self.prog} --help`)",
             EXIT_USAGE)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pacsflow`` command."""
    from pacsflow.cli.configuration import add_config_command
    from pacsflow.cli.dead_letters import add_dead_letters_command
    from pacsflow.cli.echo import add_echo_command
    from pacsflow.cli.ledger import add_ledger_command
    from pacsflow.cli.services import add_service_commands
    from pacsflow.cli.state import add_db_command
    from pacsflow.cli.status import add_status_command
    from pacsflow.cli.transfers import add_harvest_command, add_send_command

    parser = _Parser(
        prog="pacsflow",
        description="Move DICOM images between folders, PACS servers and research storage. "
                    "Exit codes: 0 all good, 1 the work failed or something is not healthy, "
                    "2 bad usage or configuration, 3 a peer (DICOM node, bus, state store) "
                    "unreachable.",
    )  # fmt: skip
    add_config_option(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)
    add_service_commands(commands)
    add_config_command(commands)
    add_db_command(commands)
    add_status_command(commands)
    add_echo_command(commands)
    add_send_command(commands)
    add_ledger_command(commands)
    add_harvest_command(commands)
    add_dead_letters_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pacsflow`` console script; the exit code."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        # argparse gives a list positional nothing once an option came between it and the
        # action (`dead-letters purge --service notifier ID`): such ids are taken here.
        if getattr(args, "ids", None) is None or any(e.startswith("-") for e in extras):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        try:
            args.ids = [*args.ids, *map(getattr(args, "id_type", str), extras)]
        except ValueError:
            parser.error(f"not an id: {' '.join(extras)}")
    if not hasattr(args, "config"):
        args.config = os.environ.get("PACSFLOW_CONFIG")
    if args.command in _REPORTING_COMMANDS:
        # Libraries' warnings (a refused connection to the broker) would add lines to the
        # one-line reason of an error exit; the reason says what matters.
        logging.getLogger().addHandler(logging.NullHandler())
    try:
        return int(args.func(args))
    except ConfigError as err:
        # A configuration error names the file and each bad key, one per line after the first.
        first, *rest = str(err).splitlines() or [""]
        fail(first + (": " + "; ".join(line.strip() for line in rest) if rest else ""))
        return EXIT_USAGE
    except PacsflowError as err:
        return fail(str(err).replace("\n", "; "), getattr(err, "exit_code", EXIT_FAILED))
    except OSError as err:
        return fail(f"{err.filename or ''}{': ' if err.filename else ''}{err.strerror or err}")
    except KeyboardInterrupt:
        return fail("interrupted")
