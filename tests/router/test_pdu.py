"""The router's wire formats against pynetdicom's and pydicom's encoders and decoders."""

from __future__ import annotations

from io import BytesIO

import pytest
from pacsflow_router.scp import dimse, pdu
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def _request() -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = pdu.APPLICATION_CONTEXT
    primitive.calling_ae_title = "MODALITY"
    primitive.called_ae_title = "MRI"
    contexts = [build_context(CT, [EXPLICIT, IMPLICIT]), build_context("1.2.840.10008.1.1")]
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    primitive.presentation_context_definition_list = contexts
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CT
    role.scu_role = True
    role.scp_role = False
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 32768
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3.4"
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "PEER_1"
    primitive.user_information = [maximum, implementation, version, role]
    request = A_ASSOCIATE_RQ()
    request.from_primitive(primitive)
    return bytes(request.encode())


class TestAssociation:
    def test_a_request_from_pynetdicom_is_read(self) -> None:
        request = pdu.parse_associate_rq(_request()[6:])
        assert (request.calling_ae, request.called_ae) == ("MODALITY", "MRI")
        assert request.application_context == pdu.APPLICATION_CONTEXT
        assert request.max_pdu == 32768
        assert request.implementation_class_uid == "1.2.3.4"
        assert request.implementation_version == "PEER_1"
        assert request.roles == {CT: (1, 0)}
        assert [(c.context_id, c.abstract_syntax) for c in request.contexts] == [
            (1, CT),
            (3, "1.2.840.10008.1.1"),
        ]
        assert request.contexts[0].transfer_syntaxes == (EXPLICIT, IMPLICIT)

    def test_the_answer_is_read_by_pynetdicom(self) -> None:
        request = pdu.parse_associate_rq(_request()[6:])
        encoded = pdu.associate_ac(
            request,
            [pdu.AcceptedContext(1, 0, EXPLICIT), pdu.AcceptedContext(3, 3, IMPLICIT)],
            max_pdu=262144,
            implementation_class_uid="1.2.826.0.1",
            implementation_version="PACSFLOW_010",
        )
        answer = A_ASSOCIATE_AC()
        answer.decode(encoded)
        primitive = answer.to_primitive()
        assert primitive.called_ae_title == "MRI"
        results = {
            c.context_id: (c.result, c.transfer_syntax)
            for c in primitive.presentation_context_definition_results_list
        }
        assert results[1] == (0, [EXPLICIT])
        assert results[3][0] == 3
        user = {type(item).__name__: item for item in primitive.user_information}
        assert user["MaximumLengthNotification"].maximum_length_received == 262144
        assert user["ImplementationClassUIDNotification"].implementation_class_uid == "1.2.826.0.1"
        role = user["SCP_SCU_RoleSelectionNegotiation"]
        assert (role.sop_class_uid, role.scu_role, role.scp_role) == (CT, True, False)

    def test_a_request_shorter_than_its_fixed_fields_is_a_protocol_error(self) -> None:
        with pytest.raises(pdu.PduError):
            pdu.parse_associate_rq(_request()[6:40])

    def test_an_item_running_past_its_pdu_is_a_protocol_error(self) -> None:
        body = bytearray(_request()[6:])
        body[70:72] = (0xFFFF).to_bytes(2, "big")  # the application context item's length
        with pytest.raises(pdu.PduError):
            pdu.parse_associate_rq(bytes(body))


class TestData:
    def test_pdvs_are_split(self) -> None:
        data = (
            pdu.p_data(1, b"abc", command=True)[6:]
            + pdu.p_data(1, b"de", command=False, last=False)[6:]
        )
        found = [(c, h, bytes(f)) for c, h, f in pdu.pdvs(memoryview(data))]
        assert found == [(1, 3, b"abc"), (1, 0, b"de")]

    def test_a_pdv_longer_than_its_pdu_is_a_protocol_error(self) -> None:
        data = bytearray(pdu.p_data(1, b"abc", command=True)[6:])
        data[0:4] = (100).to_bytes(4, "big")
        with pytest.raises(pdu.PduError):
            pdu.pdvs(memoryview(bytes(data)))


def _command_bytes(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = True
    write_dataset(buffer, ds)
    return bytes(buffer.getvalue())


class TestDimse:
    def test_a_c_store_request_is_read(self) -> None:
        ds = Dataset()
        ds.CommandGroupLength = 0  # value not checked
        ds.AffectedSOPClassUID = CT
        ds.CommandField = 0x0001
        ds.MessageID = 7
        ds.Priority = 0
        ds.CommandDataSetType = 0x0000
        ds.AffectedSOPInstanceUID = "1.2.3.4.5"
        ds.MoveOriginatorApplicationEntityTitle = "ORTHANC"
        command = dimse.parse_command(_command_bytes(ds))
        assert command == dimse.Command(1, 7, True, CT, "1.2.3.4.5", "ORTHANC")

    def test_the_response_is_read_by_pydicom(self) -> None:
        command = dimse.Command(1, 9, True, CT, "1.2.3.4.5")
        encoded = dimse.encode_response(command, 0xA700)
        ds = read_dataset(BytesIO(encoded), is_implicit_VR=True, is_little_endian=True)
        assert ds.CommandField == 0x8001
        assert ds.MessageIDBeingRespondedTo == 9
        assert ds.Status == 0xA700
        assert ds.AffectedSOPInstanceUID == "1.2.3.4.5"
        assert ds.CommandDataSetType == 0x0101
        assert ds.CommandGroupLength == len(encoded) - 12

    def test_a_damaged_command_is_a_protocol_error(self) -> None:
        with pytest.raises(pdu.PduError):
            dimse.parse_command(b"\x00\x00\x00\x01\xff\xff\xff\x00")
