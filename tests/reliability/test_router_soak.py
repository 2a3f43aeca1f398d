"""Router soak: DCMTK ``storescu`` senders, the router SIGKILLed mid-study and started again.

Several studies arrive at once, each from its own ``storescu`` (one association per study).
Once part of them is on disk the router process is killed. Every instance a sender had an
answer of success for must be on disk then, byte for byte. The senders then send what was not
acknowledged (as a modality retries) and, for half of the studies, the whole study again (as
a modality that resends everything). At the end every instance is on disk once, no temporary
file is left, and each study is announced complete exactly once with its full count.

``PACSFLOW_SOAK_FILES`` sets the number of instances (CI: 2,000; ``make soak``: 10,000).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest
from pacsflow.bus import EmbeddedBus
from pacsflow.config import BusSettings
from pacsflow.dicom import read_part10
from pacsflow.events import Event, StudyComplete
from prometheus_client import CollectorRegistry

from tests.conftest import require_tool
from tests.dicom.synthetic import write_ct_series
from tests.peers import free_port
from tests.reliability.support import ServiceProcess, wait_until
from tests.router.support import dataset_bytes, expected_path

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow, pytest.mark.timeout(900)]

FILES = int(os.environ.get("PACSFLOW_SOAK_FILES", "2000"))
STUDIES = 6
# Longer than a router restart and the senders' retry take, so a study is not reported
# complete between the kill and the resend (that would rightly be a second notice).
QUIET_SECONDS = 10


def write_config(folder: Path, port: int) -> Path:
    path = folder / "pacsflow.yaml"
    path.write_text(f"""
instance: router-soak
logging: {{level: INFO, format: json}}
state: {{backend: sqlite, path: {folder}/state.db}}
bus: {{backend: embedded, declare_services: [notifier]}}
router:
  ae_title: PFROUTER
  host: 127.0.0.1
  port: {port}
  routes:
    SOAK: {{path: {folder}/storage}}
  study_quiet_seconds: {QUIET_SECONDS}
  sweep_seconds: 0.2
  flush_seconds: 0.1
""")
    return path


class Sender:
    """``storescu -v`` for one study; which files the router acknowledged, from its log."""

    def __init__(self, port: int, files: list[Path], log: Path) -> None:
        self.port, self.files, self.log = port, files, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, files: list[Path] | None = None) -> None:
        files = self.files if files is None else files
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [require_tool("storescu"), "-v", "-aet", "MODALITY", "-aec", "SOAK", "-nh",
                 "127.0.0.1", str(self.port), *map(str, files)],
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"},
            )  # fmt: skip

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait(timeout=300)

    def acknowledged(self) -> set[Path]:
        done, current = set(), None
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("I: Sending file: "):
                current = Path(line.removeprefix("I: Sending file: "))
            elif line.startswith("I: Received Store Response (Success)") and current:
                done.add(current)
                current = None
        return done


async def test_router_killed_mid_study_keeps_every_acknowledged_instance(tmp_path: Path) -> None:
    per_study = FILES // STUDIES
    studies = [write_ct_series(tmp_path / "studies" / f"s{n}", per_study, rows=16, columns=16)
               for n in range(STUDIES)]  # fmt: skip
    all_files = [path for study in studies for path in study]
    storage = tmp_path / "storage"
    port = free_port()
    config = write_config(tmp_path, port)
    db = tmp_path / "state.db"
    router = ServiceProcess(config, "router-scp")
    completions: list[StudyComplete] = []

    async def collect(event: Event) -> None:
        assert isinstance(event, StudyComplete)
        completions.append(event)

    bus = EmbeddedBus(db, BusSettings(), registry=CollectorRegistry())
    await bus.start()
    await bus.subscribe("notifier", ["study-complete"], collect)
    try:
        router.start()
        await wait_until(router.ready, 30, "the router ready", alive=(router,))
        senders = [Sender(port, study, tmp_path / f"storescu{n}.log")
                   for n, study in enumerate(studies)]  # fmt: skip
        for sender in senders:
            sender.start()

        def on_disk() -> int:
            return sum(1 for _ in storage.rglob("*.dcm")) if storage.exists() else 0

        await wait_until(lambda: on_disk() >= len(all_files) // 3, 120,
                         "a third on disk", poll=0.01, alive=(router,))  # fmt: skip
        router.kill()
        killed_at = time.monotonic()
        for sender in senders:
            await asyncio.to_thread(sender.wait)
        acknowledged = {path for sender in senders for path in sender.acknowledged()}
        assert 0 < len(acknowledged) < len(all_files)
        lost = [p for p in acknowledged if not expected_path(storage, p).exists()]
        assert not lost, f"{len(lost)} acknowledged instances are not on disk"
        for path in acknowledged:
            assert expected_path(storage, path).read_bytes()[
                read_part10(expected_path(storage, path)).dataset_offset:
            ] == dataset_bytes(path)
        assert not completions, "a study was announced complete while instances were missing"

        router.start()
        await wait_until(router.ready, 30, "the router ready again", alive=(router,))
        for number, sender in enumerate(senders):
            retry = sorted(set(sender.files) - acknowledged) if number % 2 else sender.files
            sender.start(retry)
        for sender in senders:
            assert await asyncio.to_thread(sender.wait) == 0, sender.log.read_text()[-2000:]
        await wait_until(lambda: len(completions) >= STUDIES, 60,
                         "every study complete", alive=(router,))  # fmt: skip
        await asyncio.sleep(QUIET_SECONDS + 2)  # a second notice would come now
        # In a thread: this loop's bus shares the router's SQLite file, and a loop blocked
        # while its bus holds the write lock would keep the router from recording its stop.
        assert await asyncio.to_thread(router.stop) == 0, router.tail()
    finally:
        await asyncio.to_thread(router.stop)
        await bus.close()

    stored = [p for p in storage.rglob("*") if p.is_file()]
    assert sorted(stored) == sorted(expected_path(storage, p) for p in all_files), (
        "instances missing, stored twice, or temporary files left")
    for path in all_files[:: max(1, len(all_files) // 200)]:
        stored_path = expected_path(storage, path)
        assert stored_path.read_bytes()[read_part10(stored_path).dataset_offset:] == (
            dataset_bytes(path))
    by_study: dict[str, list[StudyComplete]] = {}
    for event in completions:
        by_study.setdefault(event.payload.study_instance_uid, []).append(event)
    assert len(by_study) == STUDIES
    assert all(len(events) == 1 for events in by_study.values()), by_study
    assert sorted(e.payload.files_received for e in completions) == [per_study] * STUDIES
    print(f"router soak: {len(all_files)} instances in {STUDIES} studies; router killed "
          f"with {len(acknowledged)} acknowledged; {time.monotonic() - killed_at:.0f} s to the end")
