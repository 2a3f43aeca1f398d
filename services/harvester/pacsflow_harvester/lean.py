"""The harvester's lean Query/Retrieve SCU: C-FIND and C-MOVE over a plain socket.

Why: a C-MOVE of a large series answers with one pending C-MOVE-RSP per image, and the
check after it is a C-FIND answering one response per image. Through pynetdicom each of those
messages costs about 0.6 ms of CPU (a DUL thread and a reactor thread polling every 0.1 ms,
every command set decoded into a pydicom Dataset): on a two-core machine, about 0.6 s of CPU
per 500 images that the PACS and the destination need for the transfer itself. Here each
response is a few ``struct`` reads in the calling thread; C-FIND identifiers are decoded by
pydicom only because the caller wants them as Datasets.

Scope (PS3.8 9.3, PS3.7 9.3 and Annex E, PS3.4 C.4): one association per request with one
presentation context (the Query/Retrieve model, Implicit or Explicit VR Little Endian),
A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF fragmented to the peer's maximum PDU, A-RELEASE and A-ABORT,
TLS when the node asks for it. No asynchronous operations, no extended negotiation, no
C-CANCEL. C-GET stays with :func:`pacsflow.dicom.get` (it needs SCP-role storage contexts).

:func:`find` and :func:`move` take the arguments of :func:`pacsflow.dicom.find` and
:func:`pacsflow.dicom.move` and answer and fail the same way: ``AssociationRejected`` (with
``RejectedByPeer`` and ``NoAcceptedContexts``) when no association comes about,
``DimseFailure`` for a C-FIND failure status, ``DicomError`` when no final response comes.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from collections.abc import Generator, Iterator, Mapping
from io import BytesIO
from typing import Any, Literal

from pacsflow.config import Node
from pacsflow.dicom import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    MoveResult,
    NetworkOptions,
    NoAcceptedContexts,
    RejectedByPeer,
    category,
    describe,
)
from pacsflow.dicom.engine.pdu import APPLICATION_CONTEXT as _APPLICATION_CONTEXT
from pacsflow.dicom.engine.pdu import PDU_HEADER as _HEADER
from pacsflow.dicom.transport import node_ssl_context
from pacsflow.dicom.engine.pdu import REJECT_REASONS as _REJECT_REASONS
from pacsflow.dicom.engine.pdu import ae_field as _ae
from pacsflow.dicom.engine.pdu import encode_item as _item
from pacsflow.errors import AssociationRejected, DicomError, DimseFailure
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

__all__ = ["find", "move"]

_FIND_MODELS = {
    "study": "1.2.840.10008.5.1.4.1.2.2.1",
    "patient": "1.2.840.10008.5.1.4.1.2.1.1",
}
_MOVE_MODELS = {
    "study": "1.2.840.10008.5.1.4.1.2.2.2",
    "patient": "1.2.840.10008.5.1.4.1.2.1.2",
}
_IMPLICIT = "1.2.840.10008.1.2"
_EXPLICIT = "1.2.840.10008.1.2.1"
_CONTEXT_ID = 1

_ITEM = struct.Struct(">BBH")
_ELEMENT = struct.Struct("<HHI")

_C_FIND_RQ, _C_MOVE_RQ = 0x0020, 0x0021
_NO_DATA_SET = 0x0101
# Command elements read from responses (group 0000).
_STATUS, _DATA_SET_TYPE, _ERROR_COMMENT = 0x0900, 0x0800, 0x0902
_COMPLETED, _FAILED, _WARNING = 0x1021, 0x1022, 0x1023


class _Closed(Exception):
    """The peer closed the connection or aborted."""


def _even(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def _command(fields: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(_ELEMENT.pack(0, element, len(value)) + value for element, value in fields)
    return _ELEMENT.pack(0, 0x0000, 4) + struct.pack("<I", len(body)) + body


def _parse_command(data: bytes) -> dict[int, bytes]:
    values: dict[int, bytes] = {}
    offset = 0
    while offset + 8 <= len(data):
        group, element, length = _ELEMENT.unpack_from(data, offset)
        if group == 0:
            values[element] = data[offset + 8 : offset + 8 + length]
        offset += 8 + length
    return values


def _us(values: Mapping[int, bytes], element: int) -> int | None:
    raw = values.get(element)
    return struct.unpack("<H", raw[:2])[0] if raw is not None and len(raw) >= 2 else None


def _identifier(level: str, query: Mapping[str, Any]) -> Dataset:
    level = level.upper()
    if level not in ("PATIENT", "STUDY", "SERIES", "IMAGE"):
        raise ValueError(f"query level {level!r} is not PATIENT, STUDY, SERIES or IMAGE")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in query.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"{keyword!r} is not a DICOM keyword")
        # An empty value asks the peer to return the attribute (PS3.4 C.2.2.1.3).
        setattr(identifier, keyword, "" if value is None else value)
    return identifier


def _encode(dataset: Dataset, implicit: bool) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit
    write_dataset(buffer, dataset)
    return buffer.getvalue()


class _Association:
    """One association to ``node`` with one presentation context, driven by one thread."""

    def __init__(self, node: Node, options: NetworkOptions, abstract_syntax: str) -> None:
        self.node = node
        self.options = options
        self.abstract_syntax = abstract_syntax
        self.sock: socket.socket | None = None
        self.implicit = True
        self.peer_max_pdu = 0
        self.message_id = 0

    # --- transport --------------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        try:
            raw = socket.create_connection(
                (self.node.host, self.node.port), timeout=self.options.connect_timeout
            )
        except OSError as err:
            raise AssociationRejected(
                f"no association with {self.node}: connection refused, closed or not answered "
                f"in time ({err.strerror or err})"
            ) from err
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.node.tls.enabled:
            return raw
        try:
            return node_ssl_context(self.node, self.options).wrap_socket(
                raw, server_hostname=self.node.host
            )
        except (OSError, ssl.SSLError) as err:
            raw.close()
            raise AssociationRejected(f"no TLS association with {self.node}: {err}") from err

    def _recv_exact(self, size: int) -> bytes:
        assert self.sock is not None
        chunks = bytearray()
        while len(chunks) < size:
            chunk = self.sock.recv(min(size - len(chunks), 1 << 20))
            if not chunk:
                raise _Closed("the peer closed the connection")
            chunks += chunk
        return bytes(chunks)

    def _read_pdu(self, timeout: float) -> tuple[int, bytes]:
        assert self.sock is not None
        self.sock.settimeout(timeout)
        pdu_type, _reserved, length = _HEADER.unpack(self._recv_exact(6))
        body = self._recv_exact(length)
        if pdu_type == 0x07:
            raise _Closed("the peer aborted the association")
        return pdu_type, body

    def _send(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.settimeout(self.options.dimse_timeout)
        self.sock.sendall(data)

    # --- association ------------------------------------------------------------------------

    def open(self) -> None:
        """Associate; raise ``AssociationRejected`` (or a subclass) when refused."""
        self.sock = self._connect()
        context = bytes((_CONTEXT_ID, 0, 0, 0)) + _item(0x30, self.abstract_syntax.encode())
        context += _item(0x40, _IMPLICIT.encode()) + _item(0x40, _EXPLICIT.encode())
        user = (
            _item(0x51, struct.pack(">I", self.options.max_pdu))
            + _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
            + _item(0x55, IMPLEMENTATION_VERSION_NAME.encode())
        )
        body = (
            struct.pack(">HH", 1, 0) + _ae(self.node.ae_title) + _ae(self.options.ae_title)
            + bytes(32) + _item(0x10, _APPLICATION_CONTEXT.encode()) + _item(0x20, context)
            + _item(0x50, user)
        )  # fmt: skip
        try:
            self._send(_HEADER.pack(0x01, 0, len(body)) + body)
            pdu_type, answer = self._read_pdu(self.options.acse_timeout)
        except (OSError, _Closed) as err:
            self.close_socket()
            raise AssociationRejected(
                f"no association with {self.node}: connection refused, closed or not answered "
                f"in time ({err})"
            ) from err
        if pdu_type == 0x03 and len(answer) >= 4:
            self.close_socket()
            result, source, reason = answer[1], answer[2], answer[3]
            kind = {1: "permanent", 2: "transient"}.get(result, f"result {result}")
            text = _REJECT_REASONS.get((source, reason), f"reason {reason}")
            raise RejectedByPeer(str(self.node), result, source, reason, f"{kind}: {text}")
        if pdu_type != 0x02:
            self.abort()
            raise AssociationRejected(f"{self.node} answered the association with PDU {pdu_type}")
        syntax = self._accepted_syntax(answer)
        if syntax is None:
            self.abort()
            raise NoAcceptedContexts(f"{self.node} accepted none of the 1 proposed contexts")
        self.implicit = syntax == _IMPLICIT

    def _accepted_syntax(self, body: bytes) -> str | None:
        accepted: str | None = None
        offset = 68  # protocol version, reserved, two AE titles, 32 reserved bytes
        while offset + 4 <= len(body):
            item_type, _reserved, length = _ITEM.unpack_from(body, offset)
            item = body[offset + 4 : offset + 4 + length]
            offset += 4 + length
            if item_type == 0x21 and len(item) >= 4 and item[0] == _CONTEXT_ID and item[2] == 0:
                inner = 4
                while inner + 4 <= len(item):
                    sub_type, _r, sub_length = _ITEM.unpack_from(item, inner)
                    if sub_type == 0x40:
                        value = item[inner + 4 : inner + 4 + sub_length]
                        accepted = value.rstrip(b"\x00 ").decode("ascii", "replace")
                    inner += 4 + sub_length
            elif item_type == 0x50:
                inner = 0
                while inner + 4 <= len(item):
                    sub_type, _r, sub_length = _ITEM.unpack_from(item, inner)
                    if sub_type == 0x51 and sub_length >= 4:
                        self.peer_max_pdu = struct.unpack_from(">I", item, inner + 4)[0]
                    inner += 4 + sub_length
        return accepted if accepted in (_IMPLICIT, _EXPLICIT) else None

    def release(self) -> None:
        """A-RELEASE; abort when the peer does not answer it."""
        if self.sock is None:
            return
        try:
            self._send(_HEADER.pack(0x05, 0, 4) + bytes(4))
            while True:
                pdu_type, _body = self._read_pdu(self.options.acse_timeout)
                if pdu_type == 0x06:
                    break
        except (OSError, _Closed):
            self.abort()
            return
        self.close_socket()

    def abort(self) -> None:
        """A-ABORT (source: service user) and close; quiet when the connection is gone."""
        if self.sock is None:
            return
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(_HEADER.pack(0x07, 0, 4) + bytes(4))
        except OSError:
            pass
        self.close_socket()

    def close_socket(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    # --- messages ---------------------------------------------------------------------------

    def next_message_id(self) -> int:
        self.message_id = self.message_id % 0xFFFF + 1
        return self.message_id

    def send_message(self, command: bytes, data: bytes) -> None:
        """Command set and data set as P-DATA-TF PDUs no longer than the peer accepts."""
        # PS3.8 9.3.1: the limit is on the PDU's variable field; a PDV item adds 6 bytes.
        limit = self.peer_max_pdu - 6 if self.peer_max_pdu else 1 << 20
        limit = max(limit, 64)
        pdus = bytearray()
        for payload, is_command in ((command, True), (data, False)):
            for start in range(0, len(payload), limit):
                fragment = payload[start : start + limit]
                control = (0x01 if is_command else 0x00) | (
                    0x02 if start + limit >= len(payload) else 0x00
                )
                item = struct.pack(">IBB", len(fragment) + 2, _CONTEXT_ID, control) + fragment
                pdus += _HEADER.pack(0x04, 0, len(item)) + item
        self._send(bytes(pdus))

    def responses(self) -> Iterator[tuple[dict[int, bytes], bytes | None]]:
        """Each response: its command fields, and its data set bytes when it has one."""
        command = bytearray()
        data = bytearray()
        fields: dict[int, bytes] | None = None
        while True:
            pdu_type, body = self._read_pdu(self.options.dimse_timeout)
            if pdu_type != 0x04:
                raise _Closed(f"unexpected PDU type {pdu_type} during a request")
            offset = 0
            while offset + 6 <= len(body):
                length = struct.unpack_from(">I", body, offset)[0]
                control = body[offset + 5]
                value = body[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & 0x01:
                    command += value
                    if control & 0x02:
                        fields = _parse_command(bytes(command))
                        command.clear()
                        if _us(fields, _DATA_SET_TYPE) == _NO_DATA_SET:
                            yield fields, None
                            fields = None
                else:
                    data += value
                    if control & 0x02 and fields is not None:
                        yield fields, bytes(data)
                        data.clear()
                        fields = None


def _request(
    node: Node,
    options: NetworkOptions,
    abstract_syntax: str,
    command_field: int,
    identifier: Dataset,
    operation: str,
    extra: list[tuple[int, bytes]] | None = None,
) -> Generator[tuple[dict[int, bytes], bytes | None, bool], None, None]:
    """Associate, send one request, yield (fields, data, implicit) per response.

    Closing the generator (after the final response) releases the association.
    """
    association = _Association(node, options, abstract_syntax)
    association.open()
    try:
        message_id = association.next_message_id()
        fields = [
            (0x0002, _even(abstract_syntax.encode(), b"\x00")),
            (0x0100, struct.pack("<H", command_field)),
            (0x0110, struct.pack("<H", message_id)),
            *(extra or []),
            (0x0700, struct.pack("<H", 0)),  # priority medium
            (0x0800, struct.pack("<H", 0x0000)),  # a data set follows
        ]
        fields.sort()
        association.send_message(_command(fields), _encode(identifier, association.implicit))
        for response in association.responses():
            yield response[0], response[1], association.implicit
    except (OSError, _Closed) as err:
        association.abort()
        raise DicomError(f"no {operation} response from {node} (timeout or abort): {err}") from err
    finally:
        association.release()


def _count(fields: Mapping[int, bytes], element: int, fallback: int) -> int:
    value = _us(fields, element)
    return fallback if value is None else value


def find(
    node: Node,
    level: str,
    query: Mapping[str, Any],
    options: NetworkOptions,
    model: Literal["study", "patient"] = "study",
) -> list[Dataset]:
    """C-FIND ``query`` at ``level``; the matches (as :func:`pacsflow.dicom.find`)."""
    if model not in _FIND_MODELS:
        raise ValueError(f"query model {model!r} is not 'study' or 'patient'")
    responses = _request(
        node, options, _FIND_MODELS[model], _C_FIND_RQ, _identifier(level, query), "C-FIND"
    )
    with contextlib.closing(responses):
        return _find_matches(node, responses)


def _find_matches(
    node: Node, responses: Iterator[tuple[dict[int, bytes], bytes | None, bool]]
) -> list[Dataset]:
    matches: list[Dataset] = []
    for fields, data, implicit in responses:
        code = _us(fields, _STATUS)
        if code is None:
            raise DicomError(f"a C-FIND response from {node} has no status")
        if category(code) == "pending":
            if data:
                matches.append(read_dataset(BytesIO(data), implicit, True))
            continue
        if category(code) in ("success", "warning"):
            return matches
        comment = fields.get(_ERROR_COMMENT, b"").rstrip(b"\x00 ").decode("ascii", "replace")
        raise DimseFailure(code, f"{node} answered C-FIND with {describe(code)} {comment}".strip())
    raise DicomError(f"C-FIND to {node} ended without a final status")


def move(
    node: Node,
    destination_ae: str,
    level: str,
    query: Mapping[str, Any],
    options: NetworkOptions,
    model: Literal["study", "patient"] = "study",
) -> MoveResult:
    """C-MOVE what ``query`` matches to ``destination_ae`` (as :func:`pacsflow.dicom.move`)."""
    if model not in _MOVE_MODELS:
        raise ValueError(f"query model {model!r} is not 'study' or 'patient'")
    destination = _even(destination_ae.encode("ascii"), b" ")
    responses = _request(
        node, options, _MOVE_MODELS[model], _C_MOVE_RQ, _identifier(level, query), "C-MOVE",
        extra=[(0x0600, destination)],
    )  # fmt: skip
    with contextlib.closing(responses):
        return _move_result(node, responses)


def _move_result(
    node: Node, responses: Iterator[tuple[dict[int, bytes], bytes | None, bool]]
) -> MoveResult:
    completed = failed = warning = 0
    for fields, data, implicit in responses:
        code = _us(fields, _STATUS)
        if code is None:
            raise DicomError(f"a C-MOVE response from {node} has no status")
        # Final responses may omit the counts (PS3.4 C.4.2.3.1): keep the last pending's.
        completed = _count(fields, _COMPLETED, completed)
        failed = _count(fields, _FAILED, failed)
        warning = _count(fields, _WARNING, warning)
        if category(code) == "pending":
            continue
        failed_uids: tuple[str, ...] = ()
        if data:
            identifier = read_dataset(BytesIO(data), implicit, True)
            value = identifier.get("FailedSOPInstanceUIDList", "")
            items = value.split("\\") if isinstance(value, str) else list(value)
            failed_uids = tuple(str(uid) for uid in items if uid)
        return MoveResult(code, completed, failed, warning, failed_uids)
    raise DicomError(f"C-MOVE to {node} ended without a final status")
