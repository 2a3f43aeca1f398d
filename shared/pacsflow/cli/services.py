"""Running services: ``pacsflow run [SERVICE...]`` and ``pacsflow <service>``."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from pacsflow.cli.common import EXIT_USAGE, add_config_option, fail, settings_of
from pacsflow.config import SERVICES

__all__ = ["add_service_commands", "run_services_of"]


def run_services_of(args: argparse.Namespace, names: Sequence[str]) -> int:
    """Run ``names`` in this process until a signal; the exit code."""
    from pacsflow.logs import configure_logging
    from pacsflow.runtime import run_services

    settings = settings_of(args)
    configure_logging(settings.logging)
    return asyncio.run(run_services(settings, names))


def cmd_service(args: argparse.Namespace) -> int:
    """``pacsflow <service>``: one service (as a container runs it)."""
    return run_services_of(args, [args.service])


def cmd_run(args: argparse.Namespace) -> int:
    """``pacsflow run [SERVICE...]``."""
    unknown = [name for name in args.services if name not in SERVICES]
    if unknown:
        return fail(f"unknown service(s): {', '.join(unknown)}; known: {', '.join(SERVICES)}",
                    EXIT_USAGE)
    return run_services_of(args, args.services or list(SERVICES))


def add_service_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``run`` and one command per service (``sync`` gets its options elsewhere)."""
    for service in SERVICES:
        sub = commands.add_parser(service, help=f"run the {service} service")
        add_config_option(sub)
        sub.set_defaults(func=cmd_service, service=service)
        if service == "sync":
            from pacsflow.cli.transfers import add_sync_options

            add_sync_options(sub)
    run = commands.add_parser("run", help="run several services in one process (default: all)")
    add_config_option(run)
    run.add_argument("services", nargs="*", metavar="SERVICE", help=", ".join(SERVICES))
    run.set_defaults(func=cmd_run)
