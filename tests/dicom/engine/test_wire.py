"""The engine's parsers on random bytes raise PduError only, and round-trip what they encode."""

from __future__ import annotations

import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacsflow.dicom.engine import AsyncStoreServer, acse, pdu
from pacsflow.dicom.engine.dimse import (
    Command,
    c_store_rq,
    encode_response,
    parse_request,
    parse_response,
)
from tests.dicom.engine.conftest import RecordingHandler

CT = "1.2.840.10008.5.1.4.1.1.2"

FUZZ = settings(max_examples=300, deadline=None)


@FUZZ
@given(st.binary(max_size=400))
def test_pdvs_raise_pdu_error_only(data: bytes) -> None:
    try:
        for _context, _control, fragment in pdu.pdvs(memoryview(data)):
            assert len(fragment) <= len(data)
    except pdu.PduError:
        pass


@FUZZ
@given(st.binary(max_size=400))
def test_association_pdus_raise_pdu_error_only(data: bytes) -> None:
    for parse in (pdu.parse_associate_rq, pdu.parse_associate_ac, pdu.parse_associate_rj):
        try:
            parse(data)
        except pdu.PduError:
            pass
    try:
        acse.read_request(pdu.PDU_HEADER.pack(pdu.A_ASSOCIATE_RQ, 0, len(data)) + data)
    except pdu.PduError:
        pass


@FUZZ
@given(st.binary(max_size=200))
def test_command_sets_raise_pdu_error_only(data: bytes) -> None:
    for parse in (parse_request, parse_response):
        try:
            parse(data)
        except pdu.PduError:
            pass


@FUZZ
@given(
    message_id=st.integers(1, 0xFFFF),
    status=st.integers(0, 0xFFFF),
    instance=st.from_regex(r"[1-9][0-9]{0,20}(\.[1-9][0-9]{0,10}){1,5}", fullmatch=True),
)
def test_command_sets_round_trip(message_id: int, status: int, instance: str) -> None:
    request = parse_request(c_store_rq(message_id, CT, instance))
    assert request == Command(1, message_id, True, CT, instance)
    response = parse_response(encode_response(request, status))
    assert (response.command_field, response.message_id_responded, response.status) == (
        0x8001,
        message_id,
        status,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=300))
def test_the_scp_aborts_garbage_and_goes_on(
    engine_scp: AsyncStoreServer, handler: RecordingHandler, garbage: bytes
) -> None:
    """Random bytes after a valid association end it (abort or close), never the server."""
    proposal = acse.propose(
        called_ae="ENGINE", calling_ae="FUZZ",
        presentations=[(CT, ["1.2.840.10008.1.2.1"])],
        max_pdu=16384, implementation_class_uid="1.2.3.4", implementation_version="FUZZ",
    )  # fmt: skip
    with socket.create_connection(("127.0.0.1", engine_scp.port), timeout=10) as sock:
        sock.sendall(proposal.pdu)
        header = sock.recv(6, socket.MSG_WAITALL)
        assert header[0] == pdu.A_ASSOCIATE_AC
        sock.recv(int.from_bytes(header[2:6], "big"), socket.MSG_WAITALL)
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass  # the SCP answers (abort, response) or not, then closes
    # The server still serves.
    with socket.create_connection(("127.0.0.1", engine_scp.port), timeout=10) as sock:
        sock.sendall(proposal.pdu)
        assert sock.recv(1)[0] == pdu.A_ASSOCIATE_AC
        sock.sendall(pdu.release_pdu())
    assert engine_scp.active <= 2


def test_round_trip_of_a_data_set_in_pdus() -> None:
    data = bytes(range(256)) * 40 + b"\x01"  # odd: padded
    buffers = pdu.data_pdus(3, c_store_rq(1, CT, "1.2.3"), memoryview(data), max_pdu=4101)
    stream = b"".join(bytes(b) for b in buffers)
    fragments = []
    offset = 0
    while offset < len(stream):
        kind, _, length = pdu.PDU_HEADER.unpack_from(stream, offset)
        assert kind == pdu.P_DATA_TF and length <= 4101
        fragments += [bytes(f) for _c, h, f in pdu.pdvs(memoryview(stream)[offset + 6 : offset + 6 + length]) if not h & 1]
        offset += 6 + length
    assert b"".join(fragments) == data + b"\x00"
