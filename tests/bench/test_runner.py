"""The benchmark runner, short: every path once on tiny data sets, arrival verified.

The full runner is ``make bench``; this proves in CI that each path starts its peers and
services, measures, stops them and checks what arrived. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.paths import PATHS
from bench.support import ArrivalError, filing_milestones, verify_arrival
from tests.conftest import PG_ADMIN_DSN, RABBIT_URL
from tests.dicom.synthetic import write_ct_series

pytestmark = [pytest.mark.rabbit, pytest.mark.postgres, pytest.mark.dcmtk, pytest.mark.orthanc]

ROOT = Path(__file__).resolve().parents[2]


def test_every_path_runs_and_verifies_arrival(tmp_path: Path) -> None:
    output = tmp_path / "results"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--datasets", "large", "small", "--large-images", "6",
         "--small-images", "40", "--rounds", "1", "--output", str(output),
         "--folder", str(tmp_path), "--rabbit-url", RABBIT_URL, "--pg-dsn", PG_ADMIN_DSN],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (result_file,) = output.glob("*.json")
    summary = json.loads(result_file.read_text())
    assert summary["error"] is None
    rows = {(row["dataset"], row["path"]): row for row in summary["results"]}
    assert set(rows) == {(name, key) for name in ("large", "small") for key in PATHS}
    for (name, key), row in rows.items():
        images = 6 if name == "large" else 40
        assert row["verified"] == {"files": images, "compared": 2}, (name, key)
        assert row["ratio"] > 0 and row["images_per_second"] > 0
        assert row["processes"], f"{key}: no process was measured"
        for label, figures in row["processes"].items():
            assert figures["peak_rss_mb"] > 1, (key, label)
    assert {"watcher", "uploader", "router-scp"} <= rows[("small", "e2e")]["processes"].keys()
    for key in ("send", "uploader-rabbit"):
        filed = rows[("small", key)]["milestones"]
        # The first file of a warm bare transfer may be filed within half a millisecond.
        assert 0 <= filed["first_filed_seconds"] <= filed["half_filed_seconds"] <= filed[
            "last_filed_seconds"], (key, filed)  # fmt: skip
        assert filed["last_filed_seconds"] > 0, (key, filed)
    costs = {(cost["dataset"], cost["path"]): cost for cost in summary["pipeline_cost"]}
    assert {path for _, path in costs} == {"uploader-rabbit", "uploader-volatile", "e2e",
                                           "embedded"}
    # The path that records nothing is a comparison, held to no goal.
    assert costs[("small", "uploader-volatile")]["met"] is None
    assert isinstance(costs[("small", "uploader-rabbit")]["met"], bool)
    markdown = result_file.with_suffix(".md").read_text()
    assert "watcher → uploader → router-scp (RabbitMQ + PostgreSQL)" in markdown
    assert "What each clock measures" in markdown


def _received(tmp_path: Path) -> tuple[dict[str, Path], Path]:
    sources = write_ct_series(tmp_path / "sources", 5)
    received = tmp_path / "received"
    shutil.copytree(sources[0].parent, received)
    from bench.support import dataset_bytes

    return {dataset_bytes(path)[0]: path for path in sources}, received


def test_verification_accepts_a_complete_copy(tmp_path: Path) -> None:
    sources, received = _received(tmp_path)
    assert verify_arrival(received, 5, sources) == {"files": 5, "compared": 2}


def test_a_missing_file_fails_verification(tmp_path: Path) -> None:
    sources, received = _received(tmp_path)
    sorted(received.iterdir())[2].unlink()
    with pytest.raises(ArrivalError, match="4 of 5 files arrived"):
        verify_arrival(received, 5, sources)


def test_a_changed_byte_fails_verification(tmp_path: Path) -> None:
    sources, received = _received(tmp_path)
    first = sorted(received.iterdir())[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF
    first.write_bytes(bytes(data))
    with pytest.raises(ArrivalError, match="differs from its source"):
        verify_arrival(received, 5, sources)


def test_filing_times_come_from_the_files_not_from_polling(tmp_path: Path) -> None:
    _, received = _received(tmp_path)
    (received / ".partial.dcm").write_bytes(b"being written")  # not filed yet: not counted
    for offset, path in enumerate(sorted(received.glob("[!.]*"))):
        os.utime(path, (1000.0 + offset, 1000.0 + offset))
    assert filing_milestones(received, 999.5) == {
        "first_filed_seconds": 0.5, "half_filed_seconds": 2.5, "last_filed_seconds": 4.5}
