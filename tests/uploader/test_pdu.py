"""The uploader's wire format, checked against pynetdicom's and pydicom's own decoders."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pacsflow_uploader import pdu
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pynetdicom.pdu import A_ASSOCIATE_RQ

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"
JPEG = "1.2.840.10008.1.2.4.50"


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _ac_body(contexts: list[tuple[int, int, str]], max_pdu: int) -> bytes:
    """An A-ASSOCIATE-AC body written out by hand from PS3.8 9.3.3."""
    fixed = struct.pack(">HH", 1, 0) + b"STORESCP".ljust(16) + b"PFTEST".ljust(16) + bytes(32)
    items = _item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, result, syntax in contexts:
        items += _item(0x21, bytes((context_id, 0, result, 0)) + _item(0x40, syntax.encode()))
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3")
    return fixed + items + _item(0x50, user)


class TestAssociation:
    def test_request_decodes_in_pynetdicom(self) -> None:
        contexts = [pdu.ProposedContext(1, CT, EXPLICIT), pdu.ProposedContext(3, MR, JPEG)]
        raw = pdu.associate_rq("STORESCP", "PFTEST", contexts, 262144, "1.2.3.4", "PF_1")
        decoded = A_ASSOCIATE_RQ()
        decoded.decode(raw)
        assert decoded.called_ae_title == "STORESCP"
        assert decoded.calling_ae_title == "PFTEST"
        assert decoded.application_context_name == "1.2.840.10008.3.1.1.1"
        proposed = {
            item.context_id: (item.abstract_syntax, list(item.transfer_syntax))
            for item in decoded.presentation_context
        }
        assert proposed == {1: (CT, [EXPLICIT]), 3: (MR, [JPEG])}
        assert decoded.user_information.maximum_length == 262144
        assert decoded.user_information.implementation_class_uid == "1.2.3.4"
        assert decoded.user_information.implementation_version_name == "PF_1"

    def test_accept_lists_accepted_and_refused_contexts_and_the_peer_pdu(self) -> None:
        body = _ac_body([(1, 0, EXPLICIT), (3, 3, EXPLICIT), (5, 4, "")], 16384)
        accept = pdu.parse_associate_ac(body)
        assert accept.accepted == {1: EXPLICIT}
        assert accept.refused == {3: 3, 5: 4}
        assert accept.max_pdu == 16384

    def test_reject_is_put_in_words(self) -> None:
        reject = pdu.parse_associate_rj(bytes((0, 1, 1, 7)))
        assert pdu.reject_text(reject) == "rejected (permanent): called AE title not recognised"

    def test_truncated_item_is_an_error(self) -> None:
        body = _ac_body([(1, 0, EXPLICIT)], 16384)
        with pytest.raises(ValueError):
            pdu.parse_associate_ac(body[:-3])


class TestCStore:
    def test_request_command_set_decodes_in_pydicom(self) -> None:
        raw = pdu.c_store_rq(7, CT, "1.2.3.45")  # odd length: padded with NUL
        command = read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
        assert command.CommandGroupLength == len(raw) - 12
        assert command.CommandField == 0x0001
        assert command.MessageID == 7
        assert command.AffectedSOPClassUID == CT
        assert command.AffectedSOPInstanceUID == "1.2.3.45"
        assert command.Priority == 0
        assert command.CommandDataSetType != 0x0101

    def test_response_written_by_pydicom_is_read(self) -> None:
        response = Dataset()
        response.CommandGroupLength = 0
        response.AffectedSOPClassUID = CT
        response.CommandField = 0x8001
        response.MessageIDBeingRespondedTo = 7
        response.CommandDataSetType = 0x0101
        response.Status = 0xB007
        response.ErrorComment = "coerced"
        buffer = DicomBytesIO()
        buffer.is_implicit_VR, buffer.is_little_endian = True, True
        write_dataset(buffer, response)
        parsed = pdu.parse_command(buffer.getvalue())
        assert parsed == pdu.StoreResponse(0x8001, 7, 0xB007, "coerced")

    @pytest.mark.parametrize("size", [0, 1, 1017, 1018, 1019, 5000])
    def test_data_set_is_cut_into_pdus_the_peer_accepts(self, size: int) -> None:
        data = bytes(range(256)) * (size // 256 + 1)
        data = data[:size]
        command = pdu.c_store_rq(1, CT, "1.2.3")
        buffers = pdu.data_pdus(5, command, memoryview(data), max_pdu=1024)
        stream = b"".join(bytes(b) for b in buffers)
        fragments, controls = [], []
        offset = 0
        while offset < len(stream):
            pdu_type, _, length = struct.unpack_from(">BBI", stream, offset)
            assert pdu_type == pdu.P_DATA_TF
            assert length <= 1024
            body = stream[offset + 6 : offset + 6 + length]
            for context_id, control, fragment in pdu.pdv_items(body):
                assert context_id == 5
                controls.append(control)
                fragments.append(bytes(fragment))
            offset += 6 + length
        assert controls[0] == 0x03 and fragments[0] == command
        assert [c & 0x01 for c in controls[1:]] == [0] * (len(controls) - 1)
        assert [c & 0x02 for c in controls[1:]] == [0] * (len(controls) - 2) + [0x02]
        assert all(len(f) % 2 == 0 for f in fragments[1:])
        # An odd data set (only a deflated one can be) gets one trailing NUL (PS3.5 A.5).
        assert b"".join(fragments[1:]) == data + b"\x00" * (size % 2)
