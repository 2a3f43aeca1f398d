"""A slow link: the watcher and the uploader send over a line shaped to 4 Mbit/s.

A PACS behind a thin line (a remote site, a VPN) takes seconds per image. The DICOM timeouts
bound silence, not the length of a transfer: with ``dimse_timeout`` and ``network_timeout``
of 2 s, images that take about 4 s each on the wire still arrive, once each, and are
archived.

The line is real: a network namespace of the test's own whose loopback has a token bucket
filter (``tc qdisc … tbf``, 4 Mbit/s). ``storescp`` and ``pacsflow run watcher uploader``
(embedded bus, SQLite state) run inside it; nothing leaves the namespace's loopback.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.dicom.synthetic import write_ct_series
from tests.reliability.support import wait_until
from tests.uploader.support import Storescp

pytestmark = [pytest.mark.dcmtk, pytest.mark.timeout(300)]

RATE_MBIT = 4
FILES = 3
# 1024 × 1024 16-bit pixels: about 2 MB, some 4 s on the shaped line.
ROWS = COLUMNS = 1024


@pytest.fixture
def slow_namespace() -> Iterator[str]:
    """A network namespace whose loopback carries RATE_MBIT Mbit/s."""
    name = f"pfslow{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        # tbf drops packets larger than its bucket: an Ethernet MTU, not loopback's 64 KiB.
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "mtu", "1500", "up"],
                       check=True)  # fmt: skip
        subprocess.run(
            ["tc", "-n", name, "qdisc", "add", "dev", "lo", "root", "tbf",
             "rate", f"{RATE_MBIT}mbit", "burst", "32kb", "limit", "256kb"],
            check=True,
        )  # fmt: skip
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _in_namespace(name: str, command: list[str]) -> list[str]:
    return ["ip", "netns", "exec", name, *command]


def _wait_for_port_in(name: str, port: int, process: subprocess.Popen[bytes]) -> None:
    probe = (f"import socket; s = socket.create_connection(('127.0.0.1', {port}), 1); "
             "s.close()")  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, "storescp ended at start"
        if subprocess.run(_in_namespace(name, [sys.executable, "-c", probe]),
                          capture_output=True).returncode == 0:  # fmt: skip
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} in {name}")


@pytest.mark.parametrize("engine", ["lean", "asyncio"])
async def test_images_slower_than_the_timeouts_arrive_over_a_thin_line(
    tmp_path: Path, slow_namespace: str, engine: str
) -> None:
    staging = tmp_path / "staging" / "#7-Thin"
    write_ct_series(staging / "series", FILES, rows=ROWS, columns=COLUMNS)
    total_bytes = sum(p.stat().st_size for p in staging.rglob("*.dcm"))
    pacs = Storescp(tmp_path / "pacs", ae_title="THINPACS", fork=False)
    pacs.folder.mkdir(parents=True)
    port = 11112
    with open(tmp_path / "storescp.log", "ab") as log:
        storescp = subprocess.Popen(
            _in_namespace(slow_namespace, [
                "env", "TCP_NODELAY=1", require_tool("storescp"), "+xa", "-aet", pacs.ae_title,
                "-od", str(pacs.folder), "+uf", str(port)]),
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    config = tmp_path / "pacsflow.yaml"
    config.write_text(f"""
logging: {{level: INFO, format: json}}
state: {{backend: sqlite, path: {tmp_path}/state.db}}
bus: {{backend: embedded}}
http: {{host: 127.0.0.1, port: 9400}}
dicom: {{ae_title: PFTHIN, connect_timeout: 3, acse_timeout: 5, dimse_timeout: 2,
        network_timeout: 2}}
nodes:
  pacs: {{ae_title: THINPACS, host: 127.0.0.1, port: {port}}}
watcher:
  import_folders: [{tmp_path}/inbox]
  archive_folder: {tmp_path}/archive
  quarantine_folder: {tmp_path}/quarantine
  debounce_seconds: 0.3
  archive_interval_seconds: 0.5
uploader:
  destinations: [pacs]
  engine: {engine}
  processes: 0
  associations: 1
  retry_initial_seconds: 0.5
  max_attempts: 2
""")
    (tmp_path / "inbox").mkdir()
    service: subprocess.Popen[bytes] | None = None
    try:
        await asyncio.to_thread(_wait_for_port_in, slow_namespace, port, storescp)
        with open(tmp_path / "pacsflow.log", "ab") as log:
            service = subprocess.Popen(
                _in_namespace(slow_namespace, [
                    sys.executable, "-m", "pacsflow", "-c", str(config),
                    "run", "watcher", "uploader"]),
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
            )  # fmt: skip
        started = time.monotonic()
        shutil.move(staging, tmp_path / "inbox")

        def done() -> bool:
            assert service is not None and service.poll() is None, (
                "pacsflow run ended:\n" + (tmp_path / "pacsflow.log").read_text()[-3000:])
            return not any((tmp_path / "inbox").rglob("*.dcm"))

        await wait_until(done, 120, "every file sent and archived")
        elapsed = time.monotonic() - started
    finally:
        if service is not None:
            service.terminate()
            assert service.wait(timeout=60) == 0, (tmp_path / "pacsflow.log").read_text()[-3000:]
        storescp.terminate()
        storescp.wait(timeout=10)
    received = pacs.uids()
    with sqlite3.connect(tmp_path / "state.db") as db:
        deliveries = dict(db.execute(
            "SELECT status, count(*) FROM ledger_deliveries GROUP BY status").fetchall())
        attempts = db.execute("SELECT max(attempts) FROM ledger_deliveries").fetchone()[0]
    assert len(received) == FILES and set(received.values()) == {1}
    assert deliveries == {"sent": FILES}
    # Each image went through on its first attempt: no timeout fired on the slow line.
    assert attempts == 1
    assert len(list((tmp_path / "archive").rglob("*.dcm"))) == FILES
    # The line was as thin as it should be: each image took longer than the timeouts.
    per_file = total_bytes * 8 / (RATE_MBIT * 1_000_000) / FILES
    assert per_file > 2 * 1.5 and elapsed >= per_file * FILES * 0.9
