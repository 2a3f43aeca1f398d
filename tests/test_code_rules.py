"""Rules the code keeps, checked over its source."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAIT_FOR = re.compile(r"\basyncio\.wait_for\(|\bfrom asyncio import\b[^\n]*\bwait_for\b")


def test_timeouts_around_awaits_are_asyncio_timeout_not_wait_for() -> None:
    # Python 3.11's wait_for drops a cancel that lands as the awaited step ends: a service
    # told to stop (or `status --watch` after Ctrl-C) would go on.
    offenders = [
        str(path.relative_to(ROOT))
        for folder in (ROOT / "shared", ROOT / "services")
        for path in folder.rglob("*.py")
        if WAIT_FOR.search(path.read_text())
    ]
    assert offenders == []
