"""The embedded (SQLite) bus: the shared contract, plus what only a file-backed bus promises."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pacsflow.bus import BusOptions, EmbeddedBus, EventBus, queue_name
from pacsflow.config import BusSettings
from pacsflow.errors import BusError
from tests.bus.contract import (
    FAST,
    WAIT,
    BusContract,
    BusFactory,
    Recorder,
    eventually,
    file_sent,
)
from tests.sqlite_files import first_write_in_progress


class _Factory:
    def __init__(self, path: Path, prefix: str) -> None:
        self.path = path
        self.prefix = prefix
        self.buses: list[EmbeddedBus] = []

    async def __call__(
        self,
        *,
        prefetch: int = 4,
        delivery_limit: int = 3,
        options: BusOptions = FAST,
        registry: CollectorRegistry | None = None,
    ) -> EventBus:
        settings = BusSettings(
            queue_prefix=self.prefix, prefetch=prefetch, delivery_limit=delivery_limit
        )
        bus = EmbeddedBus(
            self.path,
            settings,
            registry=CollectorRegistry() if registry is None else registry,
            options=options,
        )
        await bus.start()
        self.buses.append(bus)
        return bus


@pytest.fixture
async def embedded_factory(tmp_path: Path, unique_prefix: str) -> AsyncIterator[_Factory]:
    factory = _Factory(tmp_path / "state" / "pacsflow.db", unique_prefix)
    yield factory
    for bus in factory.buses:
        await bus.close()


class TestEmbeddedBus(BusContract):
    @pytest.fixture
    async def make_bus(self, embedded_factory: _Factory) -> BusFactory:
        return embedded_factory

    async def inject_raw(self, bus: EventBus, service: str, event_type: str, body: bytes) -> None:
        # Another connection, as a broken writer in another process would.
        assert isinstance(bus, EmbeddedBus)
        with sqlite3.connect(bus._path, timeout=10) as db:
            db.execute(
                "INSERT INTO bus_messages "
                "(queue, service, event_type, message_id, body, published_at, available_at) "
                "VALUES (?, ?, ?, NULL, ?, ?, ?)",
                (
                    queue_name(bus._settings.queue_prefix, service, event_type),
                    service, event_type, body, time.time(), time.time(),
                ),
            )


class TestEmbeddedFile:
    async def test_bus_tables_live_in_the_state_file_in_wal_mode(
        self, embedded_factory: _Factory
    ) -> None:
        await embedded_factory()
        with sqlite3.connect(embedded_factory.path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert {"bus_bindings", "bus_messages", "bus_dead_letters", "bus_owners"} <= tables
        assert all(name.startswith(("bus_", "sqlite_")) for name in tables)

    async def test_starting_waits_while_another_process_writes_a_new_bus_file(
        self, tmp_path: Path
    ) -> None:
        # Two services starting on one new file: the first is still in its first,
        # rollback-journal write; SQLite refuses the switch to WAL at once ("database is
        # locked") rather than on the busy timeout, so starting must wait for it.
        path = tmp_path / "bus.db"
        with first_write_in_progress(path, commit_after=0.3):
            bus = EmbeddedBus(path, BusSettings(), registry=CollectorRegistry())
            await bus.start()
            await bus.close()
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    async def test_queued_events_survive_closing_and_reopening(
        self, embedded_factory: _Factory
    ) -> None:
        first = await embedded_factory()
        await first.declare("alpha", ["file-sent"])
        events = [file_sent(n) for n in range(3)]
        await first.publish(*events)
        await first.close()

        second = await embedded_factory()
        got = Recorder()
        await second.subscribe("alpha", ["file-sent"], got)
        await got.wait_for(3)
        assert got.ids == {str(e.id) for e in events}

    async def test_a_killed_process_s_message_in_flight_is_delivered_again(
        self, embedded_factory: _Factory
    ) -> None:
        """A crash (SIGKILL while the handler runs) loses nothing: the next start delivers it."""
        setup = await embedded_factory()
        await setup.declare("alpha", ["file-sent"])
        event = file_sent(1)
        await setup.publish(event)
        await setup.close()

        script = textwrap.dedent(
            f"""
            import asyncio, sys
            from prometheus_client import CollectorRegistry
            from pacsflow.bus import EmbeddedBus
            from pacsflow.config import BusSettings

            async def main():
                bus = EmbeddedBus({str(embedded_factory.path)!r},
                                  BusSettings(queue_prefix={embedded_factory.prefix!r}),
                                  registry=CollectorRegistry())
                await bus.start()
                async def hang(event):
                    print(event.id, flush=True)
                    await asyncio.Event().wait()
                await bus.subscribe("alpha", ["file-sent"], hang)
                await asyncio.Event().wait()

            asyncio.run(main())
            """
        )
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        try:
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), WAIT)
            assert line.decode().strip() == str(event.id)
        finally:
            child.send_signal(signal.SIGKILL)
            await child.wait()

        with sqlite3.connect(embedded_factory.path) as db:
            claimed = db.execute(
                "SELECT deliveries, claimed_by IS NOT NULL FROM bus_messages"
            ).fetchall()
        assert claimed == [(1, 1)]  # the dead process still holds it

        bus = await embedded_factory()
        got = Recorder()
        await bus.subscribe("alpha", ["file-sent"], got)
        await got.wait_for(1)
        assert got.ids == {str(event.id)}

    async def test_a_stale_owner_s_claims_are_returned(self, embedded_factory: _Factory) -> None:
        """An owner on another host cannot be checked by pid; its heartbeat going stale counts."""
        setup = await embedded_factory()
        await setup.declare("alpha", ["file-sent"])
        event = file_sent(1)
        await setup.publish(event)
        await setup.close()
        with sqlite3.connect(embedded_factory.path) as db:
            db.execute(
                "INSERT INTO bus_owners (owner, host, pid, started, heartbeat) "
                "VALUES ('elsewhere', 'other-host', 1, 0, ?)",
                (time.time(),),
            )
            db.execute("UPDATE bus_messages SET claimed_by = 'elsewhere', deliveries = 1")

        bus = await embedded_factory(options=BusOptions(
            poll_interval=0.1, heartbeat_interval=0.2, owner_stale_after=1.0,
        ))
        got = Recorder()
        await bus.subscribe("alpha", ["file-sent"], got)
        await asyncio.sleep(0.5)
        assert got.events == []  # still fresh: it may be working on it
        await got.wait_for(1, timeout=WAIT)
        assert got.ids == {str(event.id)}

    async def test_a_message_claimed_past_the_limit_is_dead_lettered_unhandled(
        self, embedded_factory: _Factory
    ) -> None:
        """A message that crashed the process on every delivery stops crashing it."""
        setup = await embedded_factory(delivery_limit=3)
        await setup.declare("alpha", ["file-sent"])
        await setup.publish(file_sent(1))
        await setup.close()
        with sqlite3.connect(embedded_factory.path) as db:
            db.execute("UPDATE bus_messages SET deliveries = 3")

        bus = await embedded_factory(delivery_limit=3)
        got = Recorder()
        await bus.subscribe("alpha", ["file-sent"], got)
        async def dead() -> bool:
            return len(await bus.dead_letters("alpha")) == 1

        await eventually(dead, what="a dead letter")
        [letter] = await bus.dead_letters("alpha")
        assert letter.deliveries == 4 and "without a result" in letter.reason
        assert got.events == []

    async def test_publish_wakes_the_consumer_without_waiting_for_a_poll(
        self, embedded_factory: _Factory
    ) -> None:
        bus = await embedded_factory(options=BusOptions(poll_interval=30.0))
        got = Recorder()
        await bus.subscribe("alpha", ["file-sent"], got)
        await asyncio.sleep(0.1)  # the consumer is asleep now
        started = time.monotonic()
        await bus.publish(file_sent(1))
        await got.wait_for(1, timeout=5)
        assert time.monotonic() - started < 1.0

    async def test_reads_of_a_damaged_bus_file_are_bus_errors(
        self, embedded_factory: _Factory
    ) -> None:
        # Callers (the notifier's maintenance loop, status) handle BusError and go on; a raw
        # sqlite3 error would stop them.
        bus = await embedded_factory()
        await bus.declare("alpha", ["file-sent"])
        with sqlite3.connect(embedded_factory.path) as db:
            db.execute("DROP TABLE bus_dead_letters")
        with pytest.raises(BusError, match="dead letters of alpha"):
            await bus.dead_letter_count("alpha")
        with pytest.raises(BusError, match="dead letters of alpha"):
            await bus.dead_letters("alpha")
        with pytest.raises(BusError, match="queue depths"):
            await bus.queue_depths()

    async def test_a_publish_cancelled_at_any_step_leaves_the_file_unlocked(
        self, embedded_factory: _Factory
    ) -> None:
        # A cancel (a service stopping) reaches the task while its statement still runs in the
        # connection's thread: a BEGIN that completes there must not leave the write lock held.
        bus = await embedded_factory()
        await bus.declare("alpha", ["file-sent"])
        for steps in range(8):
            publishing = asyncio.create_task(bus.publish(file_sent(steps)))
            for _ in range(steps):
                await asyncio.sleep(0)
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
            other = sqlite3.connect(embedded_factory.path, timeout=0.5, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")  # "database is locked" if the bus kept it
                other.execute("ROLLBACK")
            finally:
                other.close()
        queue = queue_name(bus._settings.queue_prefix, "alpha", "file-sent")
        before = (await bus.queue_depths()).get(queue, 0)
        await bus.publish(file_sent(99))  # and the bus itself goes on
        assert (await bus.queue_depths())[queue] == before + 1
