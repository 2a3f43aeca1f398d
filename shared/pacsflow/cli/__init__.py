"""The ``pacsflow`` command: run services, set up and check the configuration, and see and
repair what pacsflow is doing (status, ledger, dead letters, harvest, sync).

One module per command group; :mod:`pacsflow.cli.common` defines the exit codes every
command uses (0 all good, 1 failed or not healthy, 2 bad usage or configuration, 3 a peer
unreachable).
"""

from pacsflow.cli.common import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from pacsflow.cli.main import build_parser, main

# The name the sync tests know the option translation by.
from pacsflow.cli.transfers import sync_overrides as _sync_overrides  # noqa: E402

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE", "build_parser", "main"]
