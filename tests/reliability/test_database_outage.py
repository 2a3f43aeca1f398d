"""A PostgreSQL outage while a folder arrives: the watcher and the uploader stay up, say what
is wrong, and finish the work once the database is back (nothing lost, nothing twice)."""

from __future__ import annotations

import shutil
from pathlib import Path

import asyncpg
import pytest

from tests.dicom.synthetic import write_ct_series
from tests.reliability.servers import PrivatePostgres
from tests.reliability.support import ServiceProcess, log_records, pacsflow_command, wait_until
from tests.uploader.support import Storescp

pytestmark = [pytest.mark.dcmtk, pytest.mark.rabbit, pytest.mark.timeout(300)]

FILES = 40


async def test_services_ride_out_a_database_outage(
    tmp_path: Path, rabbit_url: str, unique_prefix: str
) -> None:
    write_ct_series(tmp_path / "staging" / "#1-Outage" / "series", FILES, rows=8, columns=8)
    with PrivatePostgres() as pg, Storescp(tmp_path / "pacs", fork=True) as pacs:
        config = tmp_path / "pacsflow.yaml"
        config.write_text(f"""
logging: {{level: INFO, format: json}}
state: {{backend: postgres, dsn: '{pg.dsn}', pool_size: 2}}
bus: {{backend: rabbitmq, url: '{rabbit_url}', queue_prefix: {unique_prefix},
      exchange: {unique_prefix}.events, declare_services: [watcher, uploader]}}
dicom: {{ae_title: PFOUT, connect_timeout: 3, acse_timeout: 10, dimse_timeout: 10}}
nodes:
  pacs: {{ae_title: {pacs.ae_title}, host: 127.0.0.1, port: {pacs.port}}}
watcher:
  import_folders: [{tmp_path}/inbox]
  archive_folder: {tmp_path}/archive
  quarantine_folder: {tmp_path}/quarantine
  debounce_seconds: 0.3
  archive_interval_seconds: 0.5
uploader:
  destinations: [pacs]
  processes: 0
  retry_initial_seconds: 0.2
  retry_max_seconds: 1
""")
        assert pacsflow_command(config, "db", "upgrade").returncode == 0
        services = (ServiceProcess(config, "uploader").start(),
                    ServiceProcess(config, "watcher").start())  # fmt: skip
        watcher = services[1]
        try:
            await wait_until(lambda: all(s.ready() for s in services), 60, "services ready",
                             alive=services)  # fmt: skip
            pg.stop("immediate")
            shutil.move(tmp_path / "staging" / "#1-Outage", tmp_path / "inbox")

            def complained() -> bool:
                return any(r.get("level") == "ERROR" and "state store" in str(r.get("message"))
                           for r in log_records(watcher.log))  # fmt: skip

            await wait_until(complained, 60, "the watcher reporting the outage", alive=services)
            await wait_until(lambda: not watcher.ready(), 30, "the watcher not ready",
                             alive=services)  # fmt: skip
            pg.start()
            await wait_until(lambda: not any((tmp_path / "inbox").rglob("*.dcm")), 120,
                             "every file sent and archived", alive=services)  # fmt: skip
            conn = await asyncpg.connect(pg.dsn)
            try:
                deliveries = dict(await conn.fetch(
                    "SELECT status, count(*) FROM ledger_deliveries GROUP BY status"))
            finally:
                await conn.close()
            for service in services:
                assert service.stop() == 0, service.tail()
        finally:
            for service in services:
                service.stop()
        received = pacs.uids()
    assert len(received) == FILES and sum(received.values()) == FILES
    assert deliveries == {"sent": FILES}
