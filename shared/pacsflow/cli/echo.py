"""``pacsflow echo``: C-ECHO a node with the round-trip time, saying plainly what failed.

:func:`check_node` is also how ``config init`` tests each node as it is entered. It first
opens a TCP connection alone, so that a refused connection, a host that does not answer and
a PACS that answers but rejects our AE titles read differently, as an administrator needs.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from pacsflow.cli.common import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, fail, settings_of
from pacsflow.config import Node

if TYPE_CHECKING:
    from pacsflow.dicom.options import NetworkOptions

__all__ = ["EchoResult", "check_node", "cmd_echo"]

Outcome = Literal[
    "ok",
    "unknown-host",
    "refused",
    "timeout",
    "unreachable",
    "no-answer",
    "ae-title-rejected",
    "rejected",
    "no-verification",
    "echo-failed",
]

#: outcomes where nothing answered DICOM at that address (exit code 3)
UNREACHABLE: frozenset[str] = frozenset(
    {"unknown-host", "refused", "timeout", "unreachable", "no-answer"}
)

# A-ASSOCIATE-RJ reasons from the service user (PS3.8 Table 9-21, source 1).
_CALLING_AE_NOT_RECOGNISED = 3
_CALLED_AE_NOT_RECOGNISED = 7


@dataclass(frozen=True, slots=True)
class EchoResult:
    """How one C-ECHO went: ``ok``, or what failed and a sentence saying so."""

    node: str
    outcome: Outcome
    message: str
    round_trip_ms: float | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def _tcp_probe(node: Node, timeout: float) -> EchoResult | None:
    """None when a TCP connection opens; else why not."""
    where = f"{node.host}:{node.port}"
    try:
        addresses = socket.getaddrinfo(node.host, node.port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        return EchoResult(str(node), "unknown-host",
                          f"unknown host {node.host!r} ({err.strerror})")
    family, kind, proto, _, address = addresses[0]
    with socket.socket(family, kind, proto) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except ConnectionRefusedError:
            return EchoResult(str(node), "refused",
                              f"connection refused: nothing listens on {where}")
        except TimeoutError:
            return EchoResult(str(node), "timeout",
                              f"timeout: {where} did not answer within {timeout:g} s "
                              "(host down or a firewall)")
        except OSError as err:
            return EchoResult(str(node), "unreachable",
                              f"{where} is unreachable: {err.strerror or err}")
    return None


def check_node(node: Node, options: NetworkOptions) -> EchoResult:
    """C-ECHO ``node``: the round trip, or which step failed and why, in a sentence."""
    from pacsflow.dicom import NoAcceptedContexts, RejectedByPeer, echo
    from pacsflow.errors import AssociationRejected, DicomError, DimseFailure

    refused = _tcp_probe(node, options.connect_timeout)
    if refused is not None:
        return refused
    try:
        seconds = echo(node, options)
    except RejectedByPeer as err:
        if err.source == 1 and err.reason == _CALLED_AE_NOT_RECOGNISED:
            return EchoResult(str(node), "ae-title-rejected",
                              f"AE title rejected: {node.host}:{node.port} does not know the "
                              f"called AE title {node.ae_title!r}")
        if err.source == 1 and err.reason == _CALLING_AE_NOT_RECOGNISED:
            return EchoResult(str(node), "ae-title-rejected",
                              f"AE title rejected: {node} does not know our AE title "
                              f"{options.ae_title!r} (add it to the PACS's known nodes)")
        return EchoResult(str(node), "rejected", f"association rejected: {err}")
    except NoAcceptedContexts:
        return EchoResult(str(node), "no-verification",
                          f"{node} accepted the association but not C-ECHO (Verification)")
    except AssociationRejected:
        return EchoResult(str(node), "no-answer",
                          f"no DICOM answer: {node.host}:{node.port} accepted the connection "
                          f"but closed it or did not answer within {options.acse_timeout:g} s")
    except DimseFailure as err:
        return EchoResult(str(node), "echo-failed", f"C-ECHO failed: {err}")
    except DicomError as err:
        return EchoResult(str(node), "echo-failed", f"C-ECHO failed: {err}")
    return EchoResult(str(node), "ok", f"success in {seconds * 1000:.1f} ms",
                      round_trip_ms=round(seconds * 1000, 3))


def exit_code_of(results: list[EchoResult]) -> int:
    """0 when every echo succeeded; 3 when a node was unreachable; else 1."""
    if all(r.ok for r in results):
        return EXIT_OK
    if any(r.outcome in UNREACHABLE for r in results):
        return EXIT_UNREACHABLE
    return EXIT_FAILED


def cmd_echo(args: argparse.Namespace) -> int:
    """``pacsflow echo NODE|AET@HOST:PORT [--count N] [--json]``."""
    from pacsflow.dicom.options import NetworkOptions

    settings = settings_of(args)
    node = settings.node(args.node)
    options = NetworkOptions.from_settings(settings.dicom)
    results: list[EchoResult] = []
    for index in range(args.count):
        if index:
            time.sleep(args.interval)
        result = check_node(node, options)
        results.append(result)
        if not args.json:
            print(f"C-ECHO {node}: {result.message}", flush=True)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    code = exit_code_of(results)
    if code != EXIT_OK:
        failed = [r for r in results if not r.ok]
        return fail(f"echo {node}: {len(failed)} of {len(results)} failed: {failed[-1].message}",
                    code)
    return EXIT_OK


def add_echo_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``echo``."""
    from pacsflow.cli.common import add_config_option

    echo_cmd = commands.add_parser(
        "echo", help="C-ECHO a node, with the round-trip time",
        description="C-ECHO a configured node (by name) or AET@HOST:PORT, like echoscu. "
                    "Exit 0: answered; 3: unreachable (refused, timeout, no answer); "
                    "1: reachable but refused (AE title rejected, C-ECHO failed).",
    )  # fmt: skip
    add_config_option(echo_cmd)
    echo_cmd.add_argument("node", metavar="NODE|AET@HOST:PORT")
    echo_cmd.add_argument("--count", type=int, default=1, help="how many echoes (default 1)")
    echo_cmd.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                          help="between echoes (default 1)")
    echo_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    echo_cmd.set_defaults(func=cmd_echo)
