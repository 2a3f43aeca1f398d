"""README's first command: ``pacsflow run`` on its embedded defaults, end to end.

Only ports and the two waiting times differ from the defaults; the working folder is a fresh
temporary one, as on a new machine: a study dropped into ./data/inbox is sent by the uploader
to the built-in router, stored under ./data/storage, the sources are archived, and the
study-complete notification is written as a mail file (no SMTP server is configured).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from email import message_from_bytes, policy
from pathlib import Path

from pacsflow.dicom import read_part10
from tests.dicom.synthetic import write_ct_series
from tests.peers import free_port


def data_sets(paths: Iterable[Path]) -> set[bytes]:
    """The encoded data sets of Part 10 files, without preamble and file meta."""
    return {p.read_bytes()[read_part10(p).dataset_offset:] for p in paths}


def test_a_study_dropped_into_the_inbox_is_stored_archived_and_announced(tmp_path: Path) -> None:
    router_port = free_port()
    env = dict(os.environ)
    env.update({
        "PACSFLOW_WATCHER__DEBOUNCE_SECONDS": "1",
        "PACSFLOW_ROUTER__STUDY_QUIET_SECONDS": "2",
        "PACSFLOW_HTTP__PORT": str(free_port()),
        "PACSFLOW_ROUTER__PORT": str(router_port),
        "PACSFLOW_NODES__ROUTER__AE_TITLE": "PACSFLOW",
        "PACSFLOW_NODES__ROUTER__HOST": "127.0.0.1",
        "PACSFLOW_NODES__ROUTER__PORT": str(router_port),
    })
    env.pop("PACSFLOW_CONFIG", None)
    log = open(tmp_path / "pacsflow.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "pacsflow", "run"], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=log, text=True)
    data = tmp_path / "data"
    try:
        sources = write_ct_series(tmp_path / "staging" / "#1-Demo", 25)
        (data / "inbox").mkdir(parents=True, exist_ok=True)
        (tmp_path / "staging" / "#1-Demo").rename(data / "inbox" / "#1-Demo")
        deadline = time.monotonic() + 60
        while not list((data / "mail").glob("*.eml")) if (data / "mail").exists() else True:
            assert process.poll() is None, (tmp_path / "pacsflow.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no study-complete mail within 60 s"
            time.sleep(0.2)
        while len(list((data / "archive").rglob("*.dcm"))) < 25:
            assert time.monotonic() < deadline, "sources were not archived"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        log.close()
    stored = sorted((data / "storage").rglob("*.dcm"))
    assert len(stored) == 25
    # Each stored instance is the source file's data set (only the file meta may differ).
    assert data_sets(stored) == data_sets((data / "archive").rglob("*.dcm"))
    assert not list((data / "inbox").rglob("*.dcm"))
    [mail_file] = (data / "mail").glob("*.eml")
    mail = message_from_bytes(mail_file.read_bytes(), policy=policy.default)
    assert mail["Subject"].startswith("PACSFLOW TRANSFER SUCCESS for 25 files")
    assert "Stored in:" in mail.get_content()
    assert len(sources) == 25
