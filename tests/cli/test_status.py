"""``pacsflow status``: services seen through their heartbeats, queues, dead letters, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aio_pika
import pexpect
import pytest
from pacsflow.bus._delivery import queue_name
from pacsflow.config import SERVICES
from pacsflow.events import EVENT_TYPES

from tests.cli.support import (
    PacsflowProcess,
    embedded_config,
    pacsflow,
    running,
    status_json,
    wait_until,
)
from tests.peers import free_port


def _state(report: dict, service: str) -> str:
    return str(report["services"][service]["state"])


async def _delete_rabbit_namespace(url: str, prefix: str) -> None:
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        for service in SERVICES:
            for event_type in EVENT_TYPES:
                await channel.queue_delete(queue_name(prefix, service, event_type))
            await channel.queue_delete(f"{prefix}.{service}.dead-letters")
        await channel.exchange_delete(f"{prefix}.events")
        await channel.exchange_delete(f"{prefix}.events.dead-letters")
    finally:
        await connection.close()


@pytest.mark.rabbit
@pytest.mark.postgres
class TestDistributed:
    """One process per service, RabbitMQ and PostgreSQL: as in compose or Kubernetes."""

    async def test_status_reflects_a_stopped_service_and_growing_dead_letters(
        self, tmp_path: Path, pg_dsn: str, rabbit_url: str, unique_prefix: str
    ) -> None:
        config = tmp_path / "pacsflow.yaml"
        config.write_text(f"""
logging: {{format: json, level: INFO}}
bus: {{backend: rabbitmq, url: "{rabbit_url}", exchange: {unique_prefix}.events,
       queue_prefix: {unique_prefix}, delivery_limit: 2}}
state: {{backend: postgres, dsn: "{pg_dsn}"}}
watcher:
  import_folders: [{tmp_path}/inbox]
  archive_folder: {tmp_path}/archive
  quarantine_folder: {tmp_path}/quarantine
notifier: {{mail_folder: {tmp_path}/mail}}
""")
        try:
            # Two containers: each its own process, health port and heartbeat rows.
            with running(tmp_path / "watcher.log", "-c", str(config), "watcher",
                         env={"PACSFLOW_HTTP__PORT": str(free_port()),
                              "PACSFLOW_INSTANCE": "watcher-1"}) as watcher, \
                 running(tmp_path / "notifier.log", "-c", str(config), "notifier",
                         env={"PACSFLOW_HTTP__PORT": str(free_port()),
                              "PACSFLOW_INSTANCE": "notifier-1"}) as notifier:
                report = wait_until(
                    lambda: (r := status_json(config))["exit_code"] == 0
                    and _state(r, "watcher") == "running"
                    and _state(r, "notifier") == "running" and r,
                    what="both services running: " + watcher.log()[-500:] + notifier.log()[-500:],
                )
                assert _state(report, "uploader") == "never started"
                assert report["dead_letters"]["notifier"] == 0
                assert report["services"]["watcher"]["instances"][0]["instance"] == "watcher-1"

                assert watcher.stop(signal.SIGTERM) == 0
                report = status_json(config)
                assert _state(report, "watcher") == "stopped"
                assert _state(report, "notifier") == "running"
                assert report["exit_code"] == 1
                assert report["stderr"].count("\n") == 1 and "watcher stopped" in report["stderr"]

                # A producer outside pacsflow publishes what nobody can decode: dead letters.
                connection = await aio_pika.connect(rabbit_url, timeout=10)
                try:
                    channel = await connection.channel()
                    exchange = await channel.get_exchange(f"{unique_prefix}.events")
                    for expected in (1, 2):
                        await exchange.publish(
                            aio_pika.Message(b"{not an event", content_type="application/json",
                                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                            routing_key="file-failed",
                        )
                        report = await asyncio.to_thread(
                            wait_until,
                            lambda n=expected: (r := status_json(config))["dead_letters"][
                                "notifier"] == n and r,
                            60, f"{expected} dead letter(s)",
                        )
                        assert f"{expected} dead letter(s)" in report["stderr"]
                finally:
                    await connection.close()
                dead_queue = f"{unique_prefix}.notifier.dead-letters"
                assert report["queues"][dead_queue] == 2
                listed = pacsflow("-c", str(config), "dead-letters", "list", "--json")
                assert listed.returncode == 0, listed.stderr
                assert [d["service"] for d in json.loads(listed.stdout)] == ["notifier"] * 2
                shown = json.loads(pacsflow("-c", str(config), "dead-letters", "show").stdout)
                assert {d["body"] for d in shown} == {"{not an event"}
                assert all(d["reason"].startswith("undecodable") for d in shown)
                purged = pacsflow("-c", str(config), "dead-letters", "purge", "--service",
                                  "notifier", shown[0]["id"])
                assert purged.stdout == "purged 1 dead letter(s) of notifier\n"
                assert status_json(config)["dead_letters"]["notifier"] == 1
        finally:
            await _delete_rabbit_namespace(rabbit_url, unique_prefix)


class TestEmbedded:
    def test_a_killed_process_shows_as_stopped_at_once(self, tmp_path: Path) -> None:
        config = embedded_config(tmp_path)
        process = PacsflowProcess(tmp_path / "run.log", "-c", str(config), "run", "watcher",
                                  "notifier")
        try:
            wait_until(lambda: _state(status_json(config), "notifier") == "running",
                       what="running: " + process.log()[-500:])
        finally:
            process.stop(signal.SIGKILL)
        report = status_json(config)
        assert {_state(report, "watcher"), _state(report, "notifier")} == {"stopped"}
        assert report["services"]["watcher"]["instances"][0]["stopped_at"] is None
        assert report["exit_code"] == 1

    def test_watch_refreshes_until_interrupted(self, tmp_path: Path) -> None:
        config = embedded_config(tmp_path)
        assert pacsflow("-c", str(config), "db", "upgrade").returncode == 0
        watch = PacsflowProcess(tmp_path / "watch.out", "-c", str(config), "status", "--json",
                                "--watch", "0.5")
        try:
            wait_until(lambda: len(watch.log().splitlines()) >= 3, 30, "three refreshes")
        finally:
            code = watch.stop(signal.SIGINT)
        lines = [json.loads(line) for line in watch.log().splitlines() if line.startswith("{")]
        assert len(lines) >= 3
        assert lines[0]["time"] < lines[-1]["time"]
        assert code == 0

    def test_plain_text_when_not_a_terminal(self, tmp_path: Path) -> None:
        config = embedded_config(tmp_path)
        assert pacsflow("-c", str(config), "db", "upgrade").returncode == 0
        result = pacsflow("-c", str(config), "status")
        assert result.returncode == 0, result.stderr
        assert "\x1b[" not in result.stdout  # no colours in a pipe
        assert "uploader    never started" in result.stdout
        assert result.stdout.rstrip().endswith("all good")

    def test_an_unreachable_broker_is_exit_3_with_the_rest_shown(self, tmp_path: Path) -> None:
        config = embedded_config(tmp_path, extra=(
            f"bus: {{backend: rabbitmq, url: 'amqp://guest:guest@127.0.0.1:{free_port()}/'}}\n"))
        assert pacsflow("-c", str(config), "db", "upgrade").returncode == 0
        result = pacsflow("-c", str(config), "status", "--json")
        assert result.returncode == 3
        report = json.loads(result.stdout)
        assert report["files"]["pending"] == 0 and report["queues"] == {}
        assert "cannot connect to RabbitMQ" in report["bus_error"]
        assert result.stderr.count("\n") == 1 and "event bus: cannot connect" in result.stderr

    def test_on_a_terminal_it_has_colours_and_watch_redraws(self, tmp_path: Path) -> None:
        config = embedded_config(tmp_path)
        assert pacsflow("-c", str(config), "db", "upgrade").returncode == 0
        env = {**os.environ, "TERM": "xterm-256color"}
        env.pop("NO_COLOR", None)
        once = pexpect.spawn(sys.executable, ["-m", "pacsflow", "-c", str(config), "status"],
                             encoding="utf-8", timeout=60, env=env, dimensions=(40, 160))
        once.expect(pexpect.EOF)
        once.close()
        assert once.exitstatus == 0
        assert "\x1b[" in once.before and "all good" in once.before
        watch = pexpect.spawn(sys.executable, ["-m", "pacsflow", "-c", str(config), "status",
                                               "--watch", "0.5"],
                              encoding="utf-8", timeout=60, env=env, dimensions=(40, 160))
        watch.expect_exact("all good")
        watch.expect_exact("all good")  # drawn again
        watch.sendintr()
        watch.expect(pexpect.EOF)
        watch.close()
        assert watch.exitstatus == 0


class TestInterrupted:
    async def test_a_cancel_as_the_health_probe_is_refused_is_not_lost(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Ctrl-C ends ``status --watch`` by cancelling its task. A cancel that lands just as
        # the probe's connection is refused must still end it (Python 3.11's wait_for lost it,
        # and the screen went on refreshing).
        from pacsflow.config import Settings
        from pacsflow.status import _probe_process

        probe: asyncio.Task[object] | None = None

        async def refused(*_args: object, **_kwargs: object) -> None:
            assert probe is not None
            probe.cancel()
            raise ConnectionRefusedError(111, "Connection refused")

        monkeypatch.setattr(asyncio, "open_connection", refused)
        settings = Settings.model_validate({"http": {"host": "127.0.0.1", "port": free_port()}})
        probe = asyncio.create_task(_probe_process(settings))
        with pytest.raises(asyncio.CancelledError):
            await probe
