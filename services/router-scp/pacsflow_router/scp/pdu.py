"""Upper layer PDUs (PS3.8 9.3): parsing the association request, encoding the answers.

Pure functions on bytes, so each one is tested without a socket. Only what an acceptor
needs is here: it reads A-ASSOCIATE-RQ, P-DATA-TF, A-RELEASE-RQ and A-ABORT, and writes
A-ASSOCIATE-AC/RJ, P-DATA-TF, A-RELEASE-RP and A-ABORT.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pacsflow.errors import DicomError

__all__ = [
    "APPLICATION_CONTEXT",
    "A_ABORT",
    "A_ASSOCIATE_AC",
    "A_ASSOCIATE_RJ",
    "A_ASSOCIATE_RQ",
    "A_RELEASE_RP",
    "A_RELEASE_RQ",
    "P_DATA_TF",
    "AcceptedContext",
    "AssociateRequest",
    "PduError",
    "ProposedContext",
    "abort",
    "associate_ac",
    "associate_rj",
    "p_data",
    "parse_associate_rq",
    "pdvs",
    "release_rp",
]

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

#: the DICOM application context name (PS3.7 A.2.1)
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# Presentation context results (PS3.8 Table 9-18).
ACCEPTANCE = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4

_HEADER = struct.Struct(">BBI")
_ITEM = struct.Struct(">BBH")


class PduError(DicomError):
    """A PDU that breaks PS3.8; the association is aborted with ``reason`` (Table 9-26)."""

    def __init__(self, message: str, reason: int = 6) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class ProposedContext:
    """One presentation context of the request: its id, abstract syntax, transfer syntaxes."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AcceptedContext:
    """The answer to one proposed context: ``result`` 0 accepts ``transfer_syntax``."""

    context_id: int
    result: int
    transfer_syntax: str


@dataclass(slots=True)
class AssociateRequest:
    """What an A-ASSOCIATE-RQ asks for (PS3.8 9.3.2, PS3.7 Annex D.3.3)."""

    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str = ""
    contexts: list[ProposedContext] = field(default_factory=list)
    #: the largest P-DATA-TF the requestor accepts (0: no limit)
    max_pdu: int = 0
    implementation_class_uid: str = ""
    implementation_version: str = ""
    #: SOP class UID -> (SCU role, SCP role) the requestor proposes (PS3.7 D.3.3.4)
    roles: dict[str, tuple[int, int]] = field(default_factory=dict)


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", errors="replace").strip()


def _items(body: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(type, value start, value end) of each item between ``start`` and ``end``."""
    found = []
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise PduError("an item header runs past the end of its PDU")
        item_type, _reserved, length = _ITEM.unpack_from(body, pos)
        value_end = pos + 4 + length
        if value_end > end:
            raise PduError(f"item 0x{item_type:02X} runs past the end of its PDU")
        found.append((item_type, pos + 4, value_end))
        pos = value_end
    return found


def parse_associate_rq(body: bytes) -> AssociateRequest:
    """Parse the variable part of an A-ASSOCIATE-RQ (everything after the 6-byte header)."""
    if len(body) < 68:
        raise PduError("the A-ASSOCIATE-RQ is shorter than its fixed fields")
    version = struct.unpack_from(">H", body, 0)[0]
    request = AssociateRequest(
        protocol_version=version,
        called_ae=body[4:20].decode("ascii", errors="replace").strip(" \x00"),
        calling_ae=body[20:36].decode("ascii", errors="replace").strip(" \x00"),
    )
    for item_type, start, end in _items(body, 68, len(body)):
        if item_type == 0x10:
            request.application_context = _uid(body[start:end])
        elif item_type == 0x20:
            request.contexts.append(_proposed_context(body, start, end))
        elif item_type == 0x50:
            _user_information(request, body, start, end)
        # Unknown items are ignored (PS3.8 9.3.1: "shall be ignored").
    return request


def _proposed_context(body: bytes, start: int, end: int) -> ProposedContext:
    if end - start < 4:
        raise PduError("a presentation context item is too short")
    context_id = body[start]
    abstract = ""
    transfers: list[str] = []
    for sub_type, sub_start, sub_end in _items(body, start + 4, end):
        if sub_type == 0x30:
            abstract = _uid(body[sub_start:sub_end])
        elif sub_type == 0x40:
            transfers.append(_uid(body[sub_start:sub_end]))
    return ProposedContext(context_id, abstract, tuple(transfers))


def _user_information(request: AssociateRequest, body: bytes, start: int, end: int) -> None:
    for sub_type, sub_start, sub_end in _items(body, start, end):
        value = body[sub_start:sub_end]
        if sub_type == 0x51 and len(value) == 4:
            request.max_pdu = struct.unpack(">I", value)[0]
        elif sub_type == 0x52:
            request.implementation_class_uid = _uid(value)
        elif sub_type == 0x55:
            request.implementation_version = value.decode("ascii", errors="replace").strip()
        elif sub_type == 0x54 and len(value) >= 4:
            uid_length = struct.unpack_from(">H", value, 0)[0]
            if 2 + uid_length + 2 <= len(value):
                uid = _uid(value[2 : 2 + uid_length])
                request.roles[uid] = (value[2 + uid_length], value[3 + uid_length])
        # Asynchronous operations (0x53), extended negotiation (0x56, 0x57) and user identity
        # (0x58) get no answer: PS3.7 D.3.3.3 and D.3.3.7 let the acceptor ignore them.


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM.pack(item_type, 0, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return _HEADER.pack(pdu_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii", errors="replace")[:16].ljust(16, b" ")


def associate_ac(
    request: AssociateRequest,
    contexts: list[AcceptedContext],
    *,
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version: str,
) -> bytes:
    """The A-ASSOCIATE-AC answering ``request`` (PS3.8 9.3.3)."""
    parts = [
        struct.pack(">HH", 1, 0),
        # Called and calling AE titles are sent back as received (PS3.8 Table 9-17).
        _ae(request.called_ae),
        _ae(request.calling_ae),
        bytes(32),
        _item(0x10, APPLICATION_CONTEXT.encode("ascii")),
    ]
    for context in contexts:
        transfer = _item(0x40, context.transfer_syntax.encode("ascii"))
        parts.append(_item(0x21, bytes((context.context_id, 0, context.result, 0)) + transfer))
    user = [
        _item(0x51, struct.pack(">I", max_pdu)),
        _item(0x52, implementation_class_uid.encode("ascii")),
    ]
    for uid, (scu_role, _scp_role) in request.roles.items():
        # The requestor may stay SCU; we never take the SCU role ourselves.
        raw = uid.encode("ascii")
        user.append(_item(0x54, struct.pack(">H", len(raw)) + raw + bytes((scu_role, 0))))
    user.append(_item(0x55, implementation_version.encode("ascii")))
    parts.append(_item(0x50, b"".join(user)))
    return _pdu(A_ASSOCIATE_AC, b"".join(parts))


def associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    return _pdu(A_ASSOCIATE_RJ, bytes((0, result, source, reason)))


def abort(source: int = 2, reason: int = 0) -> bytes:
    """An A-ABORT; source 2 is the service provider, reasons as in PS3.8 Table 9-26."""
    return _pdu(A_ABORT, bytes((0, 0, source, reason)))


def release_rp() -> bytes:
    """The A-RELEASE-RP answering an A-RELEASE-RQ."""
    return _pdu(A_RELEASE_RP, bytes(4))


def p_data(context_id: int, payload: bytes, *, command: bool, last: bool = True) -> bytes:
    """A P-DATA-TF with one PDV (PS3.8 9.3.5, E.2)."""
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    pdv = struct.pack(">IBB", len(payload) + 2, context_id, header) + payload
    return _pdu(P_DATA_TF, pdv)


def pdvs(body: memoryview) -> list[tuple[int, int, memoryview]]:
    """(context id, message control header, fragment) of each PDV in a P-DATA-TF body."""
    found = []
    pos = 0
    size = len(body)
    while pos < size:
        if pos + 6 > size:
            raise PduError("a PDV header runs past the end of its P-DATA-TF")
        length = int.from_bytes(body[pos : pos + 4], "big")
        if length < 2 or pos + 4 + length > size:
            raise PduError(f"a PDV of length {length} does not fit its P-DATA-TF")
        found.append((body[pos + 4], body[pos + 5], body[pos + 6 : pos + 4 + length]))
        pos += 4 + length
    return found
