"""Two ``pacsflow sync`` processes at once, as the distributed deployment runs them
(PostgreSQL state, RabbitMQ bus): every missing series is moved exactly once.

Both processes start together and run a cycle every second against the same two Orthancs;
their cycles find the same missing series and their movers compete for the same requests.
The proxy in front of the local PACS counts the C-MOVEs that reached it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aio_pika
import asyncpg
import pytest
import yaml

from pacsflow.bus import dead_letter_queue_name, queue_name

from tests.peers import OrthancProcess

from .support import LOCAL_AE, SYNC_AE, CountingProxy, Scenario, local_series

pytestmark = [pytest.mark.orthanc, pytest.mark.postgres, pytest.mark.rabbit]


def write_config(
    tmp_path: Path, remote: OrthancProcess, local: OrthancProcess, dsn: str, url: str,
    prefix: str,
) -> Path:
    config = {
        "bus": {"backend": "rabbitmq", "url": url, "exchange": f"{prefix}.events",
                "queue_prefix": prefix},
        "state": {"backend": "postgres", "dsn": dsn, "pool_size": 4},
        "http": {"host": "127.0.0.1", "port": 0},
        "logging": {"format": "json", "level": "INFO"},
        "dicom": {"ae_title": SYNC_AE, "connect_timeout": 5, "dimse_timeout": 30},
        "nodes": {
            "router": {"ae_title": "PACSFLOW", "host": "127.0.0.1", "port": 11112},
            "remote": {"ae_title": remote.ae_title, "host": "127.0.0.1",
                       "port": remote.dicom_port},
            "local": {"ae_title": LOCAL_AE, "host": "127.0.0.1", "port": local.dicom_port},
        },
        "sync": {"remote": "remote", "local": "local", "selection": "all",
                 "interval_seconds": 1, "poll_seconds": 0.5, "movers": 2,
                 "print_statistics": False},
    }  # fmt: skip
    path = tmp_path / "pacsflow.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def finished_runs(dsn: str) -> dict[str, int]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT instance, count(*) AS n FROM sync_runs WHERE status = 'ok' GROUP BY instance"
        )
    except asyncpg.UndefinedTableError:
        return {}
    finally:
        await connection.close()
    return {row["instance"]: row["n"] for row in rows}


async def delete_namespace(url: str, prefix: str) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        for event_type in ("series-missing", "moved"):
            await channel.queue_delete(queue_name(prefix, "sync", event_type))
        await channel.queue_delete(dead_letter_queue_name(prefix, "sync"))
        await channel.exchange_delete(f"{prefix}.events")
        await channel.exchange_delete(f"{prefix}.events.dead-letters")
    finally:
        await connection.close()


async def test_two_sync_processes_move_each_series_once(
    pacs_pair: tuple[OrthancProcess, OrthancProcess], scenario: Scenario,
    move_proxy: CountingProxy, pg_dsn: str, rabbit_url: str, unique_prefix: str,
    tmp_path: Path,
) -> None:
    remote, local = pacs_pair
    config = write_config(tmp_path, remote, local, pg_dsn, rabbit_url, unique_prefix)
    expected = {**scenario.initially_local(), **scenario.series("recent", 3, 5, 8),
                **scenario.series("earlier", 2, 6)}  # fmt: skip
    processes = []
    try:
        for name in ("sync-a", "sync-b"):
            env = {**os.environ, "PACSFLOW_INSTANCE": name}
            # A file, not a pipe: a full pipe would stall the process.
            with open(tmp_path / f"{name}.log", "wb") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "pacsflow", "-c", str(config), "sync"],
                    stdout=subprocess.DEVNULL, stderr=log, env=env,
                ))  # fmt: skip
        deadline = time.monotonic() + 90
        # Until everything is there and each process has run a few cycles after that.
        while time.monotonic() < deadline:
            runs = await finished_runs(pg_dsn)
            if local_series(local) == expected and len(runs) == 2 and min(runs.values()) >= 4:
                break
            assert all(p.poll() is None for p in processes), "a sync process exited"
            await asyncio.sleep(0.5)
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(timeout=30) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        logs = [(tmp_path / f"{name}.log").read_text() for name in ("sync-a", "sync-b")]
        await delete_namespace(rabbit_url, unique_prefix)

    assert local_series(local) == expected, logs
    assert codes == [0, 0], logs
    # One C-MOVE per series: five associations reached the local PACS, no more.
    assert move_proxy.connections == 5
    connection = await asyncpg.connect(pg_dsn)
    try:
        transfers = await connection.fetch("SELECT status, attempts FROM sync_transfers")
        requested = await connection.fetchval("SELECT sum(series_requested) FROM sync_runs")
        instances = await connection.fetch("SELECT DISTINCT instance FROM sync_runs")
    finally:
        await connection.close()
    assert sorted((row["status"], row["attempts"]) for row in transfers) == [("moved", 1)] * 5
    assert requested == 5
    assert {row["instance"] for row in instances} == {"sync-a", "sync-b"}
    for log in logs:
        lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert not [line for line in lines if line["level"] == "ERROR"], log
