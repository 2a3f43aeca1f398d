"""Running the ``pacsflow`` command in tests: as a child process, with its own configuration.

Output goes to files, never to an unread pipe (a full pipe blocks the child).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.peers import free_port

__all__ = ["PacsflowProcess", "embedded_config", "pacsflow", "wait_until"]


def pacsflow(*args: str, timeout: float = 90, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
    """Run ``pacsflow ARGS`` to its end; its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "pacsflow", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def status_json(config: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``pacsflow status --json`` as data (whatever its exit code)."""
    result = pacsflow("-c", str(config), "status", "--json", env=env)
    assert result.returncode in (0, 1) and result.stdout.startswith("{"), result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    report["exit_code"] = result.returncode
    report["stderr"] = result.stderr
    return report


def wait_until(condition: Callable[[], Any], timeout: float = 60, what: str = "condition",
               interval: float = 0.3) -> Any:
    """Poll ``condition`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def embedded_config(folder: Path, extra: str = "") -> Path:
    """A configuration for one machine (SQLite, embedded bus) in ``folder``, free ports."""
    data = folder / "data"
    text = f"""
http: {{host: 127.0.0.1, port: {free_port()}}}
logging: {{format: json, level: INFO}}
state: {{backend: sqlite, path: {data}/pacsflow.db}}
nodes:
  router: {{ae_title: PACSFLOW, host: 127.0.0.1, port: {free_port()}}}
watcher:
  import_folders: [{data}/inbox]
  archive_folder: {data}/archive
  quarantine_folder: {data}/quarantine
  debounce_seconds: 0.5
  archive_interval_seconds: 1
router:
  routes:
    PACSFLOW: {{path: {data}/storage}}
notifier:
  mail_folder: {data}/mail
{extra}"""
    path = folder / "pacsflow.yaml"
    path.write_text(text)
    return path


class PacsflowProcess:
    """``pacsflow ARGS`` running in the background until stopped (SIGTERM, or SIGKILL)."""

    def __init__(self, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacsflow", *args], stdout=log, stderr=log, text=True,
                env={**os.environ, **(env or {})},
            )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running(log_path: Path, *args: str, env: dict[str, str] | None = None,
            ) -> Iterator[PacsflowProcess]:
    """A PacsflowProcess stopped (SIGTERM) when the block ends."""
    process = PacsflowProcess(log_path, *args, env=env)
    try:
        yield process
    finally:
        process.stop(signal.SIGTERM)
