"""Who may send where: routes allow-listed by calling AE title and by address, checked over
TCP against the router-scp process (a refused peer gets A-ASSOCIATE-RJ, a warning and a metric,
and nothing of it is stored)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.dicom.synthetic import write_ct_series
from tests.peers import free_port
from tests.reliability.support import ServiceProcess, log_records, wait_until
from tests.router.support import DCMTK_ENV, associate_rq, files_under

pytestmark = [pytest.mark.dcmtk, pytest.mark.timeout(120)]


def _answer(port: int, called: str, calling: str, source: str) -> int:
    """The PDU type the router answers an association request with, from ``source``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(associate_rq(called, calling=calling))
        return sock.recv(6, socket.MSG_WAITALL)[0]


def _storescu(port: int, called: str, calling: str, *files: Path) -> int:
    return subprocess.run(
        [require_tool("storescu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port),
         *map(str, files)], capture_output=True, env=DCMTK_ENV, timeout=60,
    ).returncode  # fmt: skip


async def test_routes_admit_only_their_calling_aes_and_addresses(tmp_path: Path) -> None:
    files = write_ct_series(tmp_path / "series", 3, rows=8, columns=8)
    port = free_port()
    config = tmp_path / "pacsflow.yaml"
    config.write_text(f"""
logging: {{level: INFO, format: json}}
state: {{backend: sqlite, path: {tmp_path}/state.db}}
bus: {{backend: embedded, declare_services: [notifier]}}
router:
  host: 127.0.0.1
  port: {port}
  allowed_addresses: [127.0.0.0/8]
  routes:
    CARDIO: {{path: {tmp_path}/cardio, allowed_calling_aes: [ECHOLAB]}}
    RESEARCH: {{path: {tmp_path}/research, allowed_addresses: [127.0.0.2]}}
""")
    router = ServiceProcess(config, "router-scp").start()
    try:
        await wait_until(router.ready, 30, "the router ready", alive=(router,))
        assert _storescu(port, "CARDIO", "INTRUDER", *files) != 0
        assert _storescu(port, "CARDIO", "ECHOLAB", *files) == 0
        assert _answer(port, "RESEARCH", "ANYONE", "127.0.0.1") == 0x03
        assert _answer(port, "RESEARCH", "ANYONE", "127.0.0.2") == 0x02
        assert _answer(port, "NOSUCHROUTE", "ANYONE", "127.0.0.2") == 0x03
        # Metrics are updated in batches (router.flush_seconds).
        await wait_until(lambda: router.metric_sum(
            "pacsflow_router_associations_total", outcome="rejected") >= 3, 10,
            "the rejections counted", alive=(router,))  # fmt: skip
        rejected = router.metric_sum("pacsflow_router_associations_total", outcome="rejected")
        assert router.stop() == 0, router.tail()
    finally:
        router.stop()
    assert len(files_under(tmp_path / "cardio")) == len(files)
    assert not files_under(tmp_path / "research")
    assert rejected == 3
    warnings = [str(r["message"]) for r in log_records(router.log) if r.get("level") == "WARNING"]
    assert sum("INTRUDER" in m or "127.0.0.1" in m or "NOSUCHROUTE" in m for m in warnings) >= 3
