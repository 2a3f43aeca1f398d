"""The uploader over a bad link: a TCP proxy between it and DCMTK ``storescp`` stalls the
traffic (no bytes, no reset: a hung PACS or a dead route) and later resets every connection,
in the middle of sending. The uploader gives up on the hung associations by its own timeouts,
sends again once the link is back, and every file arrives and is archived, each recorded as
sent once."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.dicom.synthetic import write_ct_series
from tests.reliability.proxy import StallingProxy
from tests.reliability.support import ServiceProcess, wait_until
from tests.uploader.support import Storescp

pytestmark = [pytest.mark.dcmtk, pytest.mark.timeout(300)]

FILES = 600


def write_config(folder: Path, proxy_port: int) -> Path:
    path = folder / "pacsflow.yaml"
    path.write_text(f"""
logging: {{level: INFO, format: json}}
state: {{backend: sqlite, path: {folder}/state.db}}
bus: {{backend: embedded, declare_services: [watcher, uploader]}}
dicom: {{ae_title: PFLINK, connect_timeout: 2, acse_timeout: 3, dimse_timeout: 3,
        network_timeout: 3}}
nodes:
  pacs: {{ae_title: STORESCP, host: 127.0.0.1, port: {proxy_port}}}
watcher:
  import_folders: [{folder}/inbox]
  archive_folder: {folder}/archive
  quarantine_folder: {folder}/quarantine
  debounce_seconds: 0.3
  archive_interval_seconds: 0.5
uploader:
  destinations: [pacs]
  associations: 2
  processes: 0
  chunk_size: 8
  retry_initial_seconds: 0.2
  retry_max_seconds: 1
  max_load_per_core: 100
""")
    return path


async def test_stalled_then_reset_link_mid_send_loses_nothing(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path / "staging" / "#1-Link" / "series", FILES, rows=64,
                             columns=64)  # fmt: skip
    with Storescp(tmp_path / "pacs", fork=True) as pacs:
        proxy = StallingProxy("127.0.0.1", pacs.port)
        await proxy.start()
        config = write_config(tmp_path, proxy.port)
        services = (ServiceProcess(config, "uploader").start(),
                    ServiceProcess(config, "watcher").start())  # fmt: skip
        uploader = services[0]

        def at_pacs() -> int:
            return sum(1 for _ in (tmp_path / "pacs").iterdir())

        try:
            await wait_until(lambda: all(s.ready() for s in services), 60, "services ready",
                             alive=services)  # fmt: skip
            shutil.move(tmp_path / "staging" / "#1-Link", tmp_path / "inbox")
            await wait_until(lambda: at_pacs() >= FILES // 6, 60, "a part sent", poll=0.01,
                             alive=services)  # fmt: skip
            proxy.stall()
            stalled_at = at_pacs()
            # The uploader notices by its own timeouts: it says so and tries again.
            await wait_until(lambda: "association with STORESCP" in uploader.tail(20000)
                             or "no association with STORESCP" in uploader.tail(20000), 60,
                             "the uploader noticing the hung link", alive=services)  # fmt: skip
            proxy.resume()
            await wait_until(lambda: at_pacs() >= stalled_at + FILES // 6, 60,
                             "sending again after the stall", poll=0.01, alive=services)  # fmt: skip
            proxy.cut()
            await wait_until(lambda: not any((tmp_path / "inbox").rglob("*.dcm")), 120,
                             "every file archived", alive=services)  # fmt: skip
            for service in services:
                assert service.stop() == 0, service.tail()
        finally:
            for service in services:
                service.stop()
            await proxy.close()
        received = pacs.uids()

    assert len(received) == len(series)
    with sqlite3.connect(tmp_path / "state.db") as conn:
        deliveries = dict(conn.execute(
            "SELECT status, count(*) FROM ledger_deliveries GROUP BY status"))
    assert deliveries == {"sent": FILES}
    assert len(list((tmp_path / "archive").rglob("*.dcm"))) == FILES
    # Repeats only from the windows in flight when the link hung and when it was reset.
    assert sum(received.values()) - len(received) <= 2 * 2 * 8
