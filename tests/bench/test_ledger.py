"""``python -m bench.ledger``, short: every step runs on a fresh database and is measured."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_DSN

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]


def test_it_measures_each_step_of_the_uploaders_queue(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.ledger", "--files", "130", "--rounds", "1",
         "--pg-dsn", PG_ADMIN_DSN, "--folder", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    rows = dict(re.findall(r"^  (schedule|claim|settle|total) +([\d.]+) +[\d.]+", completed.stdout,
                           re.MULTILINE))  # fmt: skip
    assert rows.keys() == {"schedule", "claim", "settle", "total"}, completed.stdout
    assert all(float(value) > 0 for value in rows.values()), completed.stdout
    assert "µs per file" in completed.stdout
