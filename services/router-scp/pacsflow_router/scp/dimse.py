"""DIMSE command sets (PS3.7 9.3, E.1): reading requests, writing C-STORE and C-ECHO responses.

A command set is group 0000 in implicit VR little endian. The router reads the few fields a
C-STORE-RQ or C-ECHO-RQ carries and answers with a response of five or six elements.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pacsflow_router.scp.pdu import PduError

__all__ = [
    "C_CANCEL_RQ",
    "C_ECHO_RQ",
    "C_STORE_RQ",
    "NO_DATA_SET",
    "Command",
    "encode_response",
    "parse_command",
]

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
#: Command Data Set Type when no data set follows (PS3.7 E.1-1)
NO_DATA_SET = 0x0101

_AFFECTED_SOP_CLASS = 0x00000002
_COMMAND_FIELD = 0x00000100
_MESSAGE_ID = 0x00000110
_DATA_SET_TYPE = 0x00000800
_AFFECTED_SOP_INSTANCE = 0x00001000
_MOVE_ORIGINATOR_AE = 0x00001030

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")


@dataclass(frozen=True, slots=True)
class Command:
    """The fields of a request the router acts on."""

    command_field: int
    message_id: int
    has_data_set: bool
    affected_sop_class_uid: str = ""
    affected_sop_instance_uid: str = ""
    move_originator_ae: str = ""


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", errors="replace").strip()


def parse_command(data: bytes) -> Command:
    """Parse an encoded command set; PduError when it is not one."""
    fields: dict[int, bytes] = {}
    pos = 0
    size = len(data)
    while pos + 8 <= size:
        group, element, length = _ELEMENT.unpack_from(data, pos)
        end = pos + 8 + length
        if group != 0x0000 or end > size:
            raise PduError("damaged command set", reason=0)
        fields[element] = data[pos + 8 : end]
        pos = end
    if pos != size:
        raise PduError("damaged command set: trailing bytes", reason=0)
    try:
        command_field = _US.unpack(fields[_COMMAND_FIELD & 0xFFFF])[0]
        message_id = _US.unpack(fields.get(_MESSAGE_ID & 0xFFFF, b"\x00\x00"))[0]
        data_set_type = _US.unpack(fields.get(_DATA_SET_TYPE & 0xFFFF, b"\x01\x01"))[0]
    except (KeyError, struct.error) as err:
        raise PduError(f"damaged command set: {err}", reason=0) from err
    return Command(
        command_field=command_field,
        message_id=message_id,
        has_data_set=data_set_type != NO_DATA_SET,
        affected_sop_class_uid=_text(fields.get(_AFFECTED_SOP_CLASS & 0xFFFF, b"")),
        affected_sop_instance_uid=_text(fields.get(_AFFECTED_SOP_INSTANCE & 0xFFFF, b"")),
        move_originator_ae=_text(fields.get(_MOVE_ORIGINATOR_AE & 0xFFFF, b"")),
    )


def _element(tag: int, value: bytes) -> bytes:
    return _ELEMENT.pack(tag >> 16, tag & 0xFFFF, len(value)) + value


def _uid(uid: str) -> bytes:
    raw = uid.encode("ascii", errors="replace")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_response(command: Command, status: int) -> bytes:
    """The response command set to ``command`` (its field with bit 15 set) with ``status``."""
    body = [
        _element(_AFFECTED_SOP_CLASS, _uid(command.affected_sop_class_uid)),
        _element(_COMMAND_FIELD, _US.pack(command.command_field | 0x8000)),
        _element(0x00000120, _US.pack(command.message_id)),
        _element(_DATA_SET_TYPE, _US.pack(NO_DATA_SET)),
        _element(0x00000900, _US.pack(status)),
    ]
    if command.affected_sop_instance_uid:
        body.append(_element(_AFFECTED_SOP_INSTANCE, _uid(command.affected_sop_instance_uid)))
    encoded = b"".join(body)
    return _element(0x00000000, struct.pack("<I", len(encoded))) + encoded
