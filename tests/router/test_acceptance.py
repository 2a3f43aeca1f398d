"""The issue's acceptance runs on real peers: DCMTK, Orthanc, RabbitMQ and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pydicom
import pytest
import yaml
from pacsflow.bus import BusOptions, RabbitBus
from pacsflow.config import BusSettings
from pacsflow.events import Event, StudyComplete
from prometheus_client import CollectorRegistry

from tests.conftest import require_tool
from tests.dicom.synthetic import write_ct_series
from tests.peers import OrthancProcess, free_port, wait_for_port
from tests.router.support import (
    DCMTK_ENV,
    dataset_bytes,
    expected_path,
    files_under,
    router_settings,
    running_router,
    storescu,
)


def _bus_settings(rabbit_url: str, prefix: str) -> BusSettings:
    return BusSettings(
        backend="rabbitmq", url=rabbit_url, exchange=f"{prefix}.events", queue_prefix=prefix
    )


@pytest.fixture
async def rabbit(rabbit_url: str, unique_prefix: str) -> AsyncIterator[RabbitBus]:
    # A short watchdog interval: close() must not hang on a check in flight.
    bus = RabbitBus(
        _bus_settings(rabbit_url, unique_prefix),
        registry=CollectorRegistry(),
        options=BusOptions(watchdog_interval=0.5),
    )
    await bus.start()
    yield bus
    async with asyncio.timeout(30):
        await bus.close()


def _assert_stored(root: Path, sources: list[Path]) -> None:
    for source in sources:
        assert dataset_bytes(expected_path(root, source)) == dataset_bytes(source), source


@pytest.mark.dcmtk
@pytest.mark.rabbit
async def test_4000_files_from_parallel_senders_to_two_routes_complete_once_per_study(
    tmp_path: Path, rabbit: RabbitBus
) -> None:
    study_a, study_b, study_c = (pydicom.uid.generate_uid() for _ in range(3))
    series_a = pydicom.uid.generate_uid()
    batches = {
        # Study A comes from two senders at once, into one series.
        "a1": (
            "MRI",
            write_ct_series(tmp_path / "a1", 1000, study_uid=study_a, series_uid=series_a),
        ),
        "a2": (
            "MRI",
            write_ct_series(tmp_path / "a2", 1000, study_uid=study_a, series_uid=series_a),
        ),
        "b": ("MRI", write_ct_series(tmp_path / "b", 1000, study_uid=study_b)),
        "c": ("CT", write_ct_series(tmp_path / "c", 1000, study_uid=study_c)),
    }
    routes = {"MRI": {"path": str(tmp_path / "mri")}, "CT": {"path": str(tmp_path / "ct")}}
    settings = router_settings(tmp_path, routes, processes=2, study_quiet_seconds=1.5)
    async with running_router(settings, bus=rabbit) as router:
        results = await asyncio.gather(
            *(storescu(router.port, route, tmp_path / name) for name, (route, _) in batches.items())
        )
        for result in results:
            assert result.returncode == 0, result.stderr
        events = await router.wait_completions(3, timeout=30)
        await asyncio.sleep(2.0)  # no second notice of any study
        completions = router.completions()
        assert router.metric("pacsflow_router_instances_total", route="MRI") == 3000
        assert router.metric("pacsflow_router_instances_total", route="CT") == 1000
    assert len(completions) == 3
    by_study = {e.payload.study_instance_uid: e.payload for e in events}
    assert by_study[study_a].files_received == 2000
    assert by_study[study_b].files_received == 1000
    assert (by_study[study_c].route, by_study[study_c].files_received) == ("CT", 1000)
    assert {p.study_description for p in by_study.values()} == {"synthetic"}
    assert len(files_under(tmp_path / "mri")) == 3000
    assert len(files_under(tmp_path / "ct")) == 1000
    for route, sources in batches.values():
        _assert_stored(tmp_path / route.lower(), sources)


@pytest.mark.orthanc
@pytest.mark.dcmtk
async def test_a_study_moved_by_orthanc_arrives_complete(tmp_path: Path) -> None:
    sources = write_ct_series(tmp_path / "study", 150)
    study_uid = pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID
    root = tmp_path / "mri"
    settings = router_settings(tmp_path, {"MRI": {"path": str(root)}})
    async with running_router(settings) as router:
        with OrthancProcess(
            tmp_path / "orthanc", modalities={"ROUTER": ("MRI", "127.0.0.1", router.port)}
        ) as pacs:
            await asyncio.to_thread(pacs.upload, sources)
            process = await asyncio.create_subprocess_exec(
                require_tool("movescu"), "-S", "-aet", "MOVER", "-aec", pacs.ae_title, "-aem", "MRI",
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
                "127.0.0.1", str(pacs.dicom_port),
                env=DCMTK_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            _, err = await process.communicate()
            assert process.returncode == 0, err.decode()
            [event] = await router.wait_completions(1)
    assert (event.payload.files_received, event.payload.study_description) == (150, "synthetic")
    assert len(files_under(root)) == 150
    _assert_stored(root, sources)


def _router_process(config: Path, log: Path) -> subprocess.Popen[bytes]:
    pacsflow = Path(sys.executable).parent / "pacsflow"
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(pacsflow), "router-scp", "--config", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"},
        )  # fmt: skip


@pytest.mark.postgres
@pytest.mark.rabbit
@pytest.mark.dcmtk
async def test_two_router_processes_sharing_a_study_report_it_once(
    tmp_path: Path, pg_dsn: str, rabbit_url: str, unique_prefix: str, rabbit: RabbitBus
) -> None:
    study = pydicom.uid.generate_uid()
    series = pydicom.uid.generate_uid()
    halves = [
        write_ct_series(tmp_path / f"half{n}", 300, study_uid=study, series_uid=series)
        for n in (1, 2)
    ]
    seen: list[Event] = []

    async def collect(event: Event) -> None:
        seen.append(event)

    await rabbit.subscribe("routertest", ["study-complete"], collect)
    ports = [free_port(), free_port()]
    processes = []
    for number, port in enumerate(ports):
        config = tmp_path / f"router{number}.yaml"
        config.write_text(yaml.safe_dump({
            "instance": f"router{number}",
            "state": {"backend": "postgres", "dsn": pg_dsn},
            "bus": {"backend": "rabbitmq", "url": rabbit_url, "exchange": f"{unique_prefix}.events",
                    "queue_prefix": unique_prefix},
            "http": {"host": "127.0.0.1", "port": 0},
            "logging": {"level": "INFO", "format": "text"},
            "router": {"host": "127.0.0.1", "port": port, "routes": {"MRI": {"path": str(tmp_path / "mri")}},
                       "study_quiet_seconds": 2, "sweep_seconds": 0.1, "flush_seconds": 0.2},
        }))  # fmt: skip
        processes.append(_router_process(config, tmp_path / f"router{number}.log"))
    try:
        for port, process in zip(ports, processes, strict=True):
            await asyncio.to_thread(wait_for_port, port, process, 30)
        results = await asyncio.gather(
            *(
                storescu(port, "MRI", half[0].parent)
                for port, half in zip(ports, halves, strict=True)
            )
        )
        for result in results:
            assert result.returncode == 0, result.stderr
        async with asyncio.timeout(30):
            while not seen:
                await asyncio.sleep(0.05)
        await asyncio.sleep(3)  # both processes keep sweeping; no second event may come
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=15)
    logs = "\n".join((tmp_path / f"router{n}.log").read_text() for n in (0, 1))
    assert len(seen) == 1, logs
    [event] = seen
    assert isinstance(event, StudyComplete)
    assert (event.payload.files_received, event.payload.completion) == (600, 1)
    assert "study complete" in logs
