"""The asyncio SCU against real receivers: DCMTK storescp, Orthanc, and the engine's own SCP."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from pathlib import Path

import pytest

from pacsflow.config import Node
from pacsflow.dicom import NetworkOptions, read_part10
from pacsflow.dicom.engine import AsyncStoreServer, acse, pdu
from pacsflow.dicom.engine.scu import AsyncStoreSession, echo
from pacsflow.errors import AssociationRejected
from tests.dicom.engine.conftest import RecordingHandler, digest_of_data_set, make_server
from tests.dicom.synthetic import write_ct_series
from tests.peers import OrthancProcess, StoreSCPProcess


def _files(paths: list[Path]) -> list:
    return [read_part10(path) for path in paths]


def _received_digests(folder: Path) -> set[str]:
    return {digest_of_data_set(path) for path in folder.iterdir() if path.is_file()}


@pytest.mark.parametrize("peer_pdu", [None, 4101, 16382])  # storescp announces 4101 as 4100
async def test_files_reach_storescp_intact(
    tmp_path: Path, options: NetworkOptions, peer_pdu: int | None
) -> None:
    paths = write_ct_series(tmp_path / "series", 8, rows=128, columns=160)
    files = _files(paths)
    extra = ["--max-pdu", str(peer_pdu)] if peer_pdu else []
    with StoreSCPProcess(tmp_path / "in", extra_args=extra) as scp:
        async with AsyncStoreSession.for_files(scp.node, options, files) as session:
            if peer_pdu:
                assert session.peer_max_pdu == peer_pdu & ~1
            results = [await session.send(file) for file in files]
        assert [r.category for r in results] == ["success"] * len(files)
        assert _received_digests(scp.folder) == {digest_of_data_set(p) for p in paths}


async def test_an_odd_peer_maximum_is_honoured(
    handler: RecordingHandler, tmp_path: Path, options: NetworkOptions
) -> None:
    # The engine's SCP announces 4101 and aborts any P-DATA-TF longer than that.
    server = make_server(handler, max_pdu=4101).start()
    try:
        paths = write_ct_series(tmp_path / "series", 4, rows=100, columns=70)
        files = _files(paths)
        node = Node(ae_title="ENGINE", host="127.0.0.1", port=server.port)
        async with AsyncStoreSession.for_files(node, options, files) as session:
            assert session.peer_max_pdu == 4101
            results = [await session.send(file) for file in files]
        assert [r.category for r in results] == ["success"] * 4
        assert handler.stored == {f.sop_instance_uid: digest_of_data_set(f.path) for f in files}
    finally:
        server.stop(1)
        server.listener.close()


async def test_echo_and_several_associations_from_one_loop(
    engine_scp: AsyncStoreServer, handler: RecordingHandler, tmp_path: Path, options: NetworkOptions
) -> None:
    node = Node(ae_title="ENGINE", host="127.0.0.1", port=engine_scp.port)
    assert await echo(node, options) >= 0
    paths = write_ct_series(tmp_path / "series", 30)
    files = _files(paths)

    async def send_share(share: list) -> list[str]:
        async with AsyncStoreSession.for_files(node, options, share) as session:
            return [(await session.send(file)).category for file in share]

    shares = [files[index::3] for index in range(3)]
    outcomes = await asyncio.gather(*(send_share(share) for share in shares))
    assert [category for share in outcomes for category in share] == ["success"] * 30
    assert handler.stored == {f.sop_instance_uid: digest_of_data_set(f.path) for f in files}


async def test_a_rejection_is_association_rejected(
    engine_scp: AsyncStoreServer, options: NetworkOptions
) -> None:
    node = Node(ae_title="SOMEONE", host="127.0.0.1", port=engine_scp.port)
    with pytest.raises(AssociationRejected, match="called AE title not recognised"):
        await echo(node, options)


async def test_an_scp_abort_mid_transfer_is_an_error_result(
    tmp_path: Path, options: NetworkOptions
) -> None:
    paths = write_ct_series(tmp_path / "series", 2, rows=256, columns=256)
    files = _files(paths)
    with StoreSCPProcess(tmp_path / "in", extra_args=["--abort-during"]) as scp:
        session = AsyncStoreSession.for_files(scp.node, options, files)
        await session.open()
        result = await session.send(files[0])
        assert result.category == "error"
        assert not session.is_open
        # The next file is not tried on a dead association.
        assert (await session.send(files[1])).category == "error"


async def test_files_reach_orthanc(tmp_path: Path, options: NetworkOptions) -> None:
    paths = write_ct_series(tmp_path / "series", 10, rows=128, columns=128)
    files = _files(paths)
    with OrthancProcess(tmp_path / "orthanc") as pacs:
        async with AsyncStoreSession.for_files(pacs.node, options, files) as session:
            results = [await session.send(file) for file in files]
        assert {r.category for r in results} == {"success"}
        assert pacs.instance_count() == 10


def _colliding_acceptor(listener: socket.socket, seen: list[str]) -> None:
    """An acceptor that answers A-RELEASE-RQ with its own A-RELEASE-RQ first (a collision)."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)

        def read() -> tuple[int, bytes]:
            header = conn.recv(6, socket.MSG_WAITALL)
            length = int.from_bytes(header[2:6], "big")
            return header[0], header + conn.recv(length, socket.MSG_WAITALL)

        _, request = read()
        parsed = acse.read_request(request)
        answer = acse.accept(
            parsed, accepts_sop_class=lambda uid: True, transfer_syntaxes=["1.2.840.10008.1.2"],
            max_pdu=16384, implementation_class_uid="1.2.3", implementation_version="COLLIDE",
        )  # fmt: skip
        conn.sendall(answer.pdu)
        kind, _ = read()
        seen.append(f"got {kind}")
        assert kind == pdu.A_RELEASE_RQ
        conn.sendall(pdu.release_pdu())  # our own A-RELEASE-RQ: the collision
        kind, _ = read()
        seen.append(f"got {kind}")
        assert kind == pdu.A_RELEASE_RP  # the requestor answers first (PS3.8 9.2.8) ...
        conn.sendall(pdu.release_pdu(response=True))  # ... then gets its answer
        seen.append("done")


async def test_a_release_collision_is_resolved(options: NetworkOptions) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        seen: list[str] = []
        thread = threading.Thread(target=_colliding_acceptor, args=(listener, seen))
        thread.start()
        node = Node(ae_title="COLLIDE", host="127.0.0.1", port=listener.getsockname()[1])
        session = AsyncStoreSession(node, options, [], echo=True)
        await session.open()
        await session.close()
        await asyncio.to_thread(thread.join, 10)
    assert seen == [f"got {pdu.A_RELEASE_RQ}", f"got {pdu.A_RELEASE_RP}", "done"]
    assert not session.is_open


async def test_many_stores_lose_no_response(
    engine_scp: AsyncStoreServer, handler: RecordingHandler, tmp_path: Path, options: NetworkOptions
) -> None:
    """10^5 C-STOREs of tiny files into the asyncio SCP (2 x 10^4 into the lean one)."""
    count = 100_000 if isinstance(engine_scp, AsyncStoreServer) else 20_000
    paths = write_ct_series(tmp_path / "series", 100, rows=8, columns=8)
    files = _files(paths)
    node = Node(ae_title="ENGINE", host="127.0.0.1", port=engine_scp.port)
    successes = 0
    async with AsyncStoreSession.for_files(node, options, files) as session:
        for index in range(count):
            result = await session.send(files[index % len(files)])
            successes += result.category == "success"
    assert successes == count
    assert handler.stores == count
    assert len(handler.stored) == len(files)
    assert hashlib.sha256(b"").hexdigest() not in handler.stored.values()


@pytest.mark.parametrize("engine", ["asyncio", "lean"])
@pytest.mark.parametrize("scp_max_pdu", [16382, 262144])
async def test_data_sets_of_changing_sizes_arrive_intact(
    handler: RecordingHandler, tmp_path: Path, options: NetworkOptions, engine: str,
    scp_max_pdu: int,
) -> None:  # fmt: skip
    # Large, tiny, medium, large again: the SCP's buffers shrink and grow between messages,
    # and large PDVs go straight into their message.
    paths = []
    for index, (rows, columns) in enumerate([(512, 512), (4, 4), (200, 96), (700, 512), (2, 2)]):
        paths += write_ct_series(tmp_path / f"s{index}", 2, rows=rows, columns=columns)
    files = _files(paths)
    server = make_server(handler, engine, max_pdu=scp_max_pdu).start()
    try:
        node = Node(ae_title="ENGINE", host="127.0.0.1", port=server.port)
        async with AsyncStoreSession.for_files(node, options, files) as session:
            assert session.peer_max_pdu == scp_max_pdu
            results = [await session.send(file) for file in files]
    finally:
        server.stop(1)
        server.listener.close()
    assert [r.category for r in results] == ["success"] * len(files)
    assert handler.stored == {f.sop_instance_uid: digest_of_data_set(f.path) for f in files}
