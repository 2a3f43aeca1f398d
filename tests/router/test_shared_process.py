"""``pacsflow run``: beside other services the router receives in a process of its own."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import psutil
import pytest
from pacsflow.config import load_settings
from pacsflow.runtime import run_services

from tests.dicom.synthetic import write_ct_series
from tests.peers import free_port
from tests.router.support import expected_path, storescu

pytestmark = pytest.mark.dcmtk


def _worker_processes() -> list[psutil.Process]:
    """Processes this one started with multiprocessing's spawn (the router's workers)."""
    return [child for child in psutil.Process(os.getpid()).children(recursive=True)
            if "spawn_main" in " ".join(child.cmdline())]  # fmt: skip


@pytest.mark.parametrize(
    ("services", "workers"),
    [(["router-scp", "watcher"], 1), (["router-scp"], 0)],
    ids=["beside-the-watcher", "alone"],
)
async def test_one_receiver_is_a_worker_process_only_beside_other_services(
    tmp_path: Path, services: list[str], workers: int
) -> None:
    port = free_port()
    settings = load_settings(
        None,
        instance="shared-process",
        state={"backend": "sqlite", "path": str(tmp_path / "state.db")},
        bus={"backend": "embedded"},
        http={"host": "127.0.0.1", "port": 0},
        router={"host": "127.0.0.1", "port": port, "processes": 1,
                "routes": {"MRI": {"path": str(tmp_path / "mri")}}},
        watcher={"import_folders": [str(tmp_path / "inbox")],
                 "archive_folder": str(tmp_path / "archive"),
                 "quarantine_folder": str(tmp_path / "quarantine")},
    )  # fmt: skip
    sources = write_ct_series(tmp_path / "study", 20)
    stop = asyncio.Event()
    ready = asyncio.Event()
    running = asyncio.create_task(
        run_services(settings, services, stop=stop, started=lambda _health: ready.set())
    )
    try:
        await asyncio.wait_for(ready.wait(), 30)
        result = await storescu(port, "MRI", tmp_path / "study")
        assert result.returncode == 0, result.stderr
        assert len(_worker_processes()) == workers
    finally:
        stop.set()
        assert await asyncio.wait_for(running, 60) == 0
    for source in sources:
        assert expected_path(tmp_path / "mri", source).exists()
