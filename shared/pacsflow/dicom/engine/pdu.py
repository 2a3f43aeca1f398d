"""Upper layer PDUs (PS3.8 9.3): the one wire module every lean DICOM path uses.

Pure functions on bytes, so each is tested without a socket:

* both roles: P-DATA-TF (:func:`p_data`, :func:`data_pdus`, :func:`pdvs`), A-RELEASE-RQ/RP,
  A-ABORT, A-ASSOCIATE-RJ;
* acceptor: :func:`parse_associate_rq` and :func:`associate_ac` (the blocking router server);
* requestor: :func:`associate_rq`, :func:`parse_associate_ac`, :func:`parse_associate_rj`.

The asyncio engine negotiates associations with pynetdicom's PDU classes instead
(:mod:`.acse`); only P-DATA, release and abort are on its hot path, and they are here.
Every malformed input raises :class:`PduError`, whose ``reason`` is the A-ABORT reason.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pacsflow.errors import DicomError

__all__ = [
    "ABSTRACT_SYNTAX_NOT_SUPPORTED",
    "ACCEPTANCE",
    "APPLICATION_CONTEXT",
    "A_ABORT",
    "A_ASSOCIATE_AC",
    "A_ASSOCIATE_RJ",
    "A_ASSOCIATE_RQ",
    "A_RELEASE_RP",
    "A_RELEASE_RQ",
    "PDU_HEADER",
    "REJECT_REASONS",
    "P_DATA_TF",
    "TRANSFER_SYNTAXES_NOT_SUPPORTED",
    "AcceptedContext",
    "AssociateAccept",
    "AssociateReject",
    "AssociateRequest",
    "OfferedContext",
    "PduError",
    "ProposedContext",
    "abort",
    "abort_pdu",
    "ae_field",
    "associate_ac",
    "associate_rj",
    "associate_rq",
    "data_pdus",
    "encode_item",
    "is_command",
    "is_last",
    "p_data",
    "parse_associate_ac",
    "parse_associate_rj",
    "parse_associate_rq",
    "pdv_items",
    "pdvs",
    "reject_text",
    "release_pdu",
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

#: PDU type, reserved, length (PS3.8 9.3.1)
PDU_HEADER = struct.Struct(">BBI")
_ITEM = struct.Struct(">BBH")
# PDU header + PDV item length, context ID, message control header (PS3.8 9.3.5, E.2)
_PDV = struct.Struct(">BBIIBB")

# Message control header bits (PS3.8 E.2).
_COMMAND = 0x01
_LAST = 0x02


class PduError(DicomError, ValueError):
    """A PDU that breaks PS3.8; an acceptor aborts with ``reason`` (PS3.8 Table 9-26)."""

    def __init__(self, message: str, reason: int = 6) -> None:
        self.reason = reason
        super().__init__(message)


# --- acceptor side: what a request proposes, what the answer says ------------------------


@dataclass(frozen=True, slots=True)
class ProposedContext:
    """One presentation context of a received request: its id, abstract and transfer syntaxes."""

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


def _uid(raw: bytes | memoryview) -> str:
    return bytes(raw).rstrip(b"\x00 ").decode("ascii", errors="replace").strip()


def _items(body: bytes | memoryview, start: int, end: int) -> list[tuple[int, int, int]]:
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


def encode_item(item_type: int, value: bytes) -> bytes:
    """An item of a PDU's variable field: type, reserved, 2-byte length, value."""
    return _ITEM.pack(item_type, 0, len(value)) + value


_item = encode_item


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return PDU_HEADER.pack(pdu_type, 0, len(body)) + body


def ae_field(title: str) -> bytes:
    """An AE title as its 16-byte field, space padded (PS3.8 9.3.2)."""
    return title.encode("ascii", errors="replace")[:16].ljust(16, b" ")


_ae = ae_field


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
    """An A-ABORT; source 2 is the service provider, 0 the user (PS3.8 Table 9-26)."""
    return _pdu(A_ABORT, bytes((0, 0, source, reason)))


def abort_pdu() -> bytes:
    """A-ABORT from the service user (source 0, PS3.8 9.3.8)."""
    return abort(0, 0)


def release_rp() -> bytes:
    """The A-RELEASE-RP answering an A-RELEASE-RQ."""
    return _pdu(A_RELEASE_RP, bytes(4))


def release_pdu(response: bool = False) -> bytes:
    """A-RELEASE-RQ (or -RP) PDU."""
    return _pdu(A_RELEASE_RP if response else A_RELEASE_RQ, bytes(4))


# --- requestor side ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OfferedContext:
    """One presentation context a requestor proposes: an odd ID, an abstract syntax, one syntax."""

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
    #: requests the requestor may have outstanding (PS3.7 D.3.3.3; 0: no limit); 1 when the
    #: peer did not answer an asynchronous operations window
    operations_window: int = 1


@dataclass(frozen=True, slots=True)
class AssociateReject:
    """An A-ASSOCIATE-RJ: result (1 permanent, 2 transient), source and reason (PS3.8 9.3.4)."""

    result: int
    source: int
    reason: int


def associate_rq(
    called_ae: str,
    calling_ae: str,
    contexts: Sequence[OfferedContext],
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version_name: str,
    operations_window: int = 1,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing ``contexts`` (PS3.8 9.3.2).

    ``operations_window`` above 1 proposes that many outstanding requests (PS3.7 D.3.3.3;
    this side performs none for the peer). At 1 the item is left out: some PACS drop the
    connection on it, and leaving it out means one at a time.
    """
    variable = _item(0x10, APPLICATION_CONTEXT.encode("ascii"))
    for context in contexts:
        body = (
            bytes((context.context_id, 0, 0, 0))
            + _item(0x30, context.abstract_syntax.encode("ascii"))
            + _item(0x40, context.transfer_syntax.encode("ascii"))
        )
        variable += _item(0x20, body)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(
        0x52, implementation_class_uid.encode("ascii")
    )
    if operations_window > 1:
        user += _item(0x53, struct.pack(">HH", min(operations_window, 0xFFFF), 1))
    user += _item(0x55, implementation_version_name.encode("ascii"))
    variable += _item(0x50, user)
    fixed = struct.pack(">HH", 1, 0) + _ae(called_ae) + _ae(calling_ae) + bytes(32)
    return _pdu(A_ASSOCIATE_RQ, fixed + variable)


def parse_associate_ac(body: bytes) -> AssociateAccept:
    """Read an A-ASSOCIATE-AC PDU body (the bytes after its 6-byte header)."""
    if len(body) < 68:
        raise PduError("the A-ASSOCIATE-AC is shorter than its fixed fields")
    accepted: dict[int, str] = {}
    refused: dict[int, int] = {}
    max_pdu = 0
    window = 1
    for item_type, start, end in _items(body, 68, len(body)):
        if item_type == 0x21:
            if end - start < 4:
                raise PduError("a presentation context item is too short")
            context_id, result = body[start], body[start + 2]
            syntax = ""
            for sub_type, sub_start, sub_end in _items(body, start + 4, end):
                if sub_type == 0x40:
                    syntax = _uid(body[sub_start:sub_end])
            if result == 0 and syntax:
                accepted[context_id] = syntax
            else:
                refused[context_id] = result
        elif item_type == 0x50:
            for sub_type, sub_start, sub_end in _items(body, start, end):
                if sub_type == 0x51 and sub_end - sub_start >= 4:
                    max_pdu = struct.unpack_from(">I", body, sub_start)[0]
                elif sub_type == 0x53 and sub_end - sub_start >= 4:
                    # The first field: how many the requestor may invoke (PS3.7 D.3.3.3).
                    window = struct.unpack_from(">H", body, sub_start)[0]
    return AssociateAccept(accepted, max_pdu, refused, window)


def parse_associate_rj(body: bytes) -> AssociateReject:
    """Read an A-ASSOCIATE-RJ PDU body."""
    if len(body) < 4:
        raise PduError("A-ASSOCIATE-RJ is too short")
    return AssociateReject(body[1], body[2], body[3])


#: (source, reason) of an A-ASSOCIATE-RJ in words (PS3.8 Table 9-21)
REJECT_REASONS = {
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
    reason = REJECT_REASONS.get((reject.source, reject.reason), f"reason {reject.reason}")
    return f"rejected ({kind}): {reason}"


# --- P-DATA-TF --------------------------------------------------------------------------


def p_data(context_id: int, payload: bytes, *, command: bool, last: bool = True) -> bytes:
    """A P-DATA-TF with one PDV (PS3.8 9.3.5, E.2)."""
    control = (_COMMAND if command else 0) | (_LAST if last else 0)
    return _PDV.pack(P_DATA_TF, 0, len(payload) + 6, len(payload) + 2, context_id, control) + payload


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


def pdv_items(body: bytes | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(context ID, message control header, fragment) of each PDV in a P-DATA-TF body."""
    yield from pdvs(memoryview(body))


def is_command(control: int) -> bool:
    """True for a PDV that carries a command fragment."""
    return bool(control & _COMMAND)


def is_last(control: int) -> bool:
    """True for the last fragment of a command or data set."""
    return bool(control & _LAST)
