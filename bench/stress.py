"""Stress: 10^5 C-STOREs of a tiny file into the asyncio SCP, with zero lost responses.

Run from the repository root::

    .venv/bin/python -m bench.stress [--count 100000]

Three runs into the engine's SCP: DCMTK ``storescu --repeat``, the engine's SCU, and the
uploader's sender with eight C-STOREs outstanding (asynchronous operations).
Each counts the instances the SCP's handler saw and the successful responses the sender
got; any difference (a lost response, a lost request) fails the run. The test suite runs
each with 10^5 against the asyncio SCP (tests/dicom/engine/test_scp.py, test_scu.py,
tests/uploader/test_operations_window.py); this command is the same outside pytest, with a
count of choice.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pacsflow.config import Node
from pacsflow.dicom import NetworkOptions, read_part10
from pacsflow.dicom.engine import AssociationSlots, AsyncStoreServer, Limits, listen_socket
from pacsflow.dicom.files import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacsflow.dicom.scp import STORAGE_TRANSFER_SYNTAXES, AssociationInfo

from bench.datasets import write_dataset

ENV = {**os.environ, "TCP_NODELAY": "1"}


class CountingHandler:
    def __init__(self) -> None:
        self.stores = 0
        self.lock = threading.Lock()

    def accept(self, info: AssociationInfo) -> Any:
        return info.called_ae

    def store(self, request: Any) -> int:
        self.stores += 1
        return 0x0000

    def association(self, info: AssociationInfo | None, outcome: str, reason: str) -> None:
        pass


def _server(handler: CountingHandler) -> AsyncStoreServer:
    return AsyncStoreServer(
        handler,
        listen_socket("127.0.0.1", 0),
        limits=Limits(),
        slots=AssociationSlots(8),
        accepts_sop_class=lambda uid: True,
        transfer_syntaxes=STORAGE_TRANSFER_SYNTAXES,
        implementation_class_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version=IMPLEMENTATION_VERSION_NAME,
    ).start()


def storescu_run(path: Path, count: int, work: Path) -> tuple[int, int, float]:
    storescu = shutil.which("storescu")
    if storescu is None:
        sys.exit("storescu is not installed (Debian package dcmtk)")
    handler = CountingHandler()
    server = _server(handler)
    log = work / "storescu.log"
    started = time.perf_counter()
    try:
        with open(log, "wb") as output:
            code = subprocess.run(
                [storescu, "-v", "--repeat", str(count), "-aec", "STRESS",
                 "127.0.0.1", str(server.port), str(path)],
                env=ENV, stdout=output, stderr=subprocess.STDOUT, check=False,
            ).returncode  # fmt: skip
        elapsed = time.perf_counter() - started
    finally:
        server.stop(2)
        server.listener.close()
    text = log.read_text(errors="replace")
    answered = len(re.findall(r"Received Store Response \(Success\)", text))
    if code != 0:
        raise RuntimeError(f"storescu failed ({code}): {text[-2000:]}")
    return handler.stores, answered, elapsed


async def scu_run(path: Path, count: int) -> tuple[int, int, float]:
    from pacsflow.dicom.engine.scu import AsyncStoreSession

    handler = CountingHandler()
    server = _server(handler)
    file = read_part10(path)
    node = Node(ae_title="STRESS", host="127.0.0.1", port=server.port)
    successes = 0
    started = time.perf_counter()
    try:
        async with AsyncStoreSession.for_files(node, NetworkOptions(ae_title="STRESS"), [file]) as session:
            for _ in range(count):
                successes += (await session.send(file)).category == "success"
        elapsed = time.perf_counter() - started
    finally:
        server.stop(2)
        server.listener.close()
    return handler.stores, successes, elapsed


def window_run(path: Path, count: int, window: int = 8) -> tuple[int, int, float]:
    """The uploader's sender with ``window`` C-STOREs outstanding (asynchronous operations)."""
    from pacsflow_uploader.files import FileJob, identify
    from pacsflow_uploader.scu import LeanStoreSession

    handler = CountingHandler()
    server = _server(handler)
    file = identify(FileJob(0, str(path)))
    node = Node(ae_title="STRESS", host="127.0.0.1", port=server.port, operations_window=window)
    session = LeanStoreSession(node, NetworkOptions(ae_title="STRESS"), [file.presentation])
    successes = 0
    started = time.perf_counter()
    try:
        session.open()
        for start in range(0, count, 1000):
            batch = [file] * min(1000, count - start)
            successes += sum(r.category == "success" for r in session.send_many(batch))
        elapsed = time.perf_counter() - started
        session.close()
    finally:
        server.stop(2)
        server.listener.close()
    return handler.stores, successes, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    args = parser.parse_args()
    failed = False
    with tempfile.TemporaryDirectory(prefix="pacsflow-stress-") as temp:
        work = Path(temp)
        path = write_dataset(work / "source", "small")[0]
        for name, run in (
            ("storescu -> engine SCP", lambda: storescu_run(path, args.count, work)),
            ("engine SCU -> engine SCP", lambda: asyncio.run(scu_run(path, args.count))),
            ("uploader sender, 8 in flight -> engine SCP", lambda: window_run(path, args.count)),
        ):
            stored, answered, elapsed = run()
            lost = args.count - min(stored, answered)
            failed |= stored != args.count or answered != args.count
            print(
                f"{name}: {args.count} sent, {stored} stored, {answered} success responses, "
                f"{lost} lost, {elapsed:.1f} s ({args.count / elapsed:.0f}/s)",
                flush=True,
            )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
