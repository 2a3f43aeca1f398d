"""Heartbeats: what a row in the state store says about a service, as time passes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pacsflow.heartbeat import STALE_AFTER_SECONDS, Heartbeat, read_heartbeats
from pacsflow.store import Database, SqliteDatabase
from pacsflow.status import problems, service_summary


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = await SqliteDatabase.open(tmp_path / "state.db")
    yield database
    await database.close()


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_store_where_nothing_ran_has_no_heartbeats(db: Database) -> None:
    assert await read_heartbeats(db) == []


async def test_states_follow_beats_readiness_and_stops(db: Database) -> None:
    clock = _Clock()
    checks = {"bus": True, "state": True}

    async def readiness() -> dict[str, bool]:
        return dict(checks)

    heartbeat = Heartbeat(db, ["watcher", "uploader"], instance="nas-1", http_port=9400,
                          readiness=readiness, clock=clock)
    await heartbeat.prepare()
    await heartbeat.beat()

    def states(beats: list) -> dict[str, str]:  # type: ignore[type-arg]
        return {b.service: b.state for b in beats}

    assert states(await read_heartbeats(db, clock=clock)) == {"uploader": "running",
                                                              "watcher": "running"}
    checks["bus"] = False
    clock.now += 10
    await heartbeat.beat()
    [uploader, _] = await read_heartbeats(db, clock=clock)
    assert uploader.state == "not ready" and uploader.ready == {"bus": False, "state": True}

    # Silent for longer than a beat may take: not responding (a hang, or another host).
    checks["bus"] = True
    await heartbeat.beat({"watcher": True, "uploader": False})
    clock.now += STALE_AFTER_SECONDS + 1
    await heartbeat.beat({"watcher": True, "uploader": False})
    assert states(await read_heartbeats(db, clock=clock)) == {"uploader": "not responding",
                                                              "watcher": "running"}
    await heartbeat.stopped({"watcher": "asked to stop"})
    beats = await read_heartbeats(db, clock=clock)
    assert states(beats) == {"uploader": "not responding", "watcher": "stopped"}
    assert beats[1].stop_reason == "asked to stop" and beats[1].stopped_at == clock.now

    # A new start of the same instance clears the stop.
    await heartbeat.beat()
    assert states(await read_heartbeats(db, clock=clock))["watcher"] == "running"


def test_a_service_is_as_good_as_its_best_instance() -> None:
    assert service_summary([]) == "never started"
    assert service_summary([{"state": "stopped"}, {"state": "running"}]) == "running"
    assert service_summary([{"state": "stopped"}, {"state": "not responding"}]) == \
        "not responding"


def test_problems_name_each_service_and_the_dead_letters() -> None:
    instance = {"stop_reason": "failed: disk full"}
    report = {
        "services": {
            "watcher": {"state": "stopped", "instances": [instance]},
            "uploader": {"state": "running", "instances": []},
            "sync": {"state": "never started", "instances": []},
        },
        "dead_letters": {"notifier": 2, "uploader": 0},
        "files": {"pending": 0},
        "bus_error": None,
    }
    assert problems(report) == ["watcher stopped (failed: disk full)",
                                "2 dead letter(s): notifier 2"]


async def test_rows_of_long_stopped_instances_are_forgotten(db: Database) -> None:
    clock = _Clock()
    old = Heartbeat(db, ["router-scp"], instance="pod-a", http_port=None, clock=clock)
    await old.prepare()
    await old.beat()
    await old.stopped({"router-scp": "asked to stop"})
    clock.now += 3600
    replacement = Heartbeat(db, ["router-scp"], instance="pod-b", http_port=None, clock=clock)
    await replacement.prepare()
    await replacement.beat()
    assert [b.instance for b in await read_heartbeats(db, clock=clock)] == ["pod-a", "pod-b"]
    clock.now += 2 * 86400
    await Heartbeat(db, ["router-scp"], instance="pod-c", http_port=None, clock=clock).prepare()
    # pod-b never stopped: kept (it may come back) until a week of silence.
    assert [b.instance for b in await read_heartbeats(db, clock=clock)] == ["pod-b"]
