"""The wire format the uploader's C-STORE path speaks: Upper Layer PDUs and command sets.

Only what a Storage SCU needs (PS3.8 Section 9.3, PS3.7 Section 9.3.1 and Annex E):
A-ASSOCIATE-RQ out, A-ASSOCIATE-AC/RJ in, P-DATA-TF both ways, A-RELEASE-RQ/RP and A-ABORT,
and the C-STORE-RQ / C-STORE-RSP command sets (always Implicit VR Little Endian, PS3.7 6.3.1).
Everything is plain bytes and ``struct``; nothing here touches a socket.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

__all__ = [
    "A_ABORT",
    "A_ASSOCIATE_AC",
    "A_ASSOCIATE_RJ",
    "A_ASSOCIATE_RQ",
    "A_RELEASE_RP",
    "A_RELEASE_RQ",
    "P_DATA_TF",
    "AssociateAccept",
    "AssociateReject",
    "ProposedContext",
    "StoreResponse",
    "abort_pdu",
    "associate_rq",
    "c_store_rq",
    "data_pdus",
    "is_command",
    "is_last",
    "parse_associate_ac",
    "parse_associate_rj",
    "parse_command",
    "pdv_items",
    "reject_text",
    "release_pdu",
]

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

#: the DICOM Application Context Name (PS3.7 A.2.1)
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

_HEADER = struct.Struct(">BBI")
_ITEM = struct.Struct(">BBH")
_PDV = struct.Struct(">BBIIBB")  # PDU header + PDV item length, context ID, control header
_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")

# Message control header bits (PS3.8 E.2).
_COMMAND = 0x01
_LAST = 0x02

# C-STORE command fields (PS3.7 9.3.1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101


@dataclass(frozen=True, slots=True)
class ProposedContext:
    """One presentation context to propose: an odd ID, an abstract syntax, one syntax."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class AssociateAccept:
    """What an A-ASSOCIATE-AC said: accepted contexts (ID -> syntax) and the peer's max PDU."""

    accepted: dict[int, str]
    #: 0: the peer set no limit (PS3.8 D.1.1)
    max_pdu: int
    #: context ID -> result/reason code for those not accepted (PS3.8 9.3.3.2)
    refused: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AssociateReject:
    """An A-ASSOCIATE-RJ: result (1 permanent, 2 transient), source and reason (PS3.8 9.3.4)."""

    result: int
    source: int
    reason: int


@dataclass(frozen=True, slots=True)
class StoreResponse:
    """The fields of a C-STORE-RSP the sender looks at."""

    command_field: int
    message_id_responded: int | None
    status: int | None
    error_comment: str | None


def _item(item_type: int, body: bytes) -> bytes:
    return _ITEM.pack(item_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    # AE titles are 16 bytes, space padded (PS3.8 9.3.2).
    return title.encode("ascii").ljust(16, b" ")[:16]


def associate_rq(
    called_ae: str,
    calling_ae: str,
    contexts: Sequence[ProposedContext],
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version_name: str,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``contexts`` (PS3.8 9.3.2)."""
    variable = _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
    for context in contexts:
        body = (
            bytes((context.context_id, 0, 0, 0))
            + _item(0x30, context.abstract_syntax.encode("ascii"))
            + _item(0x40, context.transfer_syntax.encode("ascii"))
        )
        variable += _item(0x20, body)
    user = (
        _item(0x51, struct.pack(">I", max_pdu))
        + _item(0x52, implementation_class_uid.encode("ascii"))
        + _item(0x55, implementation_version_name.encode("ascii"))
    )
    variable += _item(0x50, user)
    fixed = struct.pack(">HH", 1, 0) + _ae(called_ae) + _ae(calling_ae) + bytes(32)
    body = fixed + variable
    return _HEADER.pack(A_ASSOCIATE_RQ, 0, len(body)) + body


def _items(data: bytes | memoryview, start: int) -> Iterator[tuple[int, memoryview]]:
    view = memoryview(data)
    offset = start
    while offset + 4 <= len(view):
        item_type, _reserved, length = _ITEM.unpack_from(view, offset)
        body = view[offset + 4 : offset + 4 + length]
        if len(body) < length:
            raise ValueError("an item runs past the end of its PDU")
        yield item_type, body
        offset += 4 + length


def _uid(raw: memoryview | bytes) -> str:
    return bytes(raw).rstrip(b"\x00 ").decode("ascii", errors="replace")


def parse_associate_ac(body: bytes) -> AssociateAccept:
    """Read an A-ASSOCIATE-AC PDU body (the bytes after its 6-byte header)."""
    accepted: dict[int, str] = {}
    refused: dict[int, int] = {}
    max_pdu = 0
    # Fixed fields: protocol version, reserved, two AE titles, 32 reserved bytes.
    for item_type, item in _items(body, 68):
        if item_type == 0x21:
            context_id, result = item[0], item[2]
            syntax = ""
            for sub_type, sub in _items(item, 4):
                if sub_type == 0x40:
                    syntax = _uid(sub)
            if result == 0 and syntax:
                accepted[context_id] = syntax
            else:
                refused[context_id] = result
        elif item_type == 0x50:
            for sub_type, sub in _items(item, 0):
                if sub_type == 0x51 and len(sub) >= 4:
                    max_pdu = struct.unpack_from(">I", sub)[0]
    return AssociateAccept(accepted, max_pdu, refused)


def parse_associate_rj(body: bytes) -> AssociateReject:
    """Read an A-ASSOCIATE-RJ PDU body."""
    if len(body) < 4:
        raise ValueError("A-ASSOCIATE-RJ is too short")
    return AssociateReject(body[1], body[2], body[3])


_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def reject_text(reject: AssociateReject) -> str:
    """A-ASSOCIATE-RJ in words, e.g. ``rejected (permanent): called AE title not recognised``."""
    kind = {1: "permanent", 2: "transient"}.get(reject.result, f"result {reject.result}")
    reason = _REJECT_REASONS.get((reject.source, reject.reason), f"reason {reject.reason}")
    return f"rejected ({kind}): {reason}"


def release_pdu(response: bool = False) -> bytes:
    """A-RELEASE-RQ (or -RP) PDU."""
    return _HEADER.pack(A_RELEASE_RP if response else A_RELEASE_RQ, 0, 4) + bytes(4)


def abort_pdu() -> bytes:
    """A-ABORT from the service user (source 0, PS3.8 9.3.8)."""
    return _HEADER.pack(A_ABORT, 0, 4) + bytes(4)


def _element(group_element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, group_element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The C-STORE-RQ command set (PS3.7 Table 9.3-1), priority medium, with a data set."""
    body = (
        _element(0x0002, _uid_value(sop_class_uid))
        + _element(0x0100, _US.pack(C_STORE_RQ))
        + _element(0x0110, _US.pack(message_id))
        + _element(0x0700, _US.pack(0))
        + _element(0x0800, _US.pack(0x0001))
        + _element(0x1000, _uid_value(sop_instance_uid))
    )
    return _element(0x0000, _UL.pack(len(body))) + body


def data_pdus(
    context_id: int,
    command: bytes,
    data: memoryview,
    max_pdu: int,
) -> list[bytes | memoryview]:
    """Buffers of the P-DATA-TF PDUs for one message, ready for one vectored write.

    The command goes in a PDU of its own, the data set in fragments that fit the peer's
    maximum PDU length (the length of a PDU's variable field, PS3.8 D.1.1); the data set is
    never copied, only sliced. Fragments are of even length (DCMTK aborts on odd ones); a
    deflated data set of odd length gets the trailing NUL of PS3.5 A.5.
    """
    buffers: list[bytes | memoryview] = [
        _PDV.pack(P_DATA_TF, 0, len(command) + 6, len(command) + 2, context_id, _COMMAND | _LAST),
        command,
    ]
    fragment = (max_pdu - 6) & ~1
    total = len(data)
    offset = 0
    while True:
        piece = data[offset : offset + fragment]
        offset += len(piece)
        last = offset >= total
        padding = b"\x00" if last and total % 2 else b""
        length = len(piece) + len(padding)
        buffers.append(
            _PDV.pack(P_DATA_TF, 0, length + 6, length + 2, context_id, _LAST if last else 0)
        )
        buffers.append(piece)
        if padding:
            buffers.append(padding)
        if last:
            return buffers


def pdv_items(body: bytes) -> Iterator[tuple[int, int, memoryview]]:
    """(context ID, message control header, fragment) of each PDV in a P-DATA-TF body."""
    view = memoryview(body)
    offset = 0
    while offset + 6 <= len(view):
        length = struct.unpack_from(">I", view, offset)[0]
        if length < 2 or offset + 4 + length > len(view):
            raise ValueError("a PDV item runs past the end of its PDU")
        yield view[offset + 4], view[offset + 5], view[offset + 6 : offset + 4 + length]
        offset += 4 + length


def is_command(control: int) -> bool:
    """True for a PDV that carries a command fragment."""
    return bool(control & _COMMAND)


def is_last(control: int) -> bool:
    """True for the last fragment of a command or data set."""
    return bool(control & _LAST)


def parse_command(data: bytes) -> StoreResponse:
    """The fields of a DIMSE command set the sender needs (Implicit VR Little Endian)."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        group, element, length = _ELEMENT.unpack_from(data, offset)
        offset += 8
        if group != 0x0000 or offset + length > len(data):
            raise ValueError("damaged command set")
        values[element] = data[offset : offset + length]
        offset += length

    def us(element: int) -> int | None:
        raw = values.get(element)
        return _US.unpack(raw[:2])[0] if raw is not None and len(raw) >= 2 else None

    command_field = us(0x0100)
    if command_field is None:
        raise ValueError("command set without a Command Field")
    comment = values.get(0x0902)
    return StoreResponse(
        command_field=command_field,
        message_id_responded=us(0x0120),
        status=us(0x0900),
        error_comment=comment.rstrip(b"\x00 ").decode("ascii", "replace") if comment else None,
    )
