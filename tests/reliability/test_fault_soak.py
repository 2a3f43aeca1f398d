"""Fault soak: files from the import folder to a PACS while everything around them breaks.

The watcher and the uploader run as separate processes on a private RabbitMQ node and a
private PostgreSQL cluster (the machine's shared ones serve other tests), sending to DCMTK
``storescp``. Folders are dropped into the import folder one after another; after each drop,
once part of it has reached the PACS, one fault strikes:

RabbitMQ ``stop_app``/``start_app``, a clean stop and start, and a SIGKILL and start (three
restarts); PostgreSQL crashed (``pg_ctl -m immediate``) and started (once); the PACS SIGKILLed
and started again (twice); the uploader and the watcher SIGKILLed and started again (once
each).

At the end every SOP instance is at the PACS, the ledger holds exactly one confirmed delivery
per file, every source file is archived and no dead letter is left. ``storescp +uf`` keeps a
file for every copy it receives, so a repeat shows; repeats may only come from sends that a
fault left without an answer (at most the in-flight window of each association per fault).

``PACSFLOW_SOAK_FILES`` sets the number of files (CI: 2,000; ``make soak``: 10,000).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from tests.dicom.synthetic import write_ct_series
from tests.reliability.servers import PrivatePostgres, PrivateRabbit
from tests.reliability.support import ServiceProcess, pacsflow_command, wait_until
from tests.uploader.support import Storescp

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow, pytest.mark.timeout(1800)]

FILES = int(os.environ.get("PACSFLOW_SOAK_FILES", "2000"))
FOLDERS = 10
ASSOCIATIONS = 4
CHUNK_SIZE = 16
# Sender processes of the uploader (0: threads in its own process).
SENDER_PROCESSES = int(os.environ.get("PACSFLOW_SOAK_SENDER_PROCESSES", "2"))


class KillableStorescp(Storescp):
    def kill(self) -> None:
        """SIGKILL storescp and the children serving its associations."""
        process, self.process = self.process, None
        assert process is not None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    def count(self) -> int:
        return sum(1 for _ in os.scandir(self.folder))


def write_config(folder: Path, pacs: Storescp, rabbit: PrivateRabbit, pg: PrivatePostgres) -> Path:
    path = folder / "pacsflow.yaml"
    path.write_text(f"""
instance: soak
logging: {{level: INFO, format: json}}
state: {{backend: postgres, dsn: '{pg.dsn}', pool_size: 4}}
bus:
  backend: rabbitmq
  url: '{rabbit.url}'
  publish_timeout: 120
  declare_services: [watcher, uploader]
dicom: {{ae_title: PFSOAK, connect_timeout: 3, acse_timeout: 10, dimse_timeout: 10,
        network_timeout: 20}}
nodes:
  pacs: {{ae_title: {pacs.ae_title}, host: 127.0.0.1, port: {pacs.port}}}
watcher:
  import_folders: [{folder}/inbox]
  archive_folder: {folder}/archive
  quarantine_folder: {folder}/quarantine
  debounce_seconds: 0.5
  archive_interval_seconds: 1
uploader:
  destinations: [pacs]
  associations: {ASSOCIATIONS}
  processes: {SENDER_PROCESSES}
  chunk_size: {CHUNK_SIZE}
  retry_initial_seconds: 0.2
  retry_max_seconds: 2
  claim_timeout_seconds: 30
  max_load_per_core: 100
""")
    return path


def files_in(folder: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(folder)) if folder.exists() else 0


async def test_files_survive_broker_database_pacs_and_service_failures(tmp_path: Path) -> None:
    per_folder = FILES // FOLDERS
    staging = tmp_path / "staging"
    folders = [f"#{n:03d}-Soak" for n in range(FOLDERS)]
    expected: set[str] = set()
    for name in folders:
        uid_root = f"2.25.{int.from_bytes(os.urandom(12), 'big')}"
        write_ct_series(staging / name / "series", per_folder, rows=16, columns=16,
                        uid_root=uid_root)  # fmt: skip
        expected |= {f"{uid_root}.{10_000_000 + n}" for n in range(1, per_folder + 1)}
    total = per_folder * FOLDERS
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    faults: list[str] = []
    outstanding: list[int] = []  # files not yet at the PACS as each fault struck

    with (
        PrivateRabbit(tmp_path / "rabbit") as rabbit,
        PrivatePostgres() as pg,
        KillableStorescp(tmp_path / "pacs", fork=True) as pacs,
    ):
        config = write_config(tmp_path, pacs, rabbit, pg)
        assert pacsflow_command(config, "db", "upgrade").returncode == 0
        uploader = ServiceProcess(config, "uploader").start()
        watcher = ServiceProcess(config, "watcher").start()
        services = (uploader, watcher)
        try:
            await wait_until(lambda: uploader.ready() and watcher.ready(), 60,
                             "both services ready", alive=services)  # fmt: skip

            async def ledger_count() -> int:
                conn = await asyncpg.connect(pg.dsn)
                try:
                    return int(await conn.fetchval("SELECT count(*) FROM ledger_files"))
                finally:
                    await conn.close()

            def drop(index: int) -> None:
                shutil.move(staging / folders[index], inbox / folders[index])

            async def part_arrived(index: int) -> None:
                # A fault strikes while the folder is on its way: once a part of it is in.
                target = index * per_folder + per_folder // 10
                await wait_until(lambda: pacs.count() >= target, 120,
                                 f"part of folder {index} at the PACS", poll=0.01,
                                 alive=services)  # fmt: skip

            def restart_pacs() -> None:
                pacs.kill()
                time.sleep(2)
                pacs.start()

            def kill_uploader() -> None:
                uploader.kill()
                uploader.start()

            def restart_rabbit_node() -> None:
                rabbit.stop()
                rabbit.start()

            def kill_rabbit_node() -> None:
                rabbit.kill()
                rabbit.start()

            def crash_postgres() -> None:
                pg.restart("immediate", down_seconds=2)

            schedule: list[tuple[str, Callable[[], None]]] = [
                ("rabbitmq stop_app/start_app", rabbit.restart_app),
                ("pacs SIGKILL", restart_pacs),
                ("uploader SIGKILL", kill_uploader),
                ("postgresql crash", crash_postgres),
                ("rabbitmq stop/start", restart_rabbit_node),
                ("pacs SIGKILL", restart_pacs),
                ("watcher SIGKILL", lambda: None),  # handled below: mid-folder
                ("rabbitmq SIGKILL/start", kill_rabbit_node),
            ]
            for index, (what, fault) in enumerate(schedule):
                if what == "watcher SIGKILL":
                    # Mid-folder: once the watcher has begun recording the folder.
                    before = await ledger_count()
                    drop(index)
                    await wait_until(lambda b=before: _more(ledger_count, b), 60,
                                     "the watcher recording a folder", poll=0.01,
                                     alive=services)  # fmt: skip
                    watcher.kill()
                    watcher.start()
                else:
                    drop(index)
                    await part_arrived(index)
                    outstanding.append((index + 1) * per_folder - pacs.count())
                    await asyncio.to_thread(fault)
                faults.append(what)
                # The next fault once both services serve again (a service started while the
                # broker is down exits, for its supervisor to start it again).
                await wait_until(lambda: uploader.ready() and watcher.ready(), 120,
                                 f"both services ready after {what}", alive=services)  # fmt: skip
            for index in range(len(schedule), FOLDERS):
                drop(index)

            async def all_archived() -> bool:
                return files_in(inbox) == 0 and files_in(tmp_path / "archive") >= total

            await wait_until(all_archived, 300 + total / 20, "every file archived",
                             poll=0.5, alive=services)  # fmt: skip
            conn = await asyncpg.connect(pg.dsn)
            try:
                deliveries = await conn.fetch(
                    "SELECT status, count(*) AS n, sum(attempts) AS attempts"
                    " FROM ledger_deliveries GROUP BY status")
                per_file = await conn.fetch(
                    "SELECT count(*) AS n FROM ledger_deliveries WHERE status = 'sent'"
                    " GROUP BY file_id HAVING count(*) > 1")
                file_statuses = dict(await conn.fetch(
                    "SELECT status, count(*) FROM ledger_files GROUP BY status"))
            finally:
                await conn.close()
            # Dead letters as the operator sees them (the exit code also reflects readiness
            # checks this test does not configure: the services' own metrics ports).
            status = pacsflow_command(config, "status", "--json")
            report = json.loads(status.stdout)
            assert uploader.stop() == 0, uploader.tail()
            assert watcher.stop() == 0, watcher.tail()
        finally:
            for service in services:
                service.stop()
        received = pacs.uids()

    assert len(faults) == 8
    assert set(received) == expected, (
        f"missing at the PACS: {len(expected - set(received))}")
    assert {row["status"]: row["n"] for row in deliveries} == {"sent": total}
    assert not per_file
    assert file_statuses == {"archived": total}
    assert files_in(inbox) == 0 and files_in(tmp_path / "archive") == total
    assert not any(report["dead_letters"].values()), report["dead_letters"]
    # A copy beyond the first comes from a send left without an answer: one that failed (an
    # attempt in the ledger) or one in flight when the PACS, the uploader or the database
    # went down (at most one window per association each time).
    repeats = sum(received.values()) - len(received)
    extra_attempts = sum(row["attempts"] for row in deliveries) - total
    print(f"soak: {total} files, faults {faults}; copies at the PACS beyond the first: "
          f"{repeats}; attempts beyond one per file: {extra_attempts}; "
          f"files not yet at the PACS as each fault struck: {outstanding}; "
          f"uploader starts {uploader.starts}, watcher starts {watcher.starts}")
    interrupting = sum(1 for f in faults if f.startswith(("pacs", "uploader", "postgres")))
    assert repeats <= extra_attempts + interrupting * ASSOCIATIONS * CHUNK_SIZE


async def _more(count: Callable[[], object], before: int) -> bool:
    value = await count()  # type: ignore[misc]
    return bool(value > before)
