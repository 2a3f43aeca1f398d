"""``pacsflow send``: the command line tool for one-shot sending, against DCMTK storescp."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pacsflow_uploader.send import run_send

from tests.dicom.synthetic import write_ct_series
from tests.peers import free_port
from tests.uploader.support import OPTIONS, Storescp

pytestmark = pytest.mark.dcmtk


def pacsflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacsflow", *args],
        capture_output=True, text=True, timeout=120, env=dict(os.environ), check=False,
    )  # fmt: skip


@pytest.fixture
def folder(tmp_path: Path, pydicom_test_files: Path) -> Path:
    """300 images in two sub-folders, a text file and a DICOMDIR."""
    root = tmp_path / "study"
    write_ct_series(root / "a", 200)
    write_ct_series(root / "b" / "deeper", 100)
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "DICOMDIR").write_bytes((pydicom_test_files / "dicomdirtests" / "DICOMDIR").read_bytes())
    return root


@pytest.mark.parametrize("engine", ["lean", "asyncio", "pynetdicom"])
def test_folder_is_sent_with_progress_and_summary(
    folder: Path, tmp_path: Path, engine: str
) -> None:
    with Storescp(tmp_path / "pacs") as pacs:
        result = pacsflow("send", str(folder), "--to", f"STORESCP@127.0.0.1:{pacs.port}",
                          "--associations", "2", "--engine", engine)
        received = pacs.uids()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    # Not a terminal: plain progress lines, the last one at 100 %.
    # 301 to send: the DICOMDIR is counted invalid without being read.
    progress = [line for line in lines if re.search(r"\d+/301 files", line)]
    assert progress and "301/301 files (100 %)" in progress[-1]
    summary = next(line for line in lines if " sent, " in line)
    assert re.match(
        rf"STORESCP@127\.0\.0\.1:{pacs.port}: 300 sent, 0 warnings, 0 failed, 2 invalid in "
        r"[\d.]+ s \(\d+ files/s, [\d.]+ MB/s\)$", summary
    ), summary
    assert "invalid: " in result.stdout and "notes.txt" in result.stdout
    assert len(received) == 300 and set(received.values()) == {1}


def test_failures_give_a_non_zero_exit(folder: Path) -> None:
    result = pacsflow("send", str(folder / "a"), "--to", f"NOBODY@127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "0 sent, 0 warnings, 200 failed, 0 invalid" in result.stdout
    assert "connection refused" in result.stdout
    assert "... and 190 more" in result.stdout


def test_bad_destination_is_a_usage_error(folder: Path) -> None:
    result = pacsflow("send", str(folder), "--to", "not-a-node")
    assert result.returncode == 2
    assert "no node named 'not-a-node'" in result.stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_progress_bar(folder: Path, tmp_path: Path) -> None:
    out = Terminal()
    with Storescp(tmp_path / "pacs", fork=False) as pacs:
        code = run_send([str(folder / "a")], [("pacs", pacs.node)], OPTIONS,
                        associations=1, processes=0, stream=out)
    text = out.getvalue()
    assert code == 0
    assert "━" in text and "200/200" in text
    assert "pacs: 200 sent, 0 warnings, 0 failed, 0 invalid" in text


@pytest.mark.parametrize(("extra_after", "associations"), [(5.0, 1), (0.0, 3)])
async def test_extra_associations_only_when_the_work_left_outlasts_the_threshold(
    tmp_path: Path, extra_after: float, associations: int
) -> None:
    """A short job stays on one association by default (a PACS that serves one at a time
    would leave a second request unanswered for seconds); with no threshold every
    association asked for is added, one after the other, as the uploader adds them."""
    from pacsflow.config import Node
    from pacsflow_uploader.send import send_files

    from tests.dicom.engine.conftest import RecordingHandler, make_server

    paths = write_ct_series(tmp_path / "ct", 300)
    handler = RecordingHandler()
    server = make_server(handler).start()
    try:
        node = Node(ae_title="ENGINE", host="127.0.0.1", port=server.port)
        (summary,) = await send_files([str(p) for p in paths], [("engine", node)], OPTIONS,
                                      associations=3, processes=1, chunk_size=10,
                                      extra_after=extra_after)  # fmt: skip
    finally:
        server.stop(grace=1)
        server.listener.close()
    assert summary.sent == 300 and handler.stores == 300
    # each one released at the end, none aborted
    assert handler.outcomes == {("accepted", ""): associations, ("released", ""): associations}
