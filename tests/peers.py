"""Real DICOM peers for tests: DCMTK ``storescp`` and Orthanc, each on free ports.

Both run as child processes with ``TCP_NODELAY=1`` (DCMTK and Orthanc disable Nagle only
when asked, TESTING.md) in a folder of the test's own; ``stop()`` ends exactly the process
that ``start()`` began. Use them as context managers::

    with StoreSCPProcess(tmp_path / "in") as scp:
        ...  # scp.node is the Node to send to, scp.files() what arrived

    modalities = {"PFSCP": ("PFSCP", "127.0.0.1", port)}
    with OrthancProcess(tmp_path / "orthanc", modalities=modalities) as pacs:
        pacs.upload(paths)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from pacsflow.config import Node

__all__ = ["OrthancProcess", "StoreSCPProcess", "free_port", "wait_for_port"]


def free_port() -> int:
    """A TCP port that nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Wait until ``process`` accepts connections on ``port``; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args[0]} exited with {process.returncode} before listening"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{process.args[0]} did not listen on port {port} within {timeout} s")


def _tool(name: str) -> str:
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path is None:
        raise RuntimeError(f"{name} is not installed: run .ci/run, which installs it")
    return path


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


class _ChildProcess:
    process: subprocess.Popen[bytes] | None = None
    log_path: Path

    def stop(self) -> None:
        """End the process this object started (terminate, then kill after 5 s)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def log(self) -> str:
        """What the process wrote to stdout and stderr so far (for failure messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class StoreSCPProcess(_ChildProcess):
    """DCMTK ``storescp`` writing what it receives into ``folder``."""

    def __init__(
        self,
        folder: Path,
        ae_title: str = "STORESCP",
        accept_all_syntaxes: bool = True,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.folder = folder
        # +xa: every transfer syntax DCMTK knows, compressed ones included; without it
        # storescp accepts only the uncompressed ones.
        self.syntax_args = ["+xa"] if accept_all_syntaxes else []
        self.ae_title = ae_title
        self.extra_args = list(extra_args)
        self.port = 0
        self.log_path = folder.parent / f"{folder.name}.storescp.log"

    @property
    def node(self) -> Node:
        return Node(ae_title=self.ae_title, host="127.0.0.1", port=self.port)

    def start(self) -> StoreSCPProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [_tool("storescp"), *self.syntax_args, "-aet", self.ae_title,
                     "-od", str(self.folder), *self.extra_args, str(self.port)],
                    stdout=log, stderr=subprocess.STDOUT, env=_environment(),
                )  # fmt: skip
            try:
                wait_for_port(self.port, self.process)
                return self
            except RuntimeError:
                # Another process took the port between our check and storescp's bind.
                self.stop()
                if attempt == 2:
                    raise
        return self

    def files(self) -> list[Path]:
        return sorted(path for path in self.folder.iterdir() if path.is_file())

    def __enter__(self) -> StoreSCPProcess:
        return self.start()


class OrthancProcess(_ChildProcess):
    """Orthanc in the foreground with its own ports, storage and DICOM modalities.

    ``modalities`` maps a name to (AE title, host, port): the peers Orthanc may C-MOVE to
    and that may query it. C-FIND, C-MOVE and C-GET are allowed from any AE.
    """

    def __init__(
        self,
        folder: Path,
        ae_title: str = "ORTHANC",
        modalities: Mapping[str, tuple[str, str, int]] | None = None,
    ) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.modalities = dict(modalities or {})
        self.dicom_port = 0
        self.http_port = 0
        self.log_path = folder / "orthanc.log"

    @property
    def node(self) -> Node:
        return Node(ae_title=self.ae_title, host="127.0.0.1", port=self.dicom_port)

    def _config(self) -> dict[str, Any]:
        return {
            "Name": "pacsflow-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {name: list(entry) for name, entry in self.modalities.items()},
            "DicomScuTimeout": 10,
            "DicomThreadsCount": 2,
            "HttpThreadsCount": 4,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "DicomAssociationCloseDelay": 0,
        }

    def start(self) -> OrthancProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.dicom_port, self.http_port = free_port(), free_port()
            config_path = self.folder / "orthanc.json"
            config_path.write_text(json.dumps(self._config(), indent=2))
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [_tool("Orthanc"), str(config_path)],
                    stdout=log, stderr=subprocess.STDOUT, env=_environment(), cwd=self.folder,
                )  # fmt: skip
            try:
                wait_for_port(self.http_port, self.process, timeout=30)
                wait_for_port(self.dicom_port, self.process, timeout=30)
                return self
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise RuntimeError(f"Orthanc did not start:\n{self.log()[-3000:]}") from None
        return self

    def __enter__(self) -> OrthancProcess:
        return self.start()

    def rest(self, method: str, path: str, body: bytes | None = None) -> Any:
        """Call Orthanc's REST API; JSON answers are decoded."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
        if response.headers.get_content_type() == "application/json":
            return json.loads(payload)
        return payload

    def upload(self, paths: Iterable[Path]) -> int:
        """Store files through the REST API (no DICOM involved); return how many."""
        count = 0
        for path in paths:
            self.rest("POST", "/instances", path.read_bytes())
            count += 1
        return count

    def instance_count(self) -> int:
        return int(self.rest("GET", "/statistics")["CountInstances"])

    def add_modality(self, name: str, ae_title: str, host: str, port: int) -> None:
        """Register a C-MOVE destination at run time (e.g. an SCP on a port picked later)."""
        body = json.dumps({"AET": ae_title, "Host": host, "Port": port}).encode()
        self.rest("PUT", f"/modalities/{name}", body)
