"""Private RabbitMQ and PostgreSQL servers that a test may stop, kill and start again.

The machine's shared servers serve other test runs at the same time; restarting them would
disturb those. These run from the Debian binaries on free ports in a folder of the test's own,
and ``stop()``/``kill()`` end exactly the processes that ``start()`` began (their own
process group).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.peers import free_port

__all__ = ["PrivatePostgres", "PrivateRabbit"]

_RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def _postgres_bin() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not versions:
        raise RuntimeError("PostgreSQL server binaries are missing: apt-get install postgresql")
    return versions[-1].parent


def _end_group(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


class PrivateRabbit:
    """A RabbitMQ node of its own (name, ports, data) under ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.node = f"pf-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = 0
        self.dist_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "rabbit.out"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HOME=str(self.folder),  # the Erlang cookie of this node and its rabbitmqctl
            RABBITMQ_CONF_ENV_FILE=str(self.folder / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.folder / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.folder / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.folder / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.folder / "rabbitmq.conf"),
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def start(self) -> Self:
        """Start the node (the same data and ports after a stop or kill); wait until it serves."""
        if not (_RABBIT_BIN / "rabbitmq-server").exists():
            raise RuntimeError("rabbitmq-server is missing: apt-get install rabbitmq-server")
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port, self.dist_port = free_port(), free_port()
            (self.folder / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
            (self.folder / "enabled_plugins").write_text("[].\n")
            (self.folder / "rabbitmq.conf").write_text(
                f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n"
            )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(_RABBIT_BIN / "rabbitmq-server")], stdout=log, stderr=subprocess.STDOUT,
                env=self._env(), start_new_session=True, cwd=self.folder,
            )  # fmt: skip
        try:
            self._wait_started()
        except BaseException:
            # __exit__ does not run when __enter__ fails: end the node here.
            self.kill()
            raise
        return self

    def _wait_started(self, timeout: float = 90) -> None:
        # await_startup fails at once until the node has registered with epmd: retry it.
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited:\n{self.tail()}")
            try:
                self.ctl("await_startup", "--timeout", "60", timeout=70)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl`` against this node; its output (raises on failure)."""
        result = subprocess.run(
            [str(_RABBIT_BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self._env(), capture_output=True, text=True, timeout=timeout, cwd=self.folder,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr}{self.tail()}")
        return result.stdout

    def restart_app(self) -> None:
        """``stop_app`` / ``start_app``: the broker goes away, the Erlang node stays."""
        self.ctl("stop_app")
        time.sleep(1)
        self.ctl("start_app")

    def stop(self) -> None:
        """A clean shutdown of the whole node."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        _end_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _end_group(process, signal.SIGKILL)
            process.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the node: no chance to flush or say goodbye."""
        process, self.process = self.process, None
        if process is None:
            return
        _end_group(process, signal.SIGKILL)
        process.wait(timeout=10)
        # epmd forgets a killed node only after noticing; a restart registers it again.
        time.sleep(0.5)

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:  # fmt: skip
        if self.process is not None:
            _end_group(self.process, signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None


class PrivatePostgres:
    """A PostgreSQL cluster of its own, owned by the ``postgres`` user when run as root.

    The data folder lives in a temporary folder that user can reach (pytest's are private to
    root); it is removed on exit.
    """

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.folder = Path(tempfile.mkdtemp(prefix="pacsflow-pg-"))
        self.data = self.folder / "data"
        self.port = 0
        self.log_path = self.folder / "postgres.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, user="postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [*self._as_user, *args], capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stdout}{result.stderr}{self.tail()}")

    def start(self) -> Self:
        if not self.port:
            self.port = free_port()
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                      "-U", "postgres", "--no-sync")  # fmt: skip
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
                   " -c fsync=off -c max_connections=200")  # fmt: skip
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
                  "-l", str(self.log_path), "-w", "-t", "60", "start")  # fmt: skip
        return self

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop``; mode ``immediate`` is a crash (recovery at the next start)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "immediate", down_seconds: float = 2.0) -> None:
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:  # fmt: skip
        try:
            self.stop("immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass  # not running
        shutil.rmtree(self.folder, ignore_errors=True)
