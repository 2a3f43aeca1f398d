"""Helpers for the reliability tests: pacsflow services as real processes, their metrics,
logs and memory, and polling without timing assertions."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import psutil

from tests.peers import free_port

__all__ = ["ServiceProcess", "wait_until", "log_records", "pacsflow_command"]


def pacsflow_command(config: Path, *args: str, env: Mapping[str, str] | None = None,
                     timeout: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ``pacsflow -c CONFIG ARGS…`` to completion; its output."""
    return subprocess.run(
        [sys.executable, "-m", "pacsflow", "-c", str(config), *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


class ServiceProcess:
    """``pacsflow <service> -c CONFIG`` in a child process with its own metrics port.

    It writes its log to ``<config folder>/<name>.log`` (appending across restarts). A process
    that exits on its own is noted in ``exits`` (with its code) by :meth:`check`.
    """

    def __init__(self, config: Path, service: str, *, name: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:  # fmt: skip
        self.config = config
        self.service = service
        self.name = name or service
        self.http_port = free_port()
        self.env = {**os.environ, "PACSFLOW_HTTP__PORT": str(self.http_port),
                    "PACSFLOW_HTTP__HOST": "127.0.0.1", **(env or {})}  # fmt: skip
        self.log = config.parent / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exits: list[int] = []

    def start(self) -> ServiceProcess:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacsflow", "-c", str(self.config), self.service],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )  # fmt: skip
        self.starts += 1
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self) -> None:
        """Raise with the log's tail if the process ended on its own."""
        if self.process is not None and self.process.poll() is not None:
            self.exits.append(self.process.returncode)
            code, self.process = self.process.returncode, None
            raise AssertionError(f"{self.name} exited with {code}:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL: no chance to finish or record anything."""
        assert self.process is not None, f"{self.name} is not running"
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit code (0 when it stopped cleanly)."""
        process, self.process = self.process, None
        if process is None:
            return 0
        if process.poll() is None:
            process.terminate()
            try:
                return process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
                return -9
        return process.returncode

    def rss(self) -> int:
        """Resident memory of the process in bytes."""
        assert self.process is not None
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return str(answer.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from /metrics (0 when absent)."""
        wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
                         if labels else "")  # fmt: skip
        for line in self.metrics_text().splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def metric_sum(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include ``labels``."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                head = line.rsplit(" ", 1)[0]
                if all(f'{k}="{v}"' in head for k, v in labels.items()):
                    total += float(line.split()[-1])
        return total

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/readyz", timeout=2
            ) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def log_records(path: Path) -> list[dict[str, object]]:
    """The JSON lines of a log file (lines that are not JSON are skipped)."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


async def wait_until(
    condition: Callable[[], Awaitable[bool] | bool], timeout: float, what: str,
    *, poll: float = 0.1, alive: tuple[ServiceProcess, ...] = (),
) -> None:  # fmt: skip
    """Poll until ``condition`` holds; fail naming ``what`` (and any process that died)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        for service in alive:
            service.check()
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {s.name}\n{s.tail(1500)}" for s in alive)
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{tails}")
        await asyncio.sleep(poll)
