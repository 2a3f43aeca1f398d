"""Benchmark: what the uploader's durable per-file work costs in CPU, on PostgreSQL.

Run from the repository root::

    .venv/bin/python -m bench.ledger [--files 2000] [--rounds 3] [--pg-dsn DSN]

Each round creates a fresh database, records the files as the watcher does (not measured),
then runs the uploader's queue as the service does for them: schedules of 200 files (one
file-ready event each), claims of 64 until none is left, settlements of 500 with their
file-sent event in the outbox, and the outbox cleared. For each step it prints the CPU time
of this process (encoding the statements, decoding the rows: the uploader's side) and of the
PostgreSQL backends serving it (from ``/proc/<pid>/schedstat``: the database's side), the
median of the rounds, and the total per file. Nothing is sent: the files are tiny stand-ins.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from pacsflow.events import FileOutcome, FileOutcomePayload, FileSent, ReadyFile, Source
from pacsflow.store import PostgresDatabase, upgrade
from pacsflow_uploader.deliveries import Claim, DeliveryQueue, Settlement, owner_id

from bench.support import record_as_the_watcher

SCHEDULE_FILES = 200
CLAIM_FILES = 64
SETTLE_FILES = 500
UPLOADER = Source(service="uploader", instance="bench")


def _backend_cpu_ms(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/schedstat") as stat:
            total += int(stat.read().split()[0])
    return total / 1e6


def _files(folder: Path, count: int) -> list[ReadyFile]:
    files = []
    for i in range(count):
        path = folder / f"{i:06d}.dcm"
        path.write_bytes(b"\0" * 128)
        files.append(ReadyFile(
            path=str(path), size=128, sop_instance_uid=f"1.2.826.0.1.3680043.10.1.{i}",
            series_instance_uid="1.2.826.0.1.3680043.10.2", study_instance_uid="1.2.826.0.1.3",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
        ))  # fmt: skip
    return files


async def one_round(admin_dsn: str, files: list[ReadyFile]) -> dict[str, tuple[float, float]]:
    """CPU milliseconds (this process, PostgreSQL) of each step for ``files``."""
    name = f"pacsflow_ledger_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    db = await PostgresDatabase.connect(admin_dsn.rsplit("/", 1)[0] + f"/{name}", pool_size=4)
    try:
        await upgrade(db)
        await record_as_the_watcher(db, files)
        backends = [row["pid"] for row in await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", name)]  # fmt: skip
        queue = DeliveryQueue(db, owner=owner_id("bench"))
        claims: list[Claim] = []
        steps: dict[str, tuple[float, float]] = {}

        async def measure(step: str, work: Callable[[], Awaitable[None]]) -> None:
            client, server = time.process_time(), _backend_cpu_ms(backends)
            await work()
            steps[step] = ((time.process_time() - client) * 1000,
                           _backend_cpu_ms(backends) - server)  # fmt: skip

        async def schedule() -> None:
            for start in range(0, len(files), SCHEDULE_FILES):
                await queue.schedule(files[start : start + SCHEDULE_FILES], ["pacs"], "bench")

        async def claim() -> None:
            while got := await queue.claim("pacs", CLAIM_FILES):
                claims.extend(got)

        async def settle() -> None:
            for start in range(0, len(claims), SETTLE_FILES):
                batch = [Settlement(c, "sent", 0, attempts=1)
                         for c in claims[start : start + SETTLE_FILES]]  # fmt: skip
                event = FileSent(source=UPLOADER, correlation_id="bench", payload=FileOutcomePayload(
                    files=[FileOutcome(path=s.claim.path, sop_instance_uid=s.claim.sop_instance_uid
                                       or "", destination="pacs", status=0, attempts=1)
                           for s in batch]))  # fmt: skip
                await queue.published(await queue.settle(batch, [event]))

        await measure("schedule", schedule)
        await measure("claim", claim)
        await measure("settle", settle)
        if len(claims) != len(files):
            raise RuntimeError(f"claimed {len(claims)} of {len(files)} deliveries")
        return steps
    finally:
        await db.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg-dsn", default=os.environ.get(
                            "PACSFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test"),
                        help="an administrative connection; a database is created per round")
    parser.add_argument("--folder", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacsflow-ledger-", dir=args.folder) as temp:
        files = _files(Path(temp), args.files)
        rounds = [await one_round(args.pg_dsn, files) for _ in range(args.rounds)]
    print(f"{args.files} files, median of {args.rounds} rounds (CPU ms)")
    print(f"  {'step':<10} {'uploader':>9} {'PostgreSQL':>11}")
    totals = [0.0, 0.0]
    for step in rounds[0]:
        client = statistics.median(r[step][0] for r in rounds)
        server = statistics.median(r[step][1] for r in rounds)
        totals[0] += client
        totals[1] += server
        print(f"  {step:<10} {client:9.1f} {server:11.1f}")
    per_file = 1000 * sum(totals) / args.files
    print(f"  {'total':<10} {totals[0]:9.1f} {totals[1]:11.1f}   {per_file:.0f} µs per file")


if __name__ == "__main__":
    asyncio.run(main())
