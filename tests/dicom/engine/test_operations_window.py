"""The asyncio SCP with several requests outstanding (asynchronous operations, PS3.7 D.3.3.3).

A requestor that proposes a window gets at most the SCP's own limit (0 proposes no limit);
at a limit of 1 the proposal is not answered. Requests written back to back, before any
answer, are all stored and answered in order, also while a handler awaits (reading pauses
with the next requests already in the buffer).
"""

from __future__ import annotations

import hashlib
import random
import socket

import pytest

from pacsflow.dicom.engine import AsyncStoreServer, pdu
from pacsflow.dicom.engine.dimse import parse_response
from pacsflow.dicom.files import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from tests.dicom.engine.conftest import RecordingHandler, make_server
from tests.dicom.engine.test_framing import (
    CT_IMAGE_STORAGE,
    EXPLICIT_LE,
    _AwaitingHandler,
    _read_pdu,
    message_bytes,
)

MAX_PDU = 262144


def associate(port: int, window: int) -> tuple[socket.socket, pdu.AssociateAccept]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(pdu.associate_rq(
        "ENGINE", "WINDOW", [pdu.OfferedContext(1, CT_IMAGE_STORAGE, EXPLICIT_LE)], 0,
        IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, window,
    ))  # fmt: skip
    kind, body = _read_pdu(sock)
    assert kind == pdu.A_ASSOCIATE_AC, kind
    return sock, pdu.parse_associate_ac(body)


def _raw_request_window(window: int) -> bytes:
    # pdu.associate_rq leaves the item out at 1; 0 (no limit) is sent as it is.
    return pdu.associate_rq("ENGINE", "WINDOW", [pdu.OfferedContext(1, CT_IMAGE_STORAGE,
                            EXPLICIT_LE)], 0, IMPLEMENTATION_CLASS_UID,
                            IMPLEMENTATION_VERSION_NAME, window)  # fmt: skip


@pytest.mark.parametrize(
    ("limit", "proposed", "granted"), [(16, 8, 8), (4, 8, 4), (1, 8, 1), (16, 1, 1)]
)
def test_the_window_granted_is_the_smaller_of_the_two(
    servers: list[AsyncStoreServer], limit: int, proposed: int, granted: int
) -> None:
    server = make_server(RecordingHandler(), operations_window=limit).start()
    servers.append(server)
    sock, accept = associate(server.port, proposed)
    with sock:
        assert accept.operations_window == granted
        sock.sendall(pdu.release_pdu())
        assert _read_pdu(sock)[0] == pdu.A_RELEASE_RP


def test_a_proposal_of_no_limit_gets_the_scp_limit(servers: list[AsyncStoreServer]) -> None:
    server = make_server(RecordingHandler(), operations_window=6).start()
    servers.append(server)
    raw = bytearray(_raw_request_window(2))
    # The item's first field (invoked) set to 0: no limit proposed.
    at = raw.index(bytes((0x53, 0, 0, 4)))
    raw[at + 4 : at + 6] = b"\x00\x00"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(raw)
        kind, body = _read_pdu(sock)
        assert kind == pdu.A_ASSOCIATE_AC
        assert pdu.parse_associate_ac(body).operations_window == 6


@pytest.mark.parametrize("handler_kind", ["plain", "awaiting"])
def test_requests_written_back_to_back_are_all_stored_and_answered_in_order(
    servers: list[AsyncStoreServer], handler_kind: str
) -> None:
    handler = _AwaitingHandler() if handler_kind == "awaiting" else RecordingHandler()
    server = make_server(handler, operations_window=16).start()
    servers.append(server)
    rng = random.Random(7)
    sent: dict[str, str] = {}
    requests = []
    for index in range(16):
        data = rng.randbytes(rng.choice((rng.randint(0, 12_000), rng.randint(30_000, 300_000)))
                             & ~1)  # fmt: skip
        uid = f"1.2.826.0.1.3680043.9.77.{index + 1}"
        sent[uid] = hashlib.sha256(data).hexdigest()
        requests.append(message_bytes(rng, 1, index + 1, uid, data, MAX_PDU))
    sock, accept = associate(server.port, 16)
    with sock:
        assert accept.operations_window == 16
        # Every request before reading any answer.
        sock.sendall(b"".join(requests))
        answered = []
        for _ in range(16):
            kind, body = _read_pdu(sock)
            assert kind == pdu.P_DATA_TF
            response = parse_response(body[6:])
            assert response.status == 0
            answered.append(response.message_id_responded)
        sock.sendall(pdu.release_pdu())
        assert _read_pdu(sock)[0] == pdu.A_RELEASE_RP
    assert answered == list(range(1, 17))
    assert handler.stored == sent
