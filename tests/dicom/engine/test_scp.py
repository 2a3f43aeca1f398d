"""The asyncio SCP against real senders: DCMTK storescu/echoscu, Orthanc C-STORE and C-MOVE."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from pacsflow.dicom import read_part10
from pacsflow.dicom.engine import AsyncStoreServer, StoreRequest, pdu
from tests.conftest import require_tool
from tests.dicom.engine.conftest import RecordingHandler, digest_of_data_set, make_server
from tests.dicom.synthetic import write_ct_series, write_presentation_variety
from tests.peers import OrthancProcess


def _run(args: list[str], env: dict[str, str], log: Path, timeout: float = 120) -> int:
    with open(log, "ab") as output:
        return subprocess.run(
            args, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=timeout, check=False
        ).returncode


def test_echoscu_is_answered(
    engine_scp: AsyncStoreServer, handler: RecordingHandler, dcmtk_env: dict[str, str], tmp_path: Path
) -> None:
    code = _run(
        [require_tool("echoscu"), "-aec", "ENGINE", "127.0.0.1", str(engine_scp.port)],
        dcmtk_env, tmp_path / "echoscu.log",
    )  # fmt: skip
    assert code == 0, (tmp_path / "echoscu.log").read_text()
    assert handler.wait_outcome("released", "")


# storescu cannot send with an odd maximum itself ("odd block length"): 4100 and 16382
# are the odd-looking sizes it can use.
@pytest.mark.parametrize("send_pdu", [None, 4100, 16382])
def test_storescu_files_arrive_intact(
    engine_scp: AsyncStoreServer,
    handler: RecordingHandler,
    dcmtk_env: dict[str, str],
    tmp_path: Path,
    send_pdu: int | None,
) -> None:
    # Large enough that every image spans many PDUs, odd PDU sizes included.
    paths = write_ct_series(tmp_path / "series", 12, rows=128, columns=160)
    extra = ["--max-send-pdu", str(send_pdu)] if send_pdu else []
    code = _run(
        [require_tool("storescu"), "-aec", "ENGINE", *extra, "+sd",
         "127.0.0.1", str(engine_scp.port), str(tmp_path / "series")],
        dcmtk_env, tmp_path / "storescu.log",
    )  # fmt: skip
    assert code == 0, (tmp_path / "storescu.log").read_text()
    expected = {read_part10(path).sop_instance_uid: digest_of_data_set(path) for path in paths}
    assert handler.stored == expected
    assert handler.wait_outcome("released", "")


def test_an_unknown_called_ae_is_rejected(
    engine_scp: AsyncStoreServer, handler: RecordingHandler, dcmtk_env: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "echoscu.log"
    code = _run(
        [require_tool("echoscu"), "-aec", "NOBODY", "127.0.0.1", str(engine_scp.port)],
        dcmtk_env, log,
    )  # fmt: skip
    assert code != 0
    assert "Called AE Title Not Recognized" in log.read_text()
    assert handler.wait_outcome("rejected", "called-ae-unknown")


def test_no_acceptable_context_refuses_the_file(
    engine_scp: AsyncStoreServer, handler: RecordingHandler, dcmtk_env: dict[str, str], tmp_path: Path
) -> None:
    # A private SOP class the SCP's filter does not take: the context is refused.
    path = write_presentation_variety(
        tmp_path / "series", ["1.2.826.0.1.3680043.9.9999.1"], ["1.2.840.10008.1.2.1"]
    )[0]
    log = tmp_path / "storescu.log"
    code = _run(
        [require_tool("storescu"), "-aec", "ENGINE", "127.0.0.1", str(engine_scp.port), str(path)],
        dcmtk_env, log,
    )  # fmt: skip
    assert code != 0
    assert "no presentation context" in log.read_text().lower()
    assert handler.stored == {}


def test_storescu_abort_mid_association_is_counted(
    engine_scp: AsyncStoreServer, handler: RecordingHandler, dcmtk_env: dict[str, str], tmp_path: Path
) -> None:
    write_ct_series(tmp_path / "series", 3)
    _run(
        [require_tool("storescu"), "-aec", "ENGINE", "--abort", "+sd",
         "127.0.0.1", str(engine_scp.port), str(tmp_path / "series")],
        dcmtk_env, tmp_path / "storescu.log",
    )  # fmt: skip
    assert handler.wait_outcome("aborted", "aborted-by-peer")
    assert len(handler.stored) == 3


def _associate_raw(port: int, max_pdu: int = 16384) -> socket.socket:
    """An association made by hand (our requestor PDU), for a peer that misbehaves later."""
    from pacsflow.dicom.engine import acse

    proposal = acse.propose(
        called_ae="ENGINE", calling_ae="RAW",
        presentations=[("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])],
        max_pdu=max_pdu, implementation_class_uid="1.2.3.4", implementation_version="RAW",
    )  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(proposal.pdu)
    header = sock.recv(6, socket.MSG_WAITALL)
    assert header[0] == pdu.A_ASSOCIATE_AC
    sock.recv(int.from_bytes(header[2:6], "big"), socket.MSG_WAITALL)
    return sock


def test_a_peer_abort_mid_transfer_ends_the_association(
    engine_scp: AsyncStoreServer, handler: RecordingHandler
) -> None:
    from pacsflow.dicom.engine.dimse import c_store_rq

    with _associate_raw(engine_scp.port) as sock:
        command = c_store_rq(1, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5")
        sock.sendall(pdu.p_data(1, command, command=True))
        sock.sendall(pdu.p_data(1, b"\x08\x00" * 100, command=False, last=False))
        sock.sendall(pdu.abort_pdu())
        assert sock.recv(1) == b""  # the SCP closes
    assert handler.wait_outcome("aborted", "aborted-by-peer")
    assert handler.stored == {}


@pytest.mark.parametrize("engine", ["asyncio", "lean"])
def test_a_pdu_over_the_negotiated_size_is_aborted(handler: RecordingHandler, engine: str) -> None:
    server = make_server(handler, engine, max_pdu=16384).start()
    try:
        with _associate_raw(server.port) as sock:
            sock.sendall(pdu.PDU_HEADER.pack(pdu.P_DATA_TF, 0, 16385))
            answer = sock.recv(10, socket.MSG_WAITALL)
            assert answer[0] == pdu.A_ABORT and answer[9] == 6  # invalid PDU parameter value
        assert handler.wait_outcome("aborted", "pdu-too-large")
    finally:
        server.stop(1)
        server.listener.close()


@pytest.mark.parametrize("engine", ["asyncio", "lean"])
def test_the_association_limit_answers_local_limit_exceeded(
    handler: RecordingHandler, engine: str
) -> None:
    server = make_server(handler, engine, max_associations=1).start()
    try:
        with _associate_raw(server.port) as first:
            from pacsflow.dicom.engine import acse

            proposal = acse.propose(
                called_ae="ENGINE", calling_ae="SECOND",
                presentations=[("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])],
                max_pdu=16384, implementation_class_uid="1.2.3.4", implementation_version="X",
            )  # fmt: skip
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as second:
                second.sendall(proposal.pdu)
                answer = second.recv(10, socket.MSG_WAITALL)
            assert answer[0] == pdu.A_ASSOCIATE_RJ
            assert tuple(answer[7:10]) == (2, 3, 2)  # transient, presentation, local limit
            first.sendall(pdu.release_pdu())
            assert first.recv(10, socket.MSG_WAITALL)[0] == pdu.A_RELEASE_RP
        assert handler.wait_outcome("rejected", "too-many-associations")
    finally:
        server.stop(1)
        server.listener.close()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> OrthancProcess:
    with OrthancProcess(tmp_path_factory.mktemp("orthanc-engine")) as orthanc:
        yield orthanc


def test_orthanc_store_and_move_arrive(
    engine_scp: AsyncStoreServer,
    handler: RecordingHandler,
    pacs: OrthancProcess,
    dcmtk_env: dict[str, str],
    tmp_path: Path,
) -> None:
    import json

    paths = write_ct_series(tmp_path / "series", 20, rows=128, columns=128)
    pacs.upload(paths)
    pacs.add_modality("engine", "ENGINE", "127.0.0.1", engine_scp.port)
    study = read_part10(paths[0]).study_instance_uid
    studies = pacs.rest("POST", "/tools/find", json.dumps(
        {"Level": "Study", "Query": {"StudyInstanceUID": study}}).encode())  # fmt: skip
    # C-STORE from Orthanc (its REST API sends the study to the modality).
    pacs.rest("POST", "/modalities/engine/store", json.dumps(studies).encode())
    expected = {read_part10(path).sop_instance_uid: digest_of_data_set(path) for path in paths}
    assert handler.stored == expected
    handler.stored.clear()
    # C-MOVE: movescu asks Orthanc to move the study to ENGINE; Orthanc opens the association.
    log = tmp_path / "movescu.log"
    code = _run(
        [require_tool("movescu"), "-S", "-aec", pacs.ae_title, "-aem", "ENGINE",
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
         "127.0.0.1", str(pacs.dicom_port)],
        dcmtk_env, log,
    )  # fmt: skip
    assert code == 0, log.read_text()
    assert handler.stored == expected


def test_storescu_repeated_stores_lose_no_response(
    engine_scp: AsyncStoreServer, handler: RecordingHandler, dcmtk_env: dict[str, str], tmp_path: Path
) -> None:
    """10^5 C-STOREs from storescu into the asyncio SCP (2 x 10^4 into the lean one), each answered."""
    count = 100_000 if isinstance(engine_scp, AsyncStoreServer) else 20_000
    path = write_ct_series(tmp_path / "one", 1, rows=8, columns=8)[0]
    log = tmp_path / "storescu.log"
    code = _run(
        [require_tool("storescu"), "-v", "--repeat", str(count), "-aec", "ENGINE",
         "127.0.0.1", str(engine_scp.port), str(path)],
        dcmtk_env, log, timeout=240,
    )  # fmt: skip
    text = log.read_text(errors="replace")
    assert code == 0, text[-2000:]
    assert text.count("Received Store Response (Success)") == count
    assert handler.stores == count
    assert handler.wait_outcome("released", "")


class _AwaitingHandler(RecordingHandler):
    """A handler whose store is a coroutine: the SCP stops reading until it is done."""

    async def store(self, request: StoreRequest) -> int:  # type: ignore[override]
        import asyncio

        await asyncio.sleep(0.01)
        return RecordingHandler.store(self, request)


def test_a_handler_may_be_a_coroutine(dcmtk_env: dict[str, str], tmp_path: Path) -> None:
    handler = _AwaitingHandler()
    server = make_server(handler).start()
    try:
        paths = write_ct_series(tmp_path / "series", 6, rows=300, columns=300)
        code = _run(
            [require_tool("storescu"), "-aec", "ENGINE", "+sd",
             "127.0.0.1", str(server.port), str(tmp_path / "series")],
            dcmtk_env, tmp_path / "storescu.log",
        )  # fmt: skip
        assert code == 0, (tmp_path / "storescu.log").read_text()
        expected = {read_part10(path).sop_instance_uid: digest_of_data_set(path) for path in paths}
        assert handler.stored == expected
        assert handler.wait_outcome("released", "")
    finally:
        server.stop(1)
        server.listener.close()
