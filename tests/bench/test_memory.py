"""The memory soak, short: thousands of small files through watcher → uploader → router-scp.

Every file must arrive, and no service's resident memory may keep growing once the first
quarter of the run (start-up, first use of each code path) is behind it. The bound is
generous for allocator noise, yet a service keeping one small object per file fails it: the
uploader keeping each file-ready's ReadyFile (about 1.7 kB) grows by about 9 MB from the second
quarter to the last over 10,000 files, while the services stay within about 2 MB without it.
No timing is asserted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.memory import soak
from bench.paths import Setup
from tests.conftest import PG_ADMIN_DSN, RABBIT_URL

pytestmark = [pytest.mark.rabbit, pytest.mark.postgres]

FILES = 10_000
#: RSS growth from the second quarter's mean to the last quarter's, per service
GROWTH_BOUND_MB = 4.0


async def test_services_keep_flat_memory_while_small_files_stream(tmp_path: Path) -> None:
    result = await soak(tmp_path, FILES, unit_size=1000, in_flight=2, mode="rabbit", interval=0.2,
                        setup=Setup(rabbit_url=RABBIT_URL, pg_admin_dsn=PG_ADMIN_DSN),
                        progress=False)  # fmt: skip
    assert result.files == FILES
    assert set(result.services) == {"watcher", "uploader", "router-scp"}
    for label, figures in result.services.items():
        assert figures["peak_mb"] > 20, label  # the samples are of the live processes
        assert figures["growth_mb"] < GROWTH_BOUND_MB, (label, figures)
