"""Several C-STOREs outstanding on one association (asynchronous operations, PS3.7 D.3.3.3).

The uploader proposes a window only to nodes configured with one (``operations_window``).
pacsflow's asyncio SCP grants up to its own limit; DCMTK and Orthanc do not answer the
proposal, which means one request at a time. Two scripted peers show what no real one can:
that requests really are outstanding together (the peer answers only once three arrived),
and what happens to them when the association is lost in the middle.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pacsflow.config import Node
from pacsflow.dicom import NetworkOptions
from pacsflow.dicom.engine import acse, pdu
from pacsflow.dicom.engine.dimse import parse_request, store_response
from pacsflow.dicom.files import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacsflow.dicom.scp import STORAGE_TRANSFER_SYNTAXES
from pacsflow_uploader.files import FileJob
from pacsflow_uploader.scu import LeanStoreSession
from pacsflow_uploader.slots import ChunkResult, Slot

from tests.dicom.engine.conftest import RecordingHandler, digest_of_data_set, make_server
from tests.dicom.engine.test_framing import _recv_exact
from tests.dicom.synthetic import write_ct_series
from tests.peers import OrthancProcess
from tests.uploader.support import OPTIONS, Storescp

pytestmark = pytest.mark.dcmtk


def send(node: Node, paths: list[Path], options: NetworkOptions = OPTIONS) -> tuple[ChunkResult, int]:
    """Send ``paths`` over one slot: the chunk's results and the window negotiated."""
    slot = Slot(node, options)
    try:
        chunk = slot.run([FileJob(i, str(p)) for i, p in enumerate(paths)])
        session = slot._session
        window = session.operations_window if isinstance(session, LeanStoreSession) else 0
    finally:
        slot.close()
    return chunk, window


class TestNegotiation:
    def test_pacsflow_scp_grants_its_own_limit_and_every_file_arrives_intact(
        self, tmp_path: Path
    ) -> None:
        paths = write_ct_series(tmp_path / "ct", 120)
        handler = RecordingHandler()
        server = make_server(handler, operations_window=4).start()
        try:
            node = Node(ae_title="ENGINE", host="127.0.0.1", port=server.port,
                        operations_window=8)  # fmt: skip
            chunk, window = send(node, paths)
        finally:
            server.stop(grace=1)
            server.listener.close()
        assert window == 4
        assert [r.category for r in chunk.results] == ["success"] * 120
        assert chunk.associations_opened == 1
        assert sorted(handler.stored.values()) == sorted(digest_of_data_set(p) for p in paths)

    def test_a_node_without_a_window_sends_one_at_a_time(self, tmp_path: Path) -> None:
        paths = write_ct_series(tmp_path / "ct", 5)
        handler = RecordingHandler()
        server = make_server(handler).start()
        try:
            chunk, window = send(Node(ae_title="ENGINE", host="127.0.0.1", port=server.port),
                                 paths)  # fmt: skip
        finally:
            server.stop(grace=1)
            server.listener.close()
        assert window == 1
        assert [r.category for r in chunk.results] == ["success"] * 5

    def test_dcmtk_storescp_does_not_answer_the_proposal_and_gets_one_at_a_time(
        self, tmp_path: Path
    ) -> None:
        paths = write_ct_series(tmp_path / "ct", 30)
        with Storescp(tmp_path / "in", fork=False) as peer:
            chunk, window = send(peer.node.model_copy(update={"operations_window": 8}), paths)
            received = [p for p in peer.folder.rglob("*") if p.is_file()]
        assert window == 1
        assert [r.category for r in chunk.results] == ["success"] * 30
        assert len(received) == 30

    def test_orthanc_does_not_answer_the_proposal_and_gets_one_at_a_time(
        self, tmp_path: Path
    ) -> None:
        paths = write_ct_series(tmp_path / "ct", 30)
        with OrthancProcess(tmp_path / "orthanc") as orthanc:
            chunk, window = send(orthanc.node.model_copy(update={"operations_window": 8}), paths)
            stored = orthanc.instance_count()
        assert window == 1
        assert [r.category for r in chunk.results] == ["success"] * 30
        assert stored == 30


# --- scripted peers ---------------------------------------------------------------------------


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU's type and the whole PDU, header included."""
    header = _recv_exact(sock, 6)
    return header[0], header + _recv_exact(sock, int.from_bytes(header[2:6], "big"))


class ScriptedPeer:
    """An SCP granting a window of 8 that hands each complete C-STORE-RQ to ``script``:
    ``script(sock, association, requests)`` answers (or not) given every request so far
    on this association as (context ID, message ID, SOP class, SOP instance)."""

    def __init__(self, script: Callable[[socket.socket, int, list[tuple[int, int, str, str]]],
                                        None]) -> None:  # fmt: skip
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.associations = 0
        self.stored: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                self.associations += 1
                try:
                    self._association(conn, self.associations)
                except (ConnectionError, OSError):
                    pass

    def _association(self, conn: socket.socket, number: int) -> None:
        _kind, raw = _read_pdu(conn)
        answer = acse.accept(
            acse.read_request(raw), accepts_sop_class=lambda uid: True,
            transfer_syntaxes=STORAGE_TRANSFER_SYNTAXES, max_pdu=1 << 20,
            implementation_class_uid=IMPLEMENTATION_CLASS_UID,
            implementation_version=IMPLEMENTATION_VERSION_NAME, operations_window=8,
        )  # fmt: skip
        conn.sendall(answer.pdu)
        requests: list[tuple[int, int, str, str]] = []
        command = b""
        while True:
            kind, whole = _read_pdu(conn)
            if kind == pdu.A_RELEASE_RQ:
                conn.sendall(pdu.release_rp())
                return
            if kind != pdu.P_DATA_TF:
                return
            for context_id, control, fragment in pdu.pdv_items(whole[6:]):
                if pdu.is_command(control):
                    command += bytes(fragment)
                elif pdu.is_last(control):
                    request = parse_request(command)
                    command = b""
                    requests.append((context_id, request.message_id,
                                     request.affected_sop_class_uid,
                                     request.affected_sop_instance_uid))  # fmt: skip
                    self.script(conn, number, requests)

    def answer(self, conn: socket.socket, request: tuple[int, int, str, str]) -> None:
        context_id, message_id, sop_class, sop_instance = request
        self.stored.append(sop_instance)
        conn.sendall(pdu.p_data(
            context_id, store_response(sop_class, 0x8001, message_id, 0x0000, sop_instance),
            command=True,
        ))  # fmt: skip

    def close(self) -> None:
        self.listener.close()

    @property
    def node(self) -> Node:
        return Node(ae_title="SCRIPTED", host="127.0.0.1", port=self.port, operations_window=8)


@pytest.fixture
def peers() -> Iterator[list[ScriptedPeer]]:
    started: list[ScriptedPeer] = []
    yield started
    for peer in started:
        peer.close()


def test_requests_are_outstanding_together(peers: list[ScriptedPeer], tmp_path: Path) -> None:
    """The peer answers nothing until three requests arrived: one at a time would time out."""

    def hold_three(conn: socket.socket, _number: int, requests: list) -> None:  # type: ignore[type-arg]
        if len(requests) == 3:
            for request in requests:
                peer.answer(conn, request)
        elif len(requests) > 3:
            peer.answer(conn, requests[-1])

    peer = ScriptedPeer(hold_three)
    peers.append(peer)
    paths = write_ct_series(tmp_path / "ct", 6)
    quick = NetworkOptions(ae_title="PFTEST", dimse_timeout=2, acse_timeout=5)
    chunk, window = send(peer.node, paths, quick)
    assert window == 8
    assert [r.category for r in chunk.results] == ["success"] * 6
    assert chunk.associations_opened == 1


def test_a_lost_association_leaves_the_outstanding_in_doubt_and_sends_the_rest_again(
    peers: list[ScriptedPeer], tmp_path: Path
) -> None:
    """On the first association the peer reads a whole window (8), answers the first request
    and is gone: every request that had left unanswered is an error in doubt (the peer may
    hold it), and the files not yet sent go over a new association. Nothing is lost."""

    def drop_after_eight(conn: socket.socket, number: int, requests: list) -> None:  # type: ignore[type-arg]
        if number > 1:
            peer.answer(conn, requests[-1])
        elif len(requests) == 8:
            peer.answer(conn, requests[0])
            conn.shutdown(socket.SHUT_RDWR)
            raise ConnectionError("dropped")

    peer = ScriptedPeer(drop_after_eight)
    peers.append(peer)
    paths = write_ct_series(tmp_path / "ct", 12)
    chunk, _window = send(peer.node, paths)
    by_key = {r.key: r for r in chunk.results}
    assert len(chunk.results) == len(by_key) == 12
    assert by_key[0].category == "success"
    # Files 1-7 had left when the peer went: in doubt.
    for key in range(1, 8):
        assert by_key[key].category == "error" and by_key[key].transmitted, by_key[key]
        assert "no C-STORE response" in (by_key[key].error or "")
    # Whether file 8 left before the peer was gone is a race; what came after it went over
    # the second association.
    resent = {key for key, result in by_key.items() if key and result.category == "success"}
    assert resent in ({8, 9, 10, 11}, {9, 10, 11})
    if 8 not in resent:
        assert by_key[8].category == "error"
    assert chunk.associations_opened == 2
    assert len(peer.stored) == 1 + len(resent)


def test_large_images_are_not_sent_ahead_of_their_answer(
    peers: list[ScriptedPeer], tmp_path: Path
) -> None:
    """Beyond the first request, what is in flight stays under half a megabyte: ahead of an
    answer go small files, not 0.5 MB images (the wire bounds those, not the round trip)."""
    ahead: list[bool] = []

    def answer_noting_what_came_ahead(conn: socket.socket, _number: int, requests: list) -> None:  # type: ignore[type-arg]
        readable, _, _ = select.select([conn], [], [], 0.3)
        ahead.append(bool(readable))
        peer.answer(conn, requests[-1])

    peer = ScriptedPeer(answer_noting_what_came_ahead)
    peers.append(peer)
    small = write_ct_series(tmp_path / "small", 4)
    large = write_ct_series(tmp_path / "large", 4, 512, 512)
    chunk, _window = send(peer.node, small)
    assert [r.category for r in chunk.results] == ["success"] * 4
    assert ahead[:3] == [True] * 3  # the next request came before the answer
    ahead.clear()
    chunk, _window = send(peer.node, large)
    assert [r.category for r in chunk.results] == ["success"] * 4
    assert ahead == [False] * 4


def test_a_hundred_thousand_c_stores_eight_in_flight_lose_no_response(tmp_path: Path) -> None:
    """10^5 C-STOREs of tiny files, eight outstanding, into the asyncio SCP: every request
    stored once, every one answered with success, no data set mixed up."""
    from pacsflow_uploader.files import identify

    count = 100_000
    paths = write_ct_series(tmp_path / "series", 100, rows=8, columns=8)
    files = [identify(FileJob(i, str(p))) for i, p in enumerate(paths)]
    handler = RecordingHandler()
    server = make_server(handler).start()
    node = Node(ae_title="ENGINE", host="127.0.0.1", port=server.port, operations_window=8)
    session = LeanStoreSession(node, OPTIONS, [files[0].presentation])
    successes = answered = 0
    try:
        session.open()
        assert session.operations_window == 8
        for start in range(0, count, 1000):
            results = session.send_many([files[i % len(files)] for i in range(start, start + 1000)])
            answered += len(results)
            successes += sum(r.category == "success" for r in results)
        session.close()
    finally:
        server.stop(grace=1)
        server.listener.close()
    assert (answered, successes, handler.stores) == (count, count, count)
    assert sorted(handler.stored.values()) == sorted(digest_of_data_set(p) for p in paths)
