"""``pacsflow ledger``: the sent, failed and invalid lists after a real import, and retries."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.cli.support import embedded_config, pacsflow, running, status_json, wait_until
from tests.conftest import require_tool
from tests.dicom.synthetic import write_ct_series
from tests.peers import free_port, wait_for_port

pytestmark = pytest.mark.dcmtk


@contextmanager
def storescp(folder: Path, port: int, *, accept_compressed: bool) -> Iterator[Path]:
    """DCMTK storescp on ``port``; without +xa it refuses compressed transfer syntaxes."""
    folder.mkdir(parents=True, exist_ok=True)
    args = [require_tool("storescp"), *(["+xa"] if accept_compressed else []),
            "-aet", "STORESCP", "-od", str(folder), str(port)]
    with open(folder.parent / f"{folder.name}.log", "ab") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_for_port(port, process)
        yield folder
    finally:
        process.terminate()
        process.wait(timeout=10)


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_mixed_import_gives_exact_lists_and_failed_files_can_be_retried(
    tmp_path: Path, pydicom_test_files: Path
) -> None:
    port = free_port()
    config = embedded_config(tmp_path, extra=f"""
uploader:
  destinations: [pacs]
  max_attempts: 1
""")
    # The node the uploader sends to, added to the generated configuration's nodes.
    text = config.read_text().replace(
        "nodes:\n", f"nodes:\n  pacs: {{ae_title: STORESCP, host: 127.0.0.1, port: {port}}}\n")
    config.write_text(text)
    study = tmp_path / "data" / "inbox" / "study1"
    valid = write_ct_series(tmp_path / "made", 3)
    study.mkdir(parents=True)
    for path in valid:
        shutil.copy(path, study / path.name)
    compressed = study / "jp2k.dcm"
    shutil.copy(pydicom_test_files / "MR_small_jp2klossless.dcm", compressed)
    (study / "notes.txt").write_text("not a DICOM file\n")
    (study / "truncated.dcm").write_bytes(valid[0].read_bytes()[:600])
    invalid_paths = {str(study / "notes.txt"), str(study / "truncated.dcm")}

    with storescp(tmp_path / "pacs-plain", port, accept_compressed=False), \
         running(tmp_path / "run.log", "-c", str(config), "run", "watcher", "uploader") as run:
        wait_until(
            lambda: (f := status_json(config)["files"]) and f["sent"] == 3 and f["failed"] == 1
            and f["invalid"] == 2 and f["pending"] == 0,
            90, "the import to settle: " + run.log()[-800:],
        )

        exported = pacsflow("-c", str(config), "ledger", "export", "--status", "invalid", "--csv")
        assert exported.returncode == 0, exported.stderr
        rows = _csv(exported.stdout)
        assert {row["path"] for row in rows} == invalid_paths
        assert len(rows) == 2
        for row in rows:
            assert row["status"] == "invalid"
            assert row["reason"] and "quarantined as" in row["reason"]

        failed = pacsflow("-c", str(config), "ledger", "list", "--status", "failed", "--json")
        assert failed.returncode == 0, failed.stderr
        [row] = json.loads(failed.stdout)
        assert row["path"] == str(compressed)
        assert row["reason"].startswith("pacs unsupported")
        assert row["destinations"] == "pacs=unsupported"

        sent = _csv(pacsflow("-c", str(config), "ledger", "export", "--status", "sent").stdout)
        assert sorted(Path(row["path"]).name for row in sent) == [p.name for p in valid]
        assert all(row["archive_path"] for row in sent if row["status"] == "archived")

        plain = pacsflow("-c", str(config), "ledger", "list", "--status", "invalid")
        assert plain.stdout.splitlines()[-1] == "2 file(s)"

    # The PACS now takes compressed images: queue the failed file again.
    with storescp(tmp_path / "pacs-all", port, accept_compressed=True) as received, \
         running(tmp_path / "run2.log", "-c", str(config), "run", "watcher", "uploader") as run:
        retried = pacsflow("-c", str(config), "ledger", "retry", "--status", "failed")
        assert retried.returncode == 0, retried.stderr
        assert retried.stdout.startswith("1 failed file(s) queued again (pacs 1)")
        wait_until(
            lambda: (f := status_json(config)["files"]) and f["sent"] == 4 and f["failed"] == 0,
            90, "the retried file sent: " + run.log()[-800:],
        )
        assert len(list(received.iterdir())) == 1
    again = pacsflow("-c", str(config), "ledger", "retry", "--status", "failed")
    assert again.returncode == 0 and again.stdout.startswith("0 failed file(s) queued again")


def test_retry_takes_only_failed(tmp_path: Path) -> None:
    config = embedded_config(tmp_path)
    assert pacsflow("-c", str(config), "db", "upgrade").returncode == 0
    result = pacsflow("-c", str(config), "ledger", "retry", "--status", "invalid")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "only --status failed" in result.stderr
