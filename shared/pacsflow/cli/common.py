"""What every command shares: exit codes, settings, the state store and bus, output helpers.

Exit codes, the same for every command (README, "The pacsflow command"):

* 0 all good;
* 1 the operation failed, or something is not healthy (``status``);
* 2 bad usage or configuration;
* 3 a peer could not be reached (a DICOM node, the event bus, the state store).

Every error exit prints one line on standard error saying why; ``--json`` output goes to
standard output only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TextIO

from pacsflow.config import Settings, load_settings
from pacsflow.errors import BusError, PacsflowError, StoreError

if TYPE_CHECKING:
    from pacsflow.bus.base import EventBus
    from pacsflow.store.base import Database

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "PeerUnreachable",
    "add_config_option",
    "bus",
    "database",
    "fail",
    "is_terminal",
    "settings_of",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class PeerUnreachable(PacsflowError):
    """A DICOM node, the event bus or the state store did not answer."""

    exit_code = EXIT_UNREACHABLE


def fail(message: str, code: int = EXIT_FAILED) -> int:
    """Print the one-line reason of an error exit on standard error; the exit code."""
    print(f"pacsflow: {message}", file=sys.stderr)
    return code


def is_terminal(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (standard output) is a terminal: bars and colours, not lines."""
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings of ``-c FILE`` (or ``$PACSFLOW_CONFIG``, or the defaults)."""
    return load_settings(args.config)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``-c FILE`` on a command (accepted before or after the command's name)."""
    parser.add_argument(
        "-c",
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="YAML configuration file (default: $PACSFLOW_CONFIG, else built-in defaults)",
    )


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[Database]:
    """The state store, open for the block; PeerUnreachable when it cannot be opened."""
    from pacsflow.store import open_database

    try:
        db = await open_database(settings.state)
    except StoreError as err:
        raise PeerUnreachable(f"state store: {err}") from err
    try:
        yield db
    finally:
        await db.close()


@asynccontextmanager
async def bus(settings: Settings) -> AsyncIterator[EventBus]:
    """The event bus, started for the block; PeerUnreachable when it cannot be reached."""
    from prometheus_client import CollectorRegistry

    from pacsflow.bus import create_bus

    event_bus: Any = create_bus(settings, CollectorRegistry())
    try:
        await event_bus.start()
    except BusError as err:
        raise PeerUnreachable(f"event bus: {err}") from err
    try:
        yield event_bus
    finally:
        await event_bus.close()
