"""DIMSE command sets (PS3.7 9.3, E.1) for C-STORE and C-ECHO, both roles.

A command set is group 0000 in implicit VR little endian. Requests are read into
:class:`Command`, responses into :class:`StoreResponse`; both come from one element walk
(:func:`command_elements`). What is sent per message is pre-encoded: the elements that do
not change within an association (SOP class, command field, data set type) are cached as
bytes, so a C-STORE-RQ or -RSP costs a dictionary lookup and a few ``struct`` packs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

from pacsflow.dicom.engine.pdu import PduError

__all__ = [
    "C_CANCEL_RQ",
    "C_ECHO_RQ",
    "C_ECHO_RSP",
    "C_STORE_RQ",
    "C_STORE_RSP",
    "NO_DATA_SET",
    "Command",
    "StoreResponse",
    "c_echo_rq",
    "c_store_rq",
    "command_elements",
    "encode_response",
    "parse_request",
    "parse_response",
    "store_response",
]

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF
#: Command Data Set Type when no data set follows (PS3.7 E.1-1)
NO_DATA_SET = 0x0101
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_RESPONDED = 0x0120
_PRIORITY = 0x0700
_DATA_SET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE = 0x1000
_MOVE_ORIGINATOR_AE = 0x1030

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")
# An element header and a US value in one pack: group 0, element, length 2, value.
_US_ELEMENT = struct.Struct("<HHIH")


@dataclass(frozen=True, slots=True)
class Command:
    """The fields of a request an SCP acts on."""

    command_field: int
    message_id: int
    has_data_set: bool
    affected_sop_class_uid: str = ""
    affected_sop_instance_uid: str = ""
    move_originator_ae: str = ""


@dataclass(frozen=True, slots=True)
class StoreResponse:
    """The fields of a C-STORE-RSP (or C-ECHO-RSP) an SCU looks at."""

    command_field: int
    message_id_responded: int | None
    status: int | None
    error_comment: str | None


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", errors="replace").strip()


def command_elements(data: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """Element number -> value of an encoded command set; PduError when it is not one."""
    fields: dict[int, bytes] = {}
    pos = 0
    size = len(data)
    while pos + 8 <= size:
        group, element, length = _ELEMENT.unpack_from(data, pos)
        end = pos + 8 + length
        if group != 0x0000 or end > size:
            raise PduError("damaged command set", reason=0)
        fields[element] = bytes(data[pos + 8 : end])
        pos = end
    if pos != size:
        raise PduError("damaged command set: trailing bytes", reason=0)
    return fields


def _us(fields: dict[int, bytes], element: int) -> int | None:
    raw = fields.get(element)
    return _US.unpack_from(raw)[0] if raw is not None and len(raw) >= 2 else None


def parse_request(data: bytes | bytearray | memoryview) -> Command:
    """Read a request command set; PduError when it is damaged or has no Command Field."""
    fields = command_elements(data)
    command_field = _us(fields, _COMMAND_FIELD)
    if command_field is None:
        raise PduError("damaged command set: no Command Field", reason=0)
    message_id = _us(fields, _MESSAGE_ID)
    data_set_type = _us(fields, _DATA_SET_TYPE)
    return Command(
        command_field=command_field,
        message_id=0 if message_id is None else message_id,
        has_data_set=(NO_DATA_SET if data_set_type is None else data_set_type) != NO_DATA_SET,
        affected_sop_class_uid=_text(fields.get(_AFFECTED_SOP_CLASS, b"")),
        affected_sop_instance_uid=_text(fields.get(_AFFECTED_SOP_INSTANCE, b"")),
        move_originator_ae=_text(fields.get(_MOVE_ORIGINATOR_AE, b"")),
    )


def parse_response(data: bytes | bytearray | memoryview) -> StoreResponse:
    """Read a response command set; PduError when it is damaged or has no Command Field."""
    fields = command_elements(data)
    command_field = _us(fields, _COMMAND_FIELD)
    if command_field is None:
        raise PduError("command set without a Command Field", reason=0)
    comment = fields.get(_ERROR_COMMENT)
    return StoreResponse(
        command_field=command_field,
        message_id_responded=_us(fields, _MESSAGE_ID_RESPONDED),
        status=_us(fields, _STATUS),
        error_comment=comment.rstrip(b"\x00 ").decode("ascii", "replace") if comment else None,
    )


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii", errors="replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def _group(body: bytes) -> bytes:
    return _element(0x0000, struct.pack("<I", len(body))) + body


# --- requests ---------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _store_rq_head(sop_class_uid: str) -> bytes:
    return _element(_AFFECTED_SOP_CLASS, _uid_value(sop_class_uid)) + _US_ELEMENT.pack(
        0, _COMMAND_FIELD, 2, C_STORE_RQ
    )


_STORE_RQ_TAIL = _US_ELEMENT.pack(0, _PRIORITY, 2, 0) + _US_ELEMENT.pack(0, _DATA_SET_TYPE, 2, 1)


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The C-STORE-RQ command set (PS3.7 Table 9.3-1), priority medium, with a data set."""
    body = b"".join(
        (
            _store_rq_head(sop_class_uid),
            _US_ELEMENT.pack(0, _MESSAGE_ID, 2, message_id),
            _STORE_RQ_TAIL,
            _element(_AFFECTED_SOP_INSTANCE, _uid_value(sop_instance_uid)),
        )
    )
    return _group(body)


def c_echo_rq(message_id: int) -> bytes:
    """The C-ECHO-RQ command set (PS3.7 Table 9.3-12)."""
    return _group(
        _element(_AFFECTED_SOP_CLASS, _uid_value(VERIFICATION_SOP_CLASS))
        + _US_ELEMENT.pack(0, _COMMAND_FIELD, 2, C_ECHO_RQ)
        + _US_ELEMENT.pack(0, _MESSAGE_ID, 2, message_id)
        + _US_ELEMENT.pack(0, _DATA_SET_TYPE, 2, NO_DATA_SET)
    )


# --- responses --------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _response_head(sop_class_uid: str, command_field: int) -> bytes:
    return _element(_AFFECTED_SOP_CLASS, _uid_value(sop_class_uid)) + _US_ELEMENT.pack(
        0, _COMMAND_FIELD, 2, command_field | 0x8000
    )


_NO_DATA_SET_ELEMENT = _US_ELEMENT.pack(0, _DATA_SET_TYPE, 2, NO_DATA_SET)


def store_response(
    sop_class_uid: str, command_field: int, message_id: int, status: int, sop_instance_uid: str
) -> bytes:
    """A response command set (field with bit 15 set) from the cached per-class prefix."""
    parts = [
        _response_head(sop_class_uid, command_field),
        _US_ELEMENT.pack(0, _MESSAGE_ID_RESPONDED, 2, message_id),
        _NO_DATA_SET_ELEMENT,
        _US_ELEMENT.pack(0, _STATUS, 2, status),
    ]
    if sop_instance_uid:
        parts.append(_element(_AFFECTED_SOP_INSTANCE, _uid_value(sop_instance_uid)))
    return _group(b"".join(parts))


def encode_response(command: Command, status: int) -> bytes:
    """The response command set to ``command`` with ``status``."""
    return store_response(
        command.affected_sop_class_uid,
        command.command_field,
        command.message_id,
        status,
        command.affected_sop_instance_uid,
    )
