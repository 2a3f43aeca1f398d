"""The sender pool: slots in sender processes, used from asyncio."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from pacsflow_uploader.files import FileJob
from pacsflow_uploader.pool import SenderPool

from tests.dicom.synthetic import write_ct_series
from tests.peers import free_port
from tests.uploader.support import OPTIONS, Storescp

pytestmark = pytest.mark.dcmtk


def jobs(paths: list[Path], start: int = 0) -> list[FileJob]:
    return [FileJob(start + i, str(p)) for i, p in enumerate(paths)]


async def test_slots_keep_their_association_in_their_process(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", 40)
    with Storescp(tmp_path / "pacs") as pacs:
        pool = SenderPool(OPTIONS, processes=2)
        await pool.start()
        try:
            first = await asyncio.gather(
                pool.run(("pacs", 0), pacs.node, jobs(paths[:10])),
                pool.run(("pacs", 1), pacs.node, jobs(paths[10:20], 10)),
            )
            second = await asyncio.gather(
                pool.run(("pacs", 0), pacs.node, jobs(paths[20:30], 20)),
                pool.run(("pacs", 1), pacs.node, jobs(paths[30:], 30)),
            )
            assert len(pool.process_ids()) == 2
        finally:
            await pool.close()
        assert len(pacs.files()) == 40
    assert [c.associations_opened for c in first] == [1, 1]
    assert [c.associations_opened for c in second] == [0, 0]
    assert all(r.category == "success" for c in first + second for r in c.results)
    assert sorted(r.key for c in first + second for r in c.results) == list(range(40))


async def test_a_killed_sender_process_leaves_its_chunk_in_doubt_and_is_replaced(
    tmp_path: Path,
) -> None:
    paths = write_ct_series(tmp_path / "ct", 52)
    # The peer sleeps after each file, so the chunk is still going when the process dies.
    with Storescp(tmp_path / "pacs", extra_args=["--sleep-after", "1"]) as pacs:
        pool = SenderPool(OPTIONS, processes=1)
        await pool.start()
        try:
            running = asyncio.ensure_future(pool.run(("pacs", 0), pacs.node, jobs(paths[:50])))
            await asyncio.sleep(1.5)
            (pid,) = pool.process_ids()
            os.kill(pid, signal.SIGKILL)
            lost = await asyncio.wait_for(running, 10)
            after = await pool.run(("pacs", 0), pacs.node, jobs(paths[50:], 50))
            assert pool.process_ids() != [pid]
        finally:
            await pool.close()
    assert len(lost.results) == 50
    assert {(r.category, r.transmitted) for r in lost.results} == {("error", True)}
    assert "sender process ended" in (lost.results[0].error or "")
    assert [r.category for r in after.results] == ["success"] * 2


@pytest.mark.parametrize("processes", [0, 1])
async def test_an_association_opened_ahead_carries_the_first_chunk(
    tmp_path: Path, processes: int
) -> None:
    from pacsflow.config import Node
    from pacsflow.dicom import read_part10

    from tests.dicom.engine.conftest import RecordingHandler, make_server

    paths = write_ct_series(tmp_path / "ct", 5)
    first = read_part10(paths[0])
    presentations = [(first.sop_class_uid, first.transfer_syntax_uid)]
    handler = RecordingHandler()
    server = make_server(handler).start()
    pool = SenderPool(OPTIONS, processes=processes)
    try:
        node = Node(ae_title="ENGINE", host="127.0.0.1", port=server.port)
        ahead = await pool.associate(("engine", 0), node, presentations)
        assert handler.wait_outcome("accepted", "")
        again = await pool.associate(("engine", 0), node, presentations)
        chunk = await pool.run(("engine", 0), node, jobs(paths))
        # Nobody answers here: the error comes back as the result, never raised.
        closed = Node(ae_title="ENGINE", host="127.0.0.1", port=free_port())
        refused = await pool.associate(("closed", 0), closed, presentations)
    finally:
        await pool.close()
        server.stop(grace=1)
        server.listener.close()
    assert (ahead.associations_opened, ahead.association_open, ahead.results) == (1, True, [])
    assert (again.associations_opened, again.association_open) == (0, True)
    assert chunk.associations_opened == 0
    assert [r.category for r in chunk.results] == ["success"] * 5 and handler.stores == 5
    assert handler.outcomes == {("accepted", ""): 1, ("released", ""): 1}
    assert refused.association_open is False
    assert "cannot connect" in (refused.association_error or "")
